"""Time partitions: made ahead, an event with no partition still stored (then moved into the one
made for it), retention that drops whole days and leaves no dead tuple, the key (id, timestamp),
and the upgrade of a table holding events. PostgreSQL partitions; SQLite keeps plain tables and
answers the same (every test runs on both, the partitions' own checks on PostgreSQL)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec
import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone
from rest_framework.test import APIClient

from events.models import EventRecord, RetentionPolicy, TokenEvent
from events.partitions import partitions_ensure, partitions_of
from events.retention import events_retention_apply
from events.storage import events_store
from tests.factories import T0, make_envelope

DAY = 86_400_000
WEEK = 7 * DAY


def postgresql() -> bool:
    return connection.vendor == "postgresql"


def store(*envelopes: dict[str, Any]) -> None:
    events_store([(f"{i}-0", msgspec.json.encode(e)) for i, e in enumerate(envelopes)])


def where(table: str, event_id: str) -> list[str]:
    """The partitions holding rows of this id (PostgreSQL)."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT tableoid::regclass::text FROM {table} WHERE id = %s ORDER BY 1", [event_id])
        return [row[0] for row in cursor.fetchall()]


def dead_tuples(table: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        cursor.execute("SELECT dead_tuple_count FROM pgstattuple(%s)", [table])
        row = cursor.fetchone()
    return int(row[0]) if row else 0


def listed(client: APIClient, **params: str) -> list[tuple[str, int]]:
    body = client.get("/api/events/", {**params, "limit": "1000"}).json()
    return [(e["type"], e["timestamp"]) for e in body["results"]]


@pytest.mark.django_db
def test_an_event_with_no_partition_is_stored_and_moved_into_the_partition_made_for_it(
    reader_client: APIClient,
) -> None:
    token = make_envelope("tokenGenerated", timestamp=T0 + 3_600_000)
    started = make_envelope("generationStarted", timestamp=T0)
    store(token, started)
    before = reader_client.get("/api/events/").content
    assert listed(reader_client) == [("tokenGenerated", T0 + 3_600_000), ("generationStarted", T0)]

    made = partitions_ensure(now_ms=T0)

    assert reader_client.get("/api/events/").content == before
    if connection.vendor != "postgresql":
        assert made == []  # plain tables
        return
    # The day of T0 and the two after it; the JSON events' weeks are the partition of the time
    # before partitions (this database was made after T0).
    assert made == ["events_token_20251126", "events_token_20251127", "events_token_20251128"]
    assert where("events_token", token["id"]) == ["events_token_20251126"]
    assert where("events_event", started["id"]) == ["events_event_before"]
    assert partitions_ensure(now_ms=T0) == []  # made once


@pytest.mark.django_db
def test_retention_drops_whole_days_of_tokens_and_leaves_no_dead_tuple(reader_client: APIClient) -> None:
    assert RetentionPolicy.objects.get(event_type="tokenGenerated").keep_days == 7
    now = T0 + 12 * 3_600_000  # noon: today's tokens and the 7 days' edge are mid-day
    for day in range(10, -1, -1):
        partitions_ensure(now_ms=now - day * DAY)
    ages = [9.5, 8.2, 7.6, 7.4, 6.9, 1]
    store(
        *(
            make_envelope("tokenGenerated", timestamp=int(now - age * DAY), seq=i)
            for i, age in enumerate(ages)
        )
    )

    dead_before = {p.name: dead_tuples(p.name) for p in partitions_of("events_token")} if postgresql() else {}
    removed = events_retention_apply(now_ms=now, chunk=1)

    # Past 7 days, whole days: the day 7.4 days ago began before the cutoff's day and is kept
    # with it (a token is kept 7 days, and up to a day more).
    assert [round((now - ts) / DAY, 1) for _, ts in listed(reader_client)] == [1, 6.9, 7.4]
    if connection.vendor != "postgresql":
        assert removed["tokenGenerated"] == 3
        return
    assert removed["tokenGenerated"] == 0  # nothing deleted: three days dropped
    days = [p.name for p in partitions_of("events_token") if not p.default]
    assert days[0] == "events_token_20251119"  # the cutoff's day, the oldest kept
    for partition in partitions_of("events_token"):  # none left by retention
        assert dead_tuples(partition.name) == dead_before[partition.name], partition.name


@pytest.mark.django_db
def test_a_week_of_json_events_is_dropped_once_every_type_in_it_is_past_its_policy(
    reader_client: APIClient,
) -> None:
    if connection.vendor != "postgresql":
        # SQLite: the same policies delete the same rows (row by row; tested in test_ingest).
        return
    RetentionPolicy.objects.filter(event_type="modelLoaded").delete()  # kept for good
    [before] = [p for p in partitions_of("events_event") if p.lower is None and not p.default]
    start = before.upper or 0
    for week in range(3):
        partitions_ensure(now_ms=start + week * WEEK)
    weeks = [p for p in partitions_of("events_event") if p.lower is not None and not p.default]
    starts = [p.lower or 0 for p in weeks]
    assert [(p.upper or 0) - (p.lower or 0) for p in weeks] == [WEEK] * len(weeks) and len(weeks) >= 3
    rows = [
        ("runtimeStatus", starts[0] + 1),  # 30 days
        ("generationStarted", starts[0] + 2),  # 90 days
        ("runtimeStatus", starts[1] + 1),
        ("modelLoaded", starts[2] + 1),  # no policy
        ("runtimeStatus", starts[2] + 2),
    ]
    for event_type, timestamp in rows:
        EventRecord.objects.create(
            id=uuid.uuid4(),
            type=event_type,
            timestamp=timestamp,
            source="mac-1",
            seq=0,
            payload={},
            ingested_at=timezone.now(),
        )

    events_retention_apply(now_ms=starts[2] + WEEK + 31 * DAY)

    names = [p.name for p in partitions_of("events_event")]
    # The first week keeps its generationStarted (90 days), the second went whole (all 30-day
    # heartbeats), the third keeps its modelLoaded (no policy) and lost its heartbeat, deleted.
    assert weeks[0].name in names and weeks[1].name not in names and weeks[2].name in names
    assert before.name not in names  # empty: gone
    assert sorted(EventRecord.objects.values_list("type", flat=True)) == ["generationStarted", "modelLoaded"]


@pytest.mark.django_db
def test_an_id_is_stored_once_whatever_its_time_and_partition(reader_client: APIClient) -> None:
    started = make_envelope("generationStarted", timestamp=T0)
    store(started)
    store(started, started)  # redelivered, twice
    # Reused at another time, three days on: the key (id, timestamp) alone would let it in.
    store({**started, "timestamp": T0 + 3 * DAY})
    assert listed(reader_client) == [("generationStarted", T0)]
    assert EventRecord.objects.filter(id=started["id"]).count() == 1


@pytest.mark.django_db(transaction=True)
def test_upgrading_a_table_holding_events_keeps_every_answer(reader_client: APIClient) -> None:
    executor = MigrationExecutor(connection)
    executor.migrate([("events", "0019_token_events")])
    try:
        # The table as it was: rows the ingester of the day wrote (the ORM writes the same columns).
        now = timezone.now()
        for n in range(300):
            EventRecord.objects.create(
                id=uuid.uuid4(),
                type="generationStarted" if n % 10 == 0 else "runtimeStatus",
                timestamp=T0 + n * 1000,
                source=f"mac-{n % 3}",
                seq=n,
                model="m",
                payload={"model": "m", "n": n},
                ingested_at=now,
            )
        answers = [reader_client.get("/api/events/", params).content for params in ({}, {"source": "mac-1"})]
        started = time.perf_counter()
        executor = MigrationExecutor(connection)
        executor.migrate([("events", "0020_time_partitions")])
        assert time.perf_counter() - started < 30
    finally:
        MigrationExecutor(connection).migrate(MigrationExecutor(connection).loader.graph.leaf_nodes("events"))
    assert [reader_client.get("/api/events/", p).content for p in ({}, {"source": "mac-1"})] == answers
    # And it stores on: a new event, and a redelivery of an old one stored once.
    old = EventRecord.objects.order_by("timestamp").first()
    assert old is not None
    store(make_envelope("generationStarted", timestamp=T0 + 400_000))
    assert EventRecord.objects.count() == 301
    if connection.vendor == "postgresql":
        assert {p.name for p in partitions_of("events_event")} >= {
            "events_event_before",
            "events_event_default",
        }
        assert where("events_event", str(old.id)) == ["events_event_before"]
    assert not TokenEvent.objects.exists()
