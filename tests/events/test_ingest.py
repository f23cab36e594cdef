from __future__ import annotations

import uuid
from typing import Any

import msgspec
import pytest
import redis
from django.core.management import call_command
from django.db import DatabaseError, connection

from events.backlog import stream_lag
from events.models import DeadLetter, Event
from mlxserve.bus import stream_append_batch, telemetry_config_read
from mlxserve.contract.stream import BATCH_FIELD, ENTRY_FIELD
from tests.factories import T0, append, ingester, make_envelope, pending


@pytest.mark.django_db
def test_it_stores_each_event_once_even_when_sent_twice(redis_client: redis.Redis, settings: Any) -> None:
    first, second = make_envelope("generationStarted"), make_envelope("tokenGenerated")
    append(redis_client, settings, first, second, first)
    outcome = ingester(redis_client, settings).step()
    assert (outcome.stored, outcome.duplicates) == (2, 1)
    append(redis_client, settings, second)
    outcome = ingester(redis_client, settings).step()
    assert (outcome.stored, outcome.duplicates) == (0, 1)
    assert Event.objects.count() == 2
    stored = Event.objects.get(pk=first["id"])
    assert (stored.type, stored.model, stored.source, str(stored.generation_id)) == (
        "generationStarted",
        "llama-3-8b",
        first["source"],
        first["generationId"],
    )
    # The default prompt policy keeps a keyed hash of the prompt, nothing else changes.
    assert stored.payload == {**first["payload"], "prompt": stored.payload["prompt"]}
    assert stored.payload["prompt"].startswith("hmac-sha256:")
    assert pending(redis_client, settings) == 0


@pytest.mark.django_db
def test_invalid_entries_become_dead_letters_and_do_not_block_the_rest(
    redis_client: redis.Redis, settings: Any
) -> None:
    good_a, good_b = make_envelope("modelLoaded"), make_envelope("modelUnloaded")
    append(redis_client, settings, good_a)
    redis_client.xadd(settings.EVENTS_STREAM, {ENTRY_FIELD: b'{"type": "tokenGenerated", "seq": -1}'})
    redis_client.xadd(settings.EVENTS_STREAM, {ENTRY_FIELD: b"\xff not json"})
    redis_client.xadd(settings.EVENTS_STREAM, {b"other": b"foreign producer"})
    append(redis_client, settings, good_b)
    outcome = ingester(redis_client, settings).step()
    assert (outcome.stored, outcome.dead) == (2, 3)
    assert set(Event.objects.values_list("id", flat=True).iterator()) == {
        uuid.UUID(good_a["id"]),
        uuid.UUID(good_b["id"]),
    }
    letters = list(DeadLetter.objects.order_by("stream_id"))
    assert letters[0].error["code"] == "InvalidParams"
    assert letters[0].body == '{"type": "tokenGenerated", "seq": -1}'
    assert letters[1].error["details"]["issues"][0]["code"] == "invalid_json"
    assert "foreign producer" in letters[2].body
    assert pending(redis_client, settings) == 0


@pytest.mark.django_db(transaction=True)
def test_it_acknowledges_only_after_the_database_commit(redis_client: redis.Redis, settings: Any) -> None:
    events = [make_envelope("tokenGenerated", seq=i) for i in range(3)]
    append(redis_client, settings, *events)
    worker = ingester(redis_client, settings)
    # Both event tables away (token events go to the JSON one when their pair's channel id is past
    # 16 bits, as an earlier test's channel 40,000 can leave SQLite's id sequence).
    with connection.cursor() as cursor:
        for table in ("events_token", "events_event"):
            cursor.execute(f"ALTER TABLE {table} RENAME TO {table}_away")
    try:
        with pytest.raises(DatabaseError):
            worker.step()
        # Read, not stored, so not acknowledged: still pending on the stream.
        assert pending(redis_client, settings) == 3
    finally:
        with connection.cursor() as cursor:
            for table in ("events_token", "events_event"):
                cursor.execute(f"ALTER TABLE {table}_away RENAME TO {table}")
    assert Event.objects.count() == 0
    outcome = worker.step()  # the same ingester re-reads what it had pending
    assert outcome.stored == 3
    assert pending(redis_client, settings) == 0


