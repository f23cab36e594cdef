"""Dead letters over the API: what the ingester could not store, and replaying it."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest
import redis
from rest_framework.test import APIClient

from events.models import DeadLetter, Event
from mlxserve.contract.stream import ENTRY_FIELD
from mlxserve.web.roles import ADMIN_GROUP
from tests.factories import ingester, make_envelope, role_user, token_client

pytestmark = pytest.mark.django_db

URL = "/api/dead-letters/"


@pytest.fixture
def admin_client() -> APIClient:
    return token_client(role_user("boss", ADMIN_GROUP, is_staff=True))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_dead_letters_are_listed_newest_first_with_their_event_ids_and_errors(
    redis_client: redis.Redis, settings: Any, operator_client: APIClient
) -> None:
    future = make_envelope("error", timestamp=now_ms() + 86_400_000)
    redis_client.xadd(settings.EVENTS_STREAM, {ENTRY_FIELD: b"not json"})
    future_entry = redis_client.xadd(settings.EVENTS_STREAM, {ENTRY_FIELD: msgspec.json.encode(future)})
    ingester(redis_client, settings).step()

    body = operator_client.get(URL).json()
    newest, oldest = body["results"]
    assert set(newest) == {"id", "streamId", "eventId", "error", "receivedAt", "replayedAt"}
    entry_id = future_entry.decode() if isinstance(future_entry, bytes) else future_entry
    assert (newest["streamId"], newest["eventId"], newest["replayedAt"]) == (entry_id, future["id"], None)
    assert newest["error"]["details"]["field"] == "timestamp"
    assert oldest["eventId"] is None  # nothing to read an id from
    assert oldest["error"]["details"]["issues"][0]["code"] == "invalid_json"


def test_dead_letters_page_by_cursor_without_repeats(operator_client: APIClient) -> None:
    DeadLetter.objects.bulk_create(
        DeadLetter(stream_id=f"{i}-0", body="x", error={"code": "InvalidParams", "message": "m"})
        for i in range(25)
    )
    seen: list[str] = []
    page = operator_client.get(URL, {"limit": 10}).json()
    while True:
        seen += [letter["streamId"] for letter in page["results"]]
        if page["next"] is None:
            break
        page = operator_client.get(page["next"]).json()
    assert seen == [f"{i}-0" for i in reversed(range(25))]


def test_a_repaired_dead_letter_is_stored_by_replay_once(admin_client: APIClient) -> None:
    envelope = make_envelope("modelLoaded", timestamp=now_ms())
    broken = {**envelope, "seq": -1}
    letter = DeadLetter.objects.create(
        stream_id="5-0", event_id=envelope["id"], body=msgspec.json.encode(broken).decode(), error={}
    )
    refused = admin_client.post(f"{URL}{letter.pk}/replay/")
    assert refused.status_code == 400
    assert refused.json()["details"]["field"] == "seq"
    letter.refresh_from_db()
    assert letter.error == refused.json() and letter.replayed_at is None
    assert not Event.objects.exists()

    # An operator repairs the body (as a fixed producer would have sent it), then replays.
    DeadLetter.objects.filter(pk=letter.pk).update(body=msgspec.json.encode(envelope).decode())
    replayed = admin_client.post(f"{URL}{letter.pk}/replay/")
    assert replayed.status_code == 200
    assert replayed.json()["eventId"] == envelope["id"] and replayed.json()["replayedAt"] is not None
    assert Event.objects.filter(pk=envelope["id"]).exists()

    again = admin_client.post(f"{URL}{letter.pk}/replay/")
    assert again.status_code == 409
    assert again.json()["code"] == "Conflict"
    assert Event.objects.count() == 1
    assert DeadLetter.objects.count() == 1  # a replay never leaves a second letter behind


def test_the_dead_letter_endpoints_are_in_the_openapi_schema(admin_client: APIClient) -> None:
    schema = admin_client.get("/api/schema/?format=json").json()
    assert "get" in schema["paths"]["/api/dead-letters/"]
    replay = schema["paths"]["/api/dead-letters/{id}/replay/"]["post"]
    assert {"200", "400", "401", "403", "404", "409"} <= set(replay["responses"])
