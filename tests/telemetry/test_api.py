from __future__ import annotations

import json
from typing import Any

import pytest
from rest_framework.test import APIClient

from mlxserve.bus import telemetry_config_read
from telemetry.models import TelemetryConfigChange

pytestmark = pytest.mark.django_db

URL = "/api/telemetry/config/"
DEFAULTS = {
    "enabled": False,
    "serviceName": "kr-serve-mlx",
    "prometheusPort": 9464,
    "exportIntervalMs": 60000,
}


def put(client: APIClient, body: Any, method: str = "put") -> Any:
    return getattr(client, method)(URL, data=json.dumps(body), content_type="application/json")


def test_get_returns_the_defaults_before_any_change(reader_client: APIClient) -> None:
    response = reader_client.get(URL)
    assert response.status_code == 200
    assert response.json() == DEFAULTS


def test_put_replaces_the_config_and_resets_omitted_fields(staff_client: APIClient) -> None:
    assert put(staff_client, {"enabled": True, "serviceName": "fleet-a", "prometheusPort": 9500}).json() == {
        "enabled": True,
        "serviceName": "fleet-a",
        "prometheusPort": 9500,
        "exportIntervalMs": 60000,
    }
    response = put(staff_client, {"enabled": False})
    assert response.status_code == 200
    assert response.json() == DEFAULTS
    assert staff_client.get(URL).json() == DEFAULTS


def test_patch_changes_only_the_fields_given(staff_client: APIClient) -> None:
    put(staff_client, {"enabled": True, "serviceName": "fleet-a"})
    response = put(staff_client, {"exportIntervalMs": 5000}, method="patch")
    assert response.status_code == 200
    assert response.json() == {
        "enabled": True,
        "serviceName": "fleet-a",
        "prometheusPort": 9464,
        "exportIntervalMs": 5000,
    }


def test_a_bad_put_gets_the_error_object_and_changes_nothing(staff_client: APIClient) -> None:
    response = put(staff_client, {"enabled": True, "prometheusPort": 80, "serviceName": "bad name", "x": 1})
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "InvalidParams"
    assert body["message"] == (
        "Validation error on field 'serviceName': Service name must be alphanumeric with hyphens/underscores"
    )
    assert [(i["path"], i["message"]) for i in body["details"]["issues"]] == [
        (["serviceName"], "Service name must be alphanumeric with hyphens/underscores"),
        (["prometheusPort"], "Port must be at least 1024 (non-privileged)"),
        (["x"], "Unknown field 'x'"),
    ]
    assert staff_client.get(URL).json() == DEFAULTS
    assert not TelemetryConfigChange.objects.exists()


@pytest.mark.parametrize("port", ["9464", 9464.5, True])
def test_put_does_not_coerce_types(staff_client: APIClient, port: Any) -> None:
    response = put(staff_client, {"enabled": True, "prometheusPort": port})
    assert response.status_code == 400
    assert response.json()["details"]["issues"][0]["message"] == "Must be an integer"


def test_a_bad_patch_is_refused(staff_client: APIClient) -> None:
    response = put(staff_client, {"exportIntervalMs": 600001}, method="patch")
    assert response.status_code == 400
    assert response.json()["message"] == (
        "Validation error on field 'exportIntervalMs': Export interval cannot exceed 10 minutes"
    )


def test_invalid_json_and_nan_get_400_not_500(staff_client: APIClient) -> None:
    for body in ['{"enabled": tru', '{"enabled": true, "prometheusPort": NaN}', '{"x": Infinity}']:
        response = staff_client.put(URL, data=body, content_type="application/json")
        assert response.status_code == 400
        assert response.json()["details"]["issues"][0]["code"] == "invalid_json"


def test_anonymous_gets_401_and_non_staff_cannot_change(
    anon_client: APIClient, reader_client: APIClient
) -> None:
    assert anon_client.get(URL).status_code == 401
    assert put(anon_client, {"enabled": True}).status_code == 401
    response = put(reader_client, {"enabled": True})
    assert response.status_code == 403
    assert response.json()["code"] == "Forbidden"
    assert put(reader_client, {"enabled": True}, method="patch").status_code == 403


def test_producers_can_neither_read_nor_change(producer_client: APIClient) -> None:
    assert producer_client.get(URL).status_code == 403
    assert put(producer_client, {"enabled": True}).status_code == 403


def test_a_change_is_recorded_with_who_and_what(staff_client: APIClient) -> None:
    put(staff_client, {"enabled": True, "prometheusPort": 9500})
    put(staff_client, {"exportIntervalMs": 2000}, method="patch")
    put(staff_client, {"exportIntervalMs": 2000}, method="patch")  # no change, no entry
    history = staff_client.get(URL + "history/").json()["results"]
    assert [(h["version"], h["changes"], h["changedBy"], h["via"]) for h in history] == [
        (2, {"exportIntervalMs": [60000, 2000]}, "staff", "api"),
        (1, {"enabled": [False, True], "prometheusPort": [9464, 9500]}, "staff", "api"),
    ]
    assert history[0]["config"]["prometheusPort"] == 9500


def test_saving_publishes_the_config_to_redis(
    staff_client: APIClient, redis_client: Any, settings: Any
) -> None:
    put(staff_client, {"enabled": True, "serviceName": "fleet-b"})
    published = telemetry_config_read(client=redis_client, key=settings.TELEMETRY_CONFIG_KEY)
    assert published is not None
    version, config = published
    assert version == 1
    assert config.service_name == "fleet-b" and config.enabled is True


def test_a_body_over_the_limit_gets_413(staff_client: APIClient, settings: Any) -> None:
    settings.MAX_REQUEST_BYTES = 1000
    response = staff_client.put(
        URL, data=json.dumps({"enabled": True, "serviceName": "a" * 2000}), content_type="application/json"
    )
    assert response.status_code == 413
    assert response.json()["code"] == "PayloadTooLarge"