@pytest.mark.django_db
def test_a_restarted_consumer_finishes_what_it_had_read(redis_client: redis.Redis, settings: Any) -> None:
    append(redis_client, settings, make_envelope("error"), make_envelope("error"))
    # A first run reads the entries, then dies before storing them.
    redis_client.xgroup_create(settings.EVENTS_STREAM, settings.EVENTS_CONSUMER_GROUP, id="0")
    redis_client.xreadgroup(settings.EVENTS_CONSUMER_GROUP, "c1", {settings.EVENTS_STREAM: ">"})
    assert pending(redis_client, settings) == 2
    assert ingester(redis_client, settings, consumer="c1").step().stored == 2
    assert pending(redis_client, settings) == 0


@pytest.mark.django_db
def test_entries_left_by_a_dead_consumer_are_claimed_and_stored_once(
    redis_client: redis.Redis, settings: Any
) -> None:
    append(redis_client, settings, *[make_envelope("runtimeStatus") for _ in range(4)])
    redis_client.xgroup_create(settings.EVENTS_STREAM, settings.EVENTS_CONSUMER_GROUP, id="0")
    redis_client.xreadgroup(settings.EVENTS_CONSUMER_GROUP, "dead", {settings.EVENTS_STREAM: ">"})
    survivor = ingester(redis_client, settings, consumer="alive", claim_idle_ms=0)
    assert survivor.step().stored == 4
    assert survivor.step().stored == 0
    assert Event.objects.count() == 4
    assert pending(redis_client, settings) == 0


@pytest.mark.django_db
def test_the_command_drains_the_stream_and_publishes_the_config(
    redis_client: redis.Redis, settings: Any
) -> None:
    append(redis_client, settings, *[make_envelope("tokenGenerated", seq=i) for i in range(1200)])
    call_command("ingest_events", "--exit-when-idle", "--block-ms=10", "--batch-size=500")
    assert Event.objects.count() == 1200
    assert pending(redis_client, settings) == 0
    # Redis keeps nothing across a restart: the ingester republishes the stored config.
    published = telemetry_config_read(client=redis_client, key=settings.TELEMETRY_CONFIG_KEY)
    assert published is not None and published[1].enabled is False


@pytest.mark.django_db
def test_a_batch_entry_is_stored_event_by_event_with_bad_ones_dead_lettered(
    redis_client: redis.Redis, settings: Any
) -> None:
    good = [make_envelope("tokenGenerated", seq=i) for i in range(1, 4)]
    bad = make_envelope("tokenGenerated", seq=-1)
    bodies = [msgspec.json.encode(e) for e in (good[0], bad, good[1], good[2])]
    entry_id = stream_append_batch(redis_client, settings.EVENTS_STREAM, bodies)
    redis_client.xadd(settings.EVENTS_STREAM, {BATCH_FIELD: b"[not json"})
    outcome = ingester(redis_client, settings).step()
    assert (outcome.stored, outcome.dead) == (3, 2)
    assert sorted(Event.objects.values_list("seq", flat=True)) == [1, 2, 3]
    letters = {d.stream_id: d for d in DeadLetter.objects.all()}
    assert letters[f"{entry_id}#1"].error["details"]["field"] == "seq"
    assert [d.error["details"]["issues"][0]["code"] for k, d in letters.items() if "#" not in k] == [
        "invalid_batch"
    ]
    assert pending(redis_client, settings) == 0


@pytest.mark.django_db
def test_workers_are_kept_up_to_date_from_their_events(redis_client: redis.Redis, settings: Any) -> None:
    from events.models import Worker

    append(
        redis_client,
        settings,
        make_envelope(
            "runtimeStatus",
            source="a/w",
            timestamp=T0 + 2000,
            payload={"status": "busy", "modelsLoaded": 1, "activeTasks": 1},
        ),
        make_envelope(
            "runtimeStatus",
            source="a/w",
            timestamp=T0 + 1000,
            payload={"status": "ready", "modelsLoaded": 0, "activeTasks": 0},
        ),  # older: ignored
        make_envelope("tokenGenerated", source="a/w", timestamp=T0 + 3000),
    )
    ingester(redis_client, settings).step()
    worker = Worker.objects.get(source="a/w")
    assert (worker.status, worker.models_loaded, worker.active_tasks) == ("busy", 1, 1)
    assert (worker.last_status_at, worker.last_heard_at) == (T0 + 2000, T0 + 3000)


