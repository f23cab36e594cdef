"""The contract, the API's serializer and the model agree on every case of the config's test plan."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from rest_framework import serializers
from rest_framework.test import APIClient

from mlxserve.contract import EngineError, validate_telemetry_config
from mlxserve.engine import TelemetryBridge
from telemetry.models import TelemetryConfig
from telemetry.serializers import TelemetryConfigSerializer

pytestmark = pytest.mark.django_db

OK = None
# (config, the first issue's message, or OK). Boundaries on both sides, types, unknown fields.
CASES: list[tuple[dict[str, Any], str | None]] = [
    ({"enabled": True}, OK),
    ({"enabled": False, "serviceName": "a", "prometheusPort": 1024, "exportIntervalMs": 1000}, OK),
    ({"enabled": True, "serviceName": "x" * 100, "prometheusPort": 65535, "exportIntervalMs": 600000}, OK),
    ({"enabled": True, "serviceName": "kr_serve-mlx-2"}, OK),
    ({"enabled": True, "serviceName": ""}, "Service name cannot be empty"),
    ({"enabled": True, "serviceName": "x" * 101}, "Service name cannot exceed 100 characters"),
    (
        {"enabled": True, "serviceName": "bad name"},
        "Service name must be alphanumeric with hyphens/underscores",
    ),
    (
        {"enabled": True, "serviceName": "worker\n"},
        "Service name must be alphanumeric with hyphens/underscores",
    ),
    (
        {"enabled": True, "serviceName": "wörker"},
        "Service name must be alphanumeric with hyphens/underscores",
    ),
    ({"enabled": True, "prometheusPort": 1023}, "Port must be at least 1024 (non-privileged)"),
    ({"enabled": True, "prometheusPort": 65536}, "Port cannot exceed 65535"),
    ({"enabled": True, "exportIntervalMs": 999}, "Export interval must be at least 1 second"),
    ({"enabled": True, "exportIntervalMs": 600001}, "Export interval cannot exceed 10 minutes"),
    ({"enabled": True, "prometheusPort": "9464"}, "Must be an integer"),
    ({"enabled": True, "prometheusPort": 9464.0}, "Must be an integer"),
    ({"enabled": True, "prometheusPort": True}, "Must be an integer"),
    ({"enabled": "true"}, "Must be a boolean"),
    ({"enabled": True, "serviceName": 5}, "Must be a string"),
    ({"enabled": True, "serviceName": None}, "Must be a string"),
    ({}, "Required"),
    ({"enabled": True, "extra": 1}, "Unknown field 'extra'"),
]

# What a Django model can be asked to hold (its fields take Python values, coerced as Django does):
# the ranges, lengths and patterns.
MODEL_CASES = [(c, m) for c, m in CASES if m is OK or not m.startswith(("Must be", "Required", "Unknown"))]


def contract_answer(config: dict[str, Any]) -> dict[str, Any] | None:
    try:
        validate_telemetry_config(config)
    except EngineError as exc:
        return exc.as_error()
    return None


@pytest.mark.parametrize(("config", "message"), CASES)
def test_the_api_answers_as_the_contract(
    staff_client: APIClient, config: dict[str, Any], message: str | None
) -> None:
    expected = contract_answer(config)
    assert (expected and expected["details"]["issues"][0]["message"]) == message
    response = staff_client.put(
        "/api/telemetry/config/", data=json.dumps(config), content_type="application/json"
    )
    if message is OK:
        assert response.status_code == 200, response.json()
    else:
        assert response.status_code == 400
        assert response.json() == expected


@pytest.mark.parametrize(("config", "message"), CASES)
def test_the_bridge_answers_as_the_contract(config: dict[str, Any], message: str | None) -> None:
    expected = contract_answer(config)
    if message is OK:
        assert TelemetryBridge(config).config == validate_telemetry_config(config)
        return
    with pytest.raises(EngineError) as caught:
        TelemetryBridge(config)
    assert caught.value.as_error() == expected


@pytest.mark.parametrize(("config", "message"), MODEL_CASES)
def test_full_clean_refuses_what_the_api_refuses(config: dict[str, Any], message: str | None) -> None:
    row = TelemetryConfig(
        enabled=config.get("enabled", False),
        service_name=config.get("serviceName", "kr-serve-mlx"),
        prometheus_port=config.get("prometheusPort", 9464),
        export_interval_ms=config.get("exportIntervalMs", 60000),
    )
    if message is OK:
        row.full_clean()
        return
    with pytest.raises(ValidationError) as caught:
        row.full_clean()
    assert message in [m for messages in caught.value.message_dict.values() for m in messages]


def test_the_serializer_fields_hold_the_declared_rules_themselves() -> None:
    fields: Any = TelemetryConfigSerializer().fields
    assert (fields["prometheusPort"].min_value, fields["prometheusPort"].max_value) == (1024, 65535)
    assert (fields["serviceName"].min_length, fields["serviceName"].max_length) == (1, 100)
    # A field alone refuses with the contract's message: DRF does the checking, not a fallback.
    with pytest.raises(serializers.ValidationError) as caught:
        fields["exportIntervalMs"].run_validation(999)
    assert caught.value.detail == ["Export interval must be at least 1 second"]
    with pytest.raises(serializers.ValidationError) as caught:
        fields["serviceName"].run_validation("bad name")
    assert caught.value.detail == ["Service name must be alphanumeric with hyphens/underscores"]


def test_the_openapi_schema_shows_the_rules_natively(tmp_path: Any) -> None:
    out = tmp_path / "schema.json"
    call_command("spectacular", "--format", "openapi-json", "--file", str(out))
    schema = json.loads(out.read_text())
    [name] = [
        n for n in schema["components"]["schemas"] if n.startswith("TelemetryConfig") and "Change" not in n
    ][:1]
    properties = schema["components"]["schemas"][name]["properties"]
    assert (
        properties["prometheusPort"]["minimum"] == 1024 and properties["prometheusPort"]["maximum"] == 65535
    )
    assert properties["serviceName"]["maxLength"] == 100 and properties["serviceName"]["minLength"] == 1
    # JSON Schema patterns are ECMA-262, where $ is the very end: the same rule as \A...\Z here.
    assert properties["serviceName"]["pattern"] == "^[A-Za-z0-9_-]+$"
    assert properties["exportIntervalMs"]["default"] == 60000


@pytest.mark.parametrize(("config", "message"), [*CASES, ("not an object", "Must be an object")])
def test_the_serializer_keeps_drfs_contract_with_the_contracts_issues(
    config: Any, message: str | None
) -> None:
    # Used by hand (a user's own view, a nested serializer, the browsable API), a refusal is
    # is_valid() False with .errors, and raise_exception=True raises DRF's ValidationError: never
    # another exception (a 500 outside the one view).
    serializer = TelemetryConfigSerializer(data=config)
    if message is OK:
        assert serializer.is_valid(), serializer.errors
        assert serializer.validated_data == validate_telemetry_config(config)
        return
    assert serializer.is_valid() is False
    expected = contract_answer(config) if isinstance(config, dict) else None
    first = next(iter(serializer.errors.values()))[0]
    assert str(first) == message
    with pytest.raises(serializers.ValidationError) as caught:
        TelemetryConfigSerializer(data=config).is_valid(raise_exception=True)
    # DRF's handler and ours read it back as the contract's error object, issue for issue.
    from mlxserve.web.api import exception_handler

    answer = exception_handler(caught.value, {})
    assert answer is not None and answer.status_code == 400
    if expected is not None:
        assert answer.data == expected
    else:
        assert answer.data["details"] == {
            "field": "root",
            "issues": [{"path": [], "message": "Must be an object", "code": "invalid_type"}],
        }
