"""What a buggy or hostile producer can send, through the API and straight into the stream.

Each poison is followed by a good event, which must be stored with nothing left pending:
no input stops ingestion, every accepted event is stored or kept as a dead letter.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest
import redis
from django.db import connection
from rest_framework.test import APIClient

from events.ingest import EventIngester
from events.models import DeadLetter, Event, FleetCounter, Worker
from mlxserve.contract.stream import BATCH_FIELD, ENTRY_FIELD
from mlxserve.web.roles import ADMIN_GROUP
from tests.factories import append, ingester, make_envelope, pending, role_user, token_client

pytestmark = pytest.mark.django_db

FUTURE = "Timestamp is in the future (more than 10 minutes ahead of the receiving clock)"
SECONDS = "Timestamp must be epoch milliseconds (2000-01-01 or later)"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def drain(worker: EventIngester, turns: int = 5) -> None:
    for _ in range(turns):
        worker.step()


def assert_a_good_event_still_goes_through(redis_client: redis.Redis, settings: Any) -> None:
    good = make_envelope("error", timestamp=now_ms())
    append(redis_client, settings, good)
    drain(ingester(redis_client, settings))
    assert Event.objects.filter(pk=good["id"]).exists()
    assert pending(redis_client, settings) == 0


def xadd(redis_client: redis.Redis, settings: Any, fields: dict[bytes, bytes]) -> str:
    entry_id = redis_client.xadd(settings.EVENTS_STREAM, fields)  # type: ignore[arg-type]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


@pytest.fixture
def admin_client() -> APIClient:
    return token_client(role_user("boss", ADMIN_GROUP, is_staff=True))


# -- numbers that the schema accepts fit the columns ------------------------------------


def test_the_largest_counts_a_runtime_status_may_carry_are_stored(
    redis_client: redis.Redis, settings: Any, admin_client: APIClient
) -> None:
    status = make_envelope(
        "runtimeStatus",
        source="mac-1/w1",
        timestamp=now_ms(),
        payload={"status": "busy", "modelsLoaded": 1_099_511_627_776, "activeTasks": 2**63 - 1},
    )
    assert admin_client.post("/api/events/", status, format="json").status_code == 202
    drain(ingester(redis_client, settings))
    worker = Worker.objects.get(source="mac-1/w1")
    assert (worker.models_loaded, worker.active_tasks) == (1_099_511_627_776, 2**63 - 1)
    assert not DeadLetter.objects.exists()
    assert_a_good_event_still_goes_through(redis_client, settings)


def test_an_absurd_duration_does_not_overflow_the_fleet_histogram_for_everyone_after(
    redis_client: redis.Redis, settings: Any
) -> None:
    def completed(duration_ms: float) -> dict[str, Any]:
        return make_envelope(
            "generationCompleted",
            timestamp=now_ms(),
            payload={"model": "m", "tokensGenerated": 1, "durationMs": duration_ms},
        )

    append(redis_client, settings, completed(1.7e308), completed(1.7e308), completed(1000))
    drain(ingester(redis_client, settings))
    assert Event.objects.filter(type="generationCompleted").count() == 3
    count = FleetCounter.objects.get(name="mlxserve_fleet_generation_duration_seconds_count")
    assert count.value == 3
    assert_a_good_event_still_goes_through(redis_client, settings)


def test_a_row_the_database_refuses_becomes_a_dead_letter_and_the_rest_of_the_batch_is_stored(
    redis_client: redis.Redis, settings: Any
) -> None:
    # A real refusal from the database, on a table besides the events' own (the worker
    # rows): the kind a column bound or a constraint added by an operator would give.
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("ALTER TABLE events_worker ADD CONSTRAINT no_poison CHECK (source <> 'poison/w')")
        else:
            cursor.execute(
                "CREATE TRIGGER no_poison BEFORE INSERT ON events_worker WHEN NEW.source = 'poison/w' "
                "BEGIN SELECT RAISE(ABORT, 'no_poison'); END"
            )
    batch = [make_envelope("error", source=f"host-{i}/w", timestamp=now_ms()) for i in range(7)]
    batch[4] = make_envelope("error", source="poison/w", timestamp=now_ms())
    redis_client.xadd(settings.EVENTS_STREAM, {BATCH_FIELD: msgspec.json.encode(batch)})
    outcome = ingester(redis_client, settings).step()
    assert (outcome.stored, outcome.dead) == (6, 1)
    assert set(map(str, Event.objects.values_list("id", flat=True))) == {
        e["id"] for i, e in enumerate(batch) if i != 4
    }
    assert not Worker.objects.filter(source="poison/w").exists()
    letter = DeadLetter.objects.get()
    assert str(letter.event_id) == batch[4]["id"]
    assert letter.error["code"] == "StorageFailed"
    assert "no_poison" in letter.error["message"]
    # What the batch wrote besides the rows counts the six stored events, not the refused one.
    ingested = FleetCounter.objects.get(name="mlxserve_events_ingested_total")
    assert ingested.value == 6
    assert_a_good_event_still_goes_through(redis_client, settings)


# -- garbage in the stream -----------------------------------------------------------------


def test_garbage_written_straight_into_the_stream_is_dead_lettered_and_the_good_events_stored(
    redis_client: redis.Redis, settings: Any
) -> None:
    good = [make_envelope("tokenGenerated", seq=i, timestamp=now_ms()) for i in range(3)]
    far_future = make_envelope("error", timestamp=now_ms() + 86_400_000)
    in_seconds = make_envelope("error", timestamp=now_ms() // 1000)
    deep_metadata = make_envelope("error", timestamp=now_ms())
    deep_body = msgspec.json.encode(deep_metadata).replace(
        b'"payload":{', b'"payload":{"metadata":{"a":' + deep(100_000) + b"},", 1
    )
    nested_100 = msgspec.json.encode(deep_metadata).replace(
        b'"payload":{', b'"payload":{"metadata":{"a":' + deep(100) + b"},", 1
    )
    garbage = {
        "not UTF-8": {ENTRY_FIELD: b'{"id": "\xff\xfe"}'},
        "nested 100,000 deep": {ENTRY_FIELD: deep(100_000)},
        "metadata nested 100,000 deep": {ENTRY_FIELD: deep_body},
        "metadata nested 100 deep": {ENTRY_FIELD: nested_100},
        "a field the format does not have": {b"x": b"hello"},
        "a batch that is an object": {BATCH_FIELD: b'{"a": 1}'},
        "a batch that is not JSON": {BATCH_FIELD: b"[{"},
        "a future event": {ENTRY_FIELD: msgspec.json.encode(far_future)},
        "an event in seconds": {ENTRY_FIELD: msgspec.json.encode(in_seconds)},
        "an integer of 5,000 digits": {ENTRY_FIELD: b"1" * 5000},
        "a BOM": {ENTRY_FIELD: b"\xef\xbb\xbf" + msgspec.json.encode(make_envelope("error"))},
    }
    for fields in garbage.values():
        xadd(redis_client, settings, fields)  # type: ignore[arg-type]
    mixed = (
        b"["
        + b",".join(
            [
                msgspec.json.encode(good[0]),
                b"42",
                b'"text"',
                b"null",
                msgspec.json.encode({**good[1], "type": "nope"}),
                deep(100_000),
                b'"\xff"',
                msgspec.json.encode(good[1]),
                msgspec.json.encode(good[2]),
            ]
        )
        + b"]"
    )
    mixed_id = xadd(redis_client, settings, {BATCH_FIELD: mixed})

    drain(ingester(redis_client, settings))
    assert pending(redis_client, settings) == 0
    assert set(map(str, Event.objects.values_list("id", flat=True))) == {e["id"] for e in good}
    # Every entry of garbage is a dead letter, and each bad item of the mixed batch one of its own.
    assert DeadLetter.objects.count() == len(garbage) + 6
    mixed_letters = DeadLetter.objects.filter(stream_id__startswith=f"{mixed_id}#")
    assert sorted(int(d.stream_id.split("#")[1]) for d in mixed_letters) == [1, 2, 3, 4, 5, 6]
    messages = {d.error["details"]["issues"][0]["message"] for d in DeadLetter.objects.all()}
    assert {FUTURE, SECONDS, "Nested too deeply", "Invalid JSON: not UTF-8 text"} <= messages
    future_letter = DeadLetter.objects.get(event_id=far_future["id"])
    assert future_letter.error["details"]["field"] == "timestamp"
    assert_a_good_event_still_goes_through(redis_client, settings)


def test_an_entry_that_keeps_failing_is_dead_lettered_after_a_few_deliveries(
    redis_client: redis.Redis, settings: Any
) -> None:
    # An entry on which ingesters died again and again (read, never acknowledged): each
    # read of a pending entry counts one more delivery in the consumer group.
    poison = make_envelope("error", timestamp=now_ms())
    append(redis_client, settings, poison)
    worker = ingester(redis_client, settings, consumer="c1")
    redis_client.xgroup_create(settings.EVENTS_STREAM, settings.EVENTS_CONSUMER_GROUP, id="0")
    redis_client.xreadgroup(settings.EVENTS_CONSUMER_GROUP, "c1", {settings.EVENTS_STREAM: ">"})
    for _ in range(worker.max_deliveries):
        redis_client.xreadgroup(settings.EVENTS_CONSUMER_GROUP, "c1", {settings.EVENTS_STREAM: "0"})
    outcome = worker.step()
    assert (outcome.stored, outcome.dead) == (0, 1)
    letter = DeadLetter.objects.get()
    assert str(letter.event_id) == poison["id"]
    assert letter.error["code"] == "DeliveryFailed"
    assert "deliveries" in letter.error["message"]
    assert pending(redis_client, settings) == 0
    # Kept for replay: it was never the event's fault here, so a replay stores it.
    from events.dead_letters import dead_letter_replay

    dead_letter_replay(letter)
    assert Event.objects.filter(pk=poison["id"]).exists()
    assert_a_good_event_still_goes_through(redis_client, settings)


def test_a_database_that_is_unusable_is_waited_for_and_never_dead_letters(
    redis_client: redis.Redis, settings: Any
) -> None:
    from django.db import DatabaseError

    events = [make_envelope("error", timestamp=now_ms()) for _ in range(3)]
    append(redis_client, settings, *events)
    worker = ingester(redis_client, settings)
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE events_event RENAME TO events_event_away")
    try:
        for _ in range(3 * worker.max_deliveries):
            with pytest.raises(DatabaseError):
                worker.step()
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE events_event_away RENAME TO events_event")
    # While it could not store, the ingester did not read the entries again: no delivery counted.
    rows = redis_client.xpending_range(settings.EVENTS_STREAM, settings.EVENTS_CONSUMER_GROUP, "-", "+", 10)
    assert [row["times_delivered"] for row in rows] == [1, 1, 1]
    drain(worker)
    assert Event.objects.count() == 3
    assert not DeadLetter.objects.exists()
    assert pending(redis_client, settings) == 0


# -- the API ---------------------------------------------------------------------------------


def test_timestamps_in_seconds_or_the_future_are_refused_with_a_message_that_says_so(
    admin_client: APIClient,
) -> None:
    for timestamp, message in ((now_ms() // 1000, SECONDS), (now_ms() + 3_600_000, FUTURE)):
        response = admin_client.post("/api/events/", make_envelope(timestamp=timestamp), format="json")
        assert response.status_code == 400
        assert response.json()["details"]["issues"] == [
            {
                "path": ["timestamp"],
                "message": message,
                "code": response.json()["details"]["issues"][0]["code"],
            }
        ]
        assert response.json()["message"] == f"Validation error on field 'timestamp': {message}"


def test_a_field_name_repeated_in_an_entry_loses_no_value_silently(
    redis_client: redis.Redis, settings: Any
) -> None:
    # redis-py's dict would keep only the last value: here both are read, and as the entry is
    # not of the format (one 'e' or one 'b'), each is kept as a dead letter, replayable.
    first, second = make_envelope("error", timestamp=now_ms()), make_envelope("error", timestamp=now_ms())
    entry = redis_client.execute_command(
        "XADD", settings.EVENTS_STREAM, "*", "e", msgspec.json.encode(first), "e", msgspec.json.encode(second)
    ).decode()
    drain(ingester(redis_client, settings))
    letters = {letter.stream_id: letter for letter in DeadLetter.objects.all()}
    assert set(letters) == {f"{entry}@0", f"{entry}@1"}
    assert {str(letter.event_id) for letter in letters.values()} == {first["id"], second["id"]}
    assert {letter.error["details"]["issues"][0]["code"] for letter in letters.values()} == {"repeated_field"}
    assert (
        letters[f"{entry}@0"]
        .error["message"]
        .startswith("Validation error on field 'root': Repeated stream entry field 'e'")
    )
    from events.dead_letters import dead_letter_replay

    for letter in letters.values():
        dead_letter_replay(letter)
    assert Event.objects.filter(pk__in=[first["id"], second["id"]]).count() == 2
    assert_a_good_event_still_goes_through(redis_client, settings)


def test_entries_deleted_while_pending_are_dead_lettered_logged_and_counted(
    redis_client: redis.Redis, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A producer trims the stream to nothing (XADD ... MAXLEN 0) while entries are pending on a
    # consumer that died: neither its own re-read nor another ingester's claim passes over them.
    held = [make_envelope("error", timestamp=now_ms()) for _ in range(3)]
    append(redis_client, settings, *held)
    redis_client.xgroup_create(settings.EVENTS_STREAM, settings.EVENTS_CONSUMER_GROUP, id="0")
    read: Any = redis_client.xreadgroup(
        settings.EVENTS_CONSUMER_GROUP, "dead", {settings.EVENTS_STREAM: ">"}, count=2
    )
    lost_to_claim = [entry_id.decode() for entry_id, _ in read[0][1]]
    redis_client.xreadgroup(settings.EVENTS_CONSUMER_GROUP, "c1", {settings.EVENTS_STREAM: ">"})
    entries: Any = redis_client.xrange(settings.EVENTS_STREAM)
    lost_to_self = entries[2][0]
    redis_client.execute_command("XADD", settings.EVENTS_STREAM, "MAXLEN", "0", "*", "e", "x")
    assert redis_client.xlen(settings.EVENTS_STREAM) == 0
    with caplog.at_level("ERROR"):
        drain(ingester(redis_client, settings, consumer="c1", claim_idle_ms=0))
    letters = {letter.stream_id: letter for letter in DeadLetter.objects.all()}
    assert set(letters) == {*lost_to_claim, lost_to_self.decode()}
    assert {letter.error["code"] for letter in letters.values()} == {"EntryDeleted"}
    assert sum("was deleted before it was stored" in r.getMessage() for r in caplog.records) == 3
    assert pending(redis_client, settings) == 0
    from django.test import Client

    from events.metrics import DEAD_LETTERS

    role_user("scraper", ADMIN_GROUP, is_staff=True)
    metrics = Client().get("/metrics").content.decode()
    assert f"{DEAD_LETTERS[0]}_total 3.0" in metrics or f"{DEAD_LETTERS[0]} 3.0" in metrics


def test_a_redelivered_entry_adds_no_second_dead_letter(redis_client: redis.Redis, settings: Any) -> None:
    # Stored, then the acknowledgement lost (or a second ingester claims it): read and stored again.
    bad = make_envelope("error", timestamp=now_ms(), payload={"error": ""})
    append(redis_client, settings, bad)
    drain(ingester(redis_client, settings, consumer="c1"))
    entry = DeadLetter.objects.get().stream_id
    from events.storage import events_store

    stream: Any = redis_client.xrange(settings.EVENTS_STREAM)
    outcome = events_store([(entry, stream[0][1][ENTRY_FIELD])])
    assert outcome.dead == 1  # found again...
    assert DeadLetter.objects.count() == 1  # ...and kept once


@pytest.mark.parametrize("mode", ["hash", "drop", "truncate"])
def test_dead_letters_keep_prompts_only_as_the_prompt_policy_allows(
    redis_client: redis.Redis, settings: Any, mode: str
) -> None:
    from events.models import PromptPolicy

    PromptPolicy.objects.update_or_create(pk=1, defaults={"mode": mode, "truncate_chars": 4})
    secret = "my card number is 4111 1111 1111 1111"
    invalid = make_envelope(
        "generationStarted", timestamp=now_ms(), payload={"model": "", "prompt": secret, "maxTokens": 4}
    )
    unknown_field = make_envelope(
        "generationStarted", timestamp=now_ms(), payload={"model": "m", "prompt": secret}
    )
    unknown_field["extra"] = 1
    entries = [
        xadd(redis_client, settings, {ENTRY_FIELD: msgspec.json.encode(invalid)}),
        xadd(redis_client, settings, {BATCH_FIELD: b"[" + msgspec.json.encode(unknown_field) + b"]"}),
        xadd(redis_client, settings, {b"zzz": f'{{"prompt": "{secret}"'.encode()}),  # not JSON at all
        xadd(redis_client, settings, {ENTRY_FIELD: ("\x01" * 3 + secret).encode()}),  # no 'prompt' named
    ]
    drain(ingester(redis_client, settings))
    by_entry = {letter.stream_id.split("#")[0]: letter for letter in DeadLetter.objects.all()}
    letters = [by_entry[entry] for entry in entries]
    for letter in letters[:3]:
        # "4111 1111", with its space: ids, timestamps and digests hold digits, never a space between.
        assert "4111 1111" not in letter.body, letter.body
        assert "4111 1111" not in str(letter.error)
    kept = {"hash": "hmac-sha256:", "drop": '"prompt":""', "truncate": '"prompt":"my c"'}[mode]
    assert kept in letters[0].body and kept in letters[1].body
    assert "withheld" in letters[2].body
    assert str(letters[0].event_id) == invalid["id"]
    # A body with no prompt key in it is kept as sent: only prompts are the policy's business.
    assert secret in letters[3].body


def test_an_event_the_api_accepted_is_stored_whatever_the_web_hosts_clock_says(
    admin_client: APIClient, redis_client: redis.Redis, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The web host's clock runs 15 minutes ahead. The API checks "not in the future" against the
    # clock of the Redis that receives the event (the one the ingester checks it against again),
    # so what it answers 202 is stored, never turned into an in_future dead letter.
    from events import intake
    from mlxserve.redis_conn import RedisClock

    true_now = now_ms()
    monkeypatch.setattr(intake, "redis_clock", RedisClock())
    soon, too_far = (
        make_envelope(timestamp=true_now + 9 * 60_000),
        make_envelope(timestamp=true_now + 20 * 60_000),
    )
    ahead = time.time_ns() + 15 * 60 * 1_000_000_000
    with monkeypatch.context() as skewed:
        skewed.setattr(time, "time_ns", lambda: ahead + (time.perf_counter_ns() % 1_000_000))
        accepted = admin_client.post("/api/events/", soon, format="json")
        refused = admin_client.post("/api/events/", too_far, format="json")
        batch = admin_client.post("/api/events/", [too_far, make_envelope(timestamp=true_now)], format="json")
    assert accepted.status_code == 202
    assert refused.status_code == 400 and refused.json()["details"]["issues"][0]["message"] == FUTURE
    assert batch.status_code == 207 and len(batch.json()["accepted"]) == 1
    drain(ingester(redis_client, settings))
    assert Event.objects.filter(pk=soon["id"]).exists()
    assert Event.objects.count() == 2 and not DeadLetter.objects.exists()


def test_the_ingester_checks_the_future_against_when_redis_received_the_entry(settings: Any) -> None:
    from events.storage import events_store

    true_now = now_ms()
    received_later = f"{true_now + 5 * 60_000}-0"  # Redis's clock ahead of this host's
    forged = f"{true_now + 10 * 24 * 3_600_000}-0"  # an entry id set by hand, days ahead
    cases = [
        (received_later, make_envelope(timestamp=true_now + 14 * 60_000), True),
        (f"{true_now}-1", make_envelope(timestamp=true_now + 14 * 60_000), False),
        (forged, make_envelope(timestamp=true_now + 19 * 60_000), True),
        (forged, make_envelope(timestamp=true_now + 21 * 60_000), False),
        ("7-0", make_envelope(timestamp=true_now + 9 * 60_000), True),  # not a time: this host's clock
    ]
    for index, (entry_id, envelope, stored) in enumerate(cases):
        outcome = events_store([(entry_id.replace("-0", f"-{index}"), msgspec.json.encode(envelope))])
        assert outcome.stored == int(stored), (entry_id, envelope["timestamp"] - true_now)


def test_an_entry_past_the_size_bound_is_kept_unread_and_the_stream_goes_on(
    redis_client: redis.Redis, settings: Any
) -> None:
    from mlxserve.contract.stream import ENTRY_MAX_BYTES

    huge = b"[" + b'"x",' * (ENTRY_MAX_BYTES // 4) + b'"x"]'
    entry = xadd(redis_client, settings, {BATCH_FIELD: huge})
    drain(ingester(redis_client, settings))
    letter = DeadLetter.objects.get()
    assert letter.stream_id == entry and letter.error["code"] == "EntryTooLarge"
    assert len(letter.body) == 65536
    assert_a_good_event_still_goes_through(redis_client, settings)


def test_past_the_streams_bytes_in_redis_posts_get_503(admin_client: APIClient, settings: Any) -> None:
    settings.STREAM_BACKLOG_BYTES = 1
    assert (
        admin_client.post("/api/events/", make_envelope(timestamp=now_ms()), format="json").status_code == 202
    )
    refused = admin_client.post("/api/events/", make_envelope(timestamp=now_ms()), format="json")
    assert refused.status_code == 503 and refused["Retry-After"] == "5"
    assert refused.json()["message"].startswith("The event stream is full: the stream takes ")