@pytest.mark.django_db
def test_nul_characters_are_stored_as_replacement_characters_not_a_stuck_ingester(
    redis_client: redis.Redis, settings: Any
) -> None:
    with_nul = make_envelope(
        "tokenGenerated", source="host\u0000/w", payload={"model": "m", "token": "a\u0000b"}
    )
    literal = make_envelope("tokenGenerated", payload={"model": "m", "token": "\\u0000 is text"})
    append(redis_client, settings, with_nul, literal, make_envelope("error"))
    outcome = ingester(redis_client, settings).step()
    assert (outcome.stored, outcome.dead) == (3, 0)
    stored = Event.objects.get(pk=with_nul["id"])
    assert stored.payload["token"] == "a\ufffdb" and stored.source == "host\ufffd/w"
    assert Event.objects.get(pk=literal["id"]).payload["token"] == "\\u0000 is text"


@pytest.mark.django_db
def test_trimming_drops_stored_entries_and_never_pending_or_undelivered_ones(
    redis_client: redis.Redis, settings: Any
) -> None:
    stream, group = settings.EVENTS_STREAM, settings.EVENTS_CONSUMER_GROUP
    append(redis_client, settings, *[make_envelope("error") for _ in range(5)])
    worker = ingester(redis_client, settings)
    assert worker.step().stored == 5
    append(redis_client, settings, *[make_envelope("error") for _ in range(3)])
    redis_client.xreadgroup(group, "slow", {stream: ">"})  # read, not yet stored: pending
    append(redis_client, settings, *[make_envelope("error") for _ in range(2)])  # not even delivered
    assert worker.trim() == 5
    assert redis_client.xlen(stream) == 5
    lag = stream_lag(client=redis_client, stream=stream, group=group)
    assert lag["pending"] == 3 and lag["oldest_pending_ms"] >= 0
    assert lag["undelivered"] == 2 and lag["lag_ms"] >= lag["oldest_undelivered_ms"] >= 0
    # Once everything is stored, all of it may go.
    survivor = ingester(redis_client, settings, consumer="alive", claim_idle_ms=0)
    while survivor.step().stored:
        pass
    assert Event.objects.count() == 10
    assert worker.trim() == 5
    assert redis_client.xlen(stream) == 0
    assert stream_lag(client=redis_client, stream=stream, group=group)["lag_ms"] == 0


@pytest.mark.django_db
def test_dead_letters_can_be_replayed_once_valid(redis_client: redis.Redis, settings: Any) -> None:
    from django.core.management import call_command

    from events.dead_letters import dead_letters_replay

    valid_now = make_envelope("modelLoaded")
    DeadLetter.objects.create(
        stream_id="1-0",
        body=msgspec.json.encode(valid_now).decode(),
        error={"code": "InvalidParams", "message": "from an older contract"},
    )
    still_bad = DeadLetter.objects.create(stream_id="2-0", body='{"type": "nope"}', error={})
    assert dead_letters_replay(DeadLetter.objects.order_by("stream_id")) == (1, 1)
    assert Event.objects.filter(pk=valid_now["id"]).exists()
    still_bad.refresh_from_db()
    assert still_bad.replayed_at is None and still_bad.error["details"]["field"] == "type"
    import io

    out = io.StringIO()
    call_command("replay_dead_letters", stdout=out)  # the replayed one is not stored twice
    assert out.getvalue().strip() == "0 stored, 1 still invalid"
    assert Event.objects.count() == 1


@pytest.mark.django_db
def test_retention_removes_exactly_what_is_past_its_period(settings: Any) -> None:
    from events.models import RetentionPolicy
    from events.retention import events_retention_apply
    from events.storage import events_store

    day = 86_400_000
    now = T0
    assert RetentionPolicy.objects.get(event_type="tokenGenerated").keep_days == 7  # the shipped default
    RetentionPolicy.objects.filter(event_type="modelLoaded").delete()  # no policy: kept for good
    ages: dict[str, list[float]] = {
        "tokenGenerated": [8, 7.01, 6.99, 1],
        "error": [91, 89],
        "modelLoaded": [1000],
    }
    envelopes = [
        make_envelope(event_type, timestamp=int(now - age * day))
        for event_type, age_list in ages.items()
        for age in age_list
    ]
    events_store([(f"{i}-0", msgspec.json.encode(e)) for i, e in enumerate(envelopes)])
    removed = events_retention_apply(now_ms=now, chunk=1)  # chunk 1: the loop runs to the end
    assert removed["tokenGenerated"] == 2 and removed["error"] == 1
    left = sorted((e.type, round((now - e.timestamp) / day, 2)) for e in Event.objects.all())
    assert left == [
        ("error", 89.0),
        ("modelLoaded", 1000.0),
        ("tokenGenerated", 1.0),
        ("tokenGenerated", 6.99),
    ]


