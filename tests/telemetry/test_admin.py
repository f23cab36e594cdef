from __future__ import annotations

from typing import Any

import msgspec
import pytest
from django.contrib.auth.models import User
from django.test import Client

from events.models import Event
from events.storage import events_store
from mlxserve.bus import telemetry_config_read
from telemetry.models import TelemetryConfig, TelemetryConfigChange
from tests.factories import make_envelope

pytestmark = pytest.mark.django_db

CHANGE_URL = "/admin/telemetry/telemetryconfig/1/change/"
GOOD = {"enabled": "on", "service_name": "fleet-a", "prometheus_port": "9500", "export_interval_ms": "60000"}


@pytest.fixture
def admin_browser(staff_user: User) -> Client:
    client = Client()
    assert client.login(username="staff", password="staff-pass-123")
    return client


def errors_after_saving(client: Client, **changes: str) -> dict[str, list[str]]:
    response = client.post(CHANGE_URL, {**GOOD, **changes})
    assert response.status_code == 200, "a refused form is shown again"
    form = response.context["adminform"].form
    return {name: list(errors) for name, errors in form.errors.items()}


def test_the_config_list_leads_straight_to_the_one_config(admin_browser: Client) -> None:
    response = admin_browser.get("/admin/telemetry/telemetryconfig/")
    assert response.status_code == 302
    assert response["Location"] == CHANGE_URL
    assert admin_browser.get(CHANGE_URL).status_code == 200


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"prometheus_port": "80"}, "prometheus_port", "Port must be at least 1024 (non-privileged)"),
        ({"prometheus_port": "65536"}, "prometheus_port", "Port cannot exceed 65535"),
        ({"prometheus_port": "9464.0"}, "prometheus_port", "Must be an integer"),
        ({"prometheus_port": "abc"}, "prometheus_port", "Must be an integer"),
        ({"export_interval_ms": "999"}, "export_interval_ms", "Export interval must be at least 1 second"),
        ({"export_interval_ms": "600001"}, "export_interval_ms", "Export interval cannot exceed 10 minutes"),
        ({"service_name": ""}, "service_name", "Service name cannot be empty"),
        ({"service_name": "a" * 101}, "service_name", "Service name cannot exceed 100 characters"),
        (
            {"service_name": "bad name"},
            "service_name",
            "Service name must be alphanumeric with hyphens/underscores",
        ),
        (
            {"service_name": "worker\n"},
            "service_name",
            "Service name must be alphanumeric with hyphens/underscores",
        ),
        (
            {"service_name": "caf\u00e9"},
            "service_name",
            "Service name must be alphanumeric with hyphens/underscores",
        ),
    ],
)
def test_the_admin_form_refuses_with_the_api_messages(
    admin_browser: Client, changes: dict[str, str], field: str, message: str
) -> None:
    assert errors_after_saving(admin_browser, **changes) == {field: [message]}
    assert TelemetryConfig.objects.get().version == 0


def test_the_admin_shows_the_message_on_the_page(admin_browser: Client) -> None:
    response = admin_browser.post(CHANGE_URL, {**GOOD, "prometheus_port": "80"})
    assert "Port must be at least 1024 (non-privileged)" in response.content.decode()


def test_saving_in_the_admin_stores_records_and_publishes(
    admin_browser: Client, redis_client: Any, settings: Any
) -> None:
    response = admin_browser.post(CHANGE_URL, GOOD)
    assert response.status_code == 302
    config = TelemetryConfig.objects.get()
    assert (config.enabled, config.service_name, config.prometheus_port, config.version) == (
        True,
        "fleet-a",
        9500,
        1,
    )
    change = TelemetryConfigChange.objects.get()
    assert (change.changed_by_username, change.via) == ("staff", "admin")
    assert change.changes == {
        "enabled": [False, True],
        "serviceName": ["kr-serve-mlx", "fleet-a"],
        "prometheusPort": [9464, 9500],
    }
    published = telemetry_config_read(client=redis_client, key=settings.TELEMETRY_CONFIG_KEY)
    assert published is not None and published[0] == 1 and published[1].prometheus_port == 9500
    history = admin_browser.get("/admin/telemetry/telemetryconfigchange/")
    assert history.status_code == 200
    assert "fleet-a" in history.content.decode()


def test_saving_while_redis_is_down_still_saves_and_warns(admin_browser: Client, settings: Any) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    response = admin_browser.post(CHANGE_URL, GOOD, follow=True)
    assert TelemetryConfig.objects.get().service_name == "fleet-a"
    assert "Redis is unreachable" in response.content.decode()


def test_the_event_list_is_read_only_filterable_and_escapes_payloads(admin_browser: Client) -> None:
    nasty = make_envelope("tokenGenerated", payload={"model": "m", "token": "<script>alert(1)</script>"})
    events_store([("1-0", msgspec.json.encode(nasty))])
    listing = admin_browser.get("/admin/events/event/?type__exact=tokenGenerated")
    assert listing.status_code == 200
    assert "tokenGenerated" in listing.content.decode()
    for query in ("model__exact=m", "source__exact=mac-studio-3/worker-1"):
        assert admin_browser.get(f"/admin/events/event/?{query}").status_code == 200
    page = admin_browser.get(f"/admin/events/event/{nasty['id']}/change/").content.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert(1)</script>" not in page
    assert admin_browser.get("/admin/events/event/add/").status_code == 403
    assert Event.objects.count() == 1


def test_dead_letters_are_listed_and_replayed_from_the_admin(admin_browser: Client) -> None:
    from events.models import DeadLetter

    envelope = make_envelope("runtimeStatus")
    letter = DeadLetter.objects.create(
        stream_id="9-0",
        body=msgspec.json.encode(envelope).decode(),
        error={"code": "InvalidParams", "message": "older contract"},
    )
    listing = admin_browser.get("/admin/events/deadletter/")
    assert listing.status_code == 200 and "older contract" in listing.content.decode()
    response = admin_browser.post(
        "/admin/events/deadletter/", {"action": "replay", "_selected_action": [letter.pk]}, follow=True
    )
    assert "1 stored as events, 0 still invalid." in response.content.decode()
    assert Event.objects.filter(pk=envelope["id"]).exists()
