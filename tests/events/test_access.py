"""Who may do what: every role against every endpoint, and throttling of writes."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from events.models import RegisteredModel
from mlxserve.web.roles import ADMIN_GROUP, OPERATOR_GROUP, PRODUCER_GROUP, VIEWER_GROUP
from tests.factories import make_envelope, role_user, token_client

pytestmark = pytest.mark.django_db

ROLES = ("anonymous", "producer", "plain", "viewer", "operator", "admin", "staff")


def client_for(role: str) -> APIClient:
    if role == "anonymous":
        return APIClient()
    if role == "plain":  # signed in, no group: any authenticated user may read
        return token_client(User.objects.create_user("plain"))
    if role == "staff":  # staff, no group: staff may change the config
        return token_client(User.objects.create_user("staff-only", is_staff=True))
    group = {
        "producer": PRODUCER_GROUP,
        "viewer": VIEWER_GROUP,
        "operator": OPERATOR_GROUP,
        "admin": ADMIN_GROUP,
    }[role]
    # A producer posts as its own name: make_envelope's source is mac-studio-3/worker-1.
    username = "mac-studio-3" if role == "producer" else role
    return token_client(role_user(username, group, is_staff=role == "admin"))


def call(client: APIClient, method: str, path: str, body: Any = None) -> Any:
    if body is None:
        return getattr(client, method)(path)
    return getattr(client, method)(path, data=json.dumps(body), content_type="application/json")


READ = {r: 200 for r in ROLES} | {"anonymous": 401, "producer": 403}
MISSING = {**READ, **{r: 404 for r in ("plain", "viewer", "operator", "admin", "staff")}}
CONFIG_WRITE = {**READ, "plain": 403, "viewer": 403, "operator": 403}
POST_EVENTS = {
    **READ,
    "producer": 202,
    "plain": 403,
    "viewer": 403,
    "operator": 403,
    "admin": 202,
    "staff": 202,
}
OPERATE = {**READ, "plain": 403, "viewer": 403, "operator": 202, "admin": 202, "staff": 202}
# Dead letters: operators and admins see them; replaying takes the admin's Replay permission.
DEAD_LETTERS = {**READ, "plain": 403, "viewer": 403, "staff": 403}
REPLAY = {**DEAD_LETTERS, "operator": 403, "admin": 404}  # 404: allowed, but there is no letter 999

ENDPOINTS: list[tuple[str, str, Any, dict[str, int]]] = [
    ("get", "/api/telemetry/config/", None, READ),
    ("patch", "/api/telemetry/config/", {"exportIntervalMs": 5000}, CONFIG_WRITE),
    ("put", "/api/telemetry/config/", {"enabled": True}, CONFIG_WRITE),
    ("get", "/api/telemetry/config/history/", None, READ),
    ("get", "/api/events/", None, READ),
    ("post", "/api/events/", "envelope", POST_EVENTS),
    ("get", f"/api/events/{uuid.uuid4()}/", None, MISSING),
    ("get", "/api/events/export/?since=0", None, READ),
    ("get", "/api/stats/", None, READ),
    ("get", "/api/workers/", None, READ),
    ("post", "/api/workers/unload/", {"model": "demo"}, OPERATE),
    ("post", "/api/generations/", {"model": "demo", "prompt": "hi", "maxTokens": 4}, OPERATE),
    ("get", f"/api/generations/{uuid.uuid4()}/", None, MISSING),
    ("get", "/api/dead-letters/", None, DEAD_LETTERS),
    ("post", "/api/dead-letters/999/replay/", None, REPLAY),
]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(("method", "path", "body", "expected"), ENDPOINTS, ids=lambda v: str(v)[:40])
def test_each_role_gets_what_its_work_needs(
    role: str, method: str, path: str, body: Any, expected: dict[str, int], any_model_served: object
) -> None:
    if body == "envelope":
        body = make_envelope("tokenGenerated")
    RegisteredModel.objects.get_or_create(name="demo", defaults={"path": "/models/demo"})
    response = call(client_for(role), method, path, body)
    assert response.status_code == expected[role], response.content
    if response.status_code in (401, 403):
        error = response.json()
        assert set(error) == {"code", "message"}
        assert error["code"] == {401: "Unauthorized", 403: "Forbidden"}[response.status_code]
    if response.status_code == 401:
        assert response["WWW-Authenticate"].startswith("Token")


def test_a_producer_token_is_refused_everywhere_but_posting_events() -> None:
    client = client_for("producer")
    response = client.get("/api/events/")
    assert response.status_code == 403
    assert response.json()["message"] == "Producer accounts can only post events"


def test_writes_are_throttled_per_account_and_reads_are_not(settings: Any) -> None:
    settings.API_POST_RATE = "3/min"
    producer, other = client_for("producer"), client_for("admin")
    statuses = [call(producer, "post", "/api/events/", make_envelope()).status_code for _ in range(4)]
    assert statuses == [202, 202, 202, 429]
    refused = call(producer, "post", "/api/events/", make_envelope())
    assert refused.json()["code"] == "Throttled"
    assert int(refused["Retry-After"]) > 0
    # Another account has its own budget; reading is never throttled.
    assert call(other, "post", "/api/events/", make_envelope()).status_code == 202
    assert all(other.get("/api/events/").status_code == 200 for _ in range(5))


def test_an_empty_rate_turns_throttling_off(settings: Any) -> None:
    settings.API_POST_RATE = ""
    producer = client_for("producer")
    assert {call(producer, "post", "/api/events/", make_envelope()).status_code for _ in range(20)} == {202}


def test_the_role_groups_exist_after_migrate_with_their_admin_permissions() -> None:
    from django.contrib.auth.models import Group

    def codes(name: str) -> set[str]:
        return set(Group.objects.get(name=name).permissions.values_list("codename", flat=True))

    assert {"change_telemetryconfig", "change_deadletter", "change_promptpolicy"} <= codes(ADMIN_GROUP)
    assert codes(VIEWER_GROUP) == codes(OPERATOR_GROUP) == codes(PRODUCER_GROUP) == set()