@pytest.mark.django_db
def test_dead_letters_and_lag_show_on_the_control_plane_metrics(
    redis_client: redis.Redis, settings: Any
) -> None:
    from django.test import Client
    from prometheus_client.parser import text_string_to_metric_families

    redis_client.xadd(settings.EVENTS_STREAM, {ENTRY_FIELD: b'{"type": "nope"}'})
    redis_client.xadd(settings.EVENTS_STREAM, {ENTRY_FIELD: b"[]"})
    ingester(redis_client, settings).step()
    append(redis_client, settings, make_envelope("error"))
    redis_client.xreadgroup(settings.EVENTS_CONSUMER_GROUP, "slow", {settings.EVENTS_STREAM: ">"})
    text = Client().get("/metrics").content.decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["mlxserve_dead_letters_total"] == 2
    assert samples["mlxserve_dead_letters_waiting"] == 2
    assert samples["mlxserve_ingest_stream_length"] == 3
    assert samples["mlxserve_ingest_pending"] == 1
    assert samples["mlxserve_ingest_oldest_pending_seconds"] >= 0


@pytest.mark.django_db
def test_text_with_tabs_newlines_backslashes_and_quotes_is_stored_as_sent(
    redis_client: redis.Redis, settings: Any
) -> None:
    # On PostgreSQL rows go through COPY's text format, where these characters are special.
    tricky = 'a\tb\nc\rd\\e\\\\f "g" \\N h\u2028'
    envelopes = [
        make_envelope("tokenGenerated", payload={"model": "m\\odel\t1", "token": tricky}),
        make_envelope("error", generationId=None, payload={"error": tricky, "code": "\\N"}),
    ]
    append(redis_client, settings, *envelopes)
    assert ingester(redis_client, settings).step().stored == 2
    token = Event.objects.get(pk=envelopes[0]["id"])
    assert token.payload == {"model": "m\\odel\t1", "token": tricky}
    assert token.model == "m\\odel\t1"
    error = Event.objects.get(pk=envelopes[1]["id"])
    assert error.payload["code"] == "\\N" and error.generation_id is None


@pytest.mark.django_db
def test_the_ingester_logs_when_something_happens_and_rarely_when_idle(
    redis_client: redis.Redis, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import time

    from events.ingest import ingest_run

    def run(seconds: float, *, idle_log_every: float) -> list[str]:
        caplog.clear()
        until = time.monotonic() + seconds
        with caplog.at_level(logging.INFO, logger="mlxserve.ingest"):
            ingest_run(
                ingester(redis_client, settings),
                stopping=lambda: time.monotonic() > until,
                retention_every=0,
                log_every=0.02,
                idle_log_every=idle_log_every,
            )
        return [r.getMessage() for r in caplog.records if "events (" in r.getMessage()]

    assert run(0.5, idle_log_every=300) == []  # nothing happened: nothing said, for 25 windows
    append(
        redis_client, settings, make_envelope("error", timestamp=T0), make_envelope("error", timestamp=T0 + 1)
    )
    lines = run(0.5, idle_log_every=300)
    assert len(lines) == 1 and lines[0].startswith("stored 2 events (") and "stored 2 in all" in lines[0]
    # Still alive, said now and then: at most one line a 0.1 s (1.5 s leaves a loaded machine room).
    idle = run(1.5, idle_log_every=0.1)
    assert 2 <= len(idle) <= 15 and all(line.startswith("idle: stored 0 events") for line in idle)


@pytest.mark.django_db
def test_a_retention_period_the_ingester_cannot_apply_is_never_accepted(settings: Any) -> None:
    from django.test import Client

    from events.fleet import fleet_labels_fold
    from events.models import RetentionPolicy
    from events.retention import events_retention_apply
    from mlxserve.web.roles import ADMIN_GROUP
    from tests.factories import role_user

    role_user("keeper", ADMIN_GROUP, is_staff=True)
    browser = Client()
    assert browser.login(username="keeper", password="keeper-pass-123")
    policy = RetentionPolicy.objects.get(event_type="tokenGenerated")
    url = f"/admin/events/retentionpolicy/{policy.pk}/change/"
    for days, accepted in [(1_000_000, False), (36_501, False), (36_500, True)]:
        page = browser.post(url, {"event_type": "tokenGenerated", "keep_days": days})
        assert (page.status_code == 302) is accepted, days
        if not accepted:
            assert "Ensure this value is less than or equal to 36500." in page.content.decode()
    assert RetentionPolicy.objects.get(pk=policy.pk).keep_days == 36_500
    # A row written past the bound behind the admin's back (SQL) is applied at the bound: the
    # hourly pass runs, it does not raise OverflowError and take the ingester down.
    RetentionPolicy.objects.filter(pk=policy.pk).update(keep_days=1_000_000)
    assert events_retention_apply(now_ms=T0)["tokenGenerated"] == 0
    assert fleet_labels_fold() == 0


@pytest.mark.django_db
def test_a_consumer_group_lost_with_redis_is_made_again(redis_client: redis.Redis, settings: Any) -> None:
    from events.ingest import PAUSING_ERRORS

    worker = ingester(redis_client, settings)
    append(redis_client, settings, make_envelope(timestamp=T0))
    worker.step()
    redis_client.delete(settings.EVENTS_STREAM)  # what a restart of a Redis that keeps nothing leaves
    append(redis_client, settings, after := make_envelope(timestamp=T0 + 1))
    with pytest.raises(PAUSING_ERRORS):
        worker.step()  # NOGROUP: the loop waits a moment...
    worker.step()  # ...and the group is made again
    assert Event.objects.filter(pk=after["id"]).exists()


@pytest.mark.django_db
def test_the_ingester_reads_a_worker_hosts_stream_from_when_it_is_made(
    redis_client: redis.Redis, settings: Any
) -> None:
    # `create_worker_host` adds a row; the running ingester reads that host's stream from its next
    # five-second refresh (here its first turn), and the control plane's lag figures count it.
    from django.test import Client
    from prometheus_client.parser import text_string_to_metric_families

    from events.ingest import host_stream, ingest_run
    from events.models import WorkerHost

    def samples() -> dict[str, float]:
        text = Client().get("/metrics").content.decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    WorkerHost.objects.create(name="mac-a")
    worker = ingester(redis_client, settings)
    assert ingest_run(worker, stopping=lambda: False, exit_when_idle=True, retention_every=0) == (0, 0)
    theirs = make_envelope(source="mac-a/w1", timestamp=T0)
    stream_append_batch(
        redis_client, host_stream(settings.EVENTS_STREAM, "mac-a"), [msgspec.json.encode(theirs)]
    )
    before = samples()
    assert (before["mlxserve_ingest_stream_length"], before["mlxserve_ingest_undelivered"]) == (1, 1)
    assert ingest_run(worker, stopping=lambda: False, exit_when_idle=True, retention_every=0) == (1, 0)
    assert Event.objects.filter(pk=theirs["id"]).exists()
    assert samples()["mlxserve_ingest_undelivered"] == 0


@pytest.mark.django_db
def test_exit_when_idle_goes_on_while_entries_wait_undelivered(
    redis_client: redis.Redis, settings: Any
) -> None:
    """A read that comes back empty (on a loaded host) is not the end while entries wait: the
    run stores them all before it exits."""
    from events.ingest import EventIngester, ingest_run
    from events.storage import StoreOutcome

    class FirstReadEmpty(EventIngester):
        empty = True

        def step(self) -> StoreOutcome:
            if self.empty:
                self.empty = False
                return StoreOutcome()
            return super().step()

    events = [make_envelope(timestamp=T0 + i, seq=i + 1) for i in range(3)]
    append(redis_client, settings, *events)
    worker = ingester(redis_client, settings, kind=FirstReadEmpty)
    assert ingest_run(worker, stopping=lambda: False, exit_when_idle=True, retention_every=0) == (3, 0)
    assert Event.objects.count() == 3
