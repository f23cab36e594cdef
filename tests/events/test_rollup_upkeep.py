"""The stats rollups kept right: exact under redelivery and out-of-order batches, first tokens
counted once whenever they arrive, rebuilt by rollup_events for what was stored before, dropped
by retention."""

from __future__ import annotations

import random
import uuid
from io import StringIO
from typing import Any

import msgspec
import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from events.models import RetentionPolicy, StatsCoverage, StatsDay, StatsMinute, StatsRollup
from events.retention import events_retention_apply
from events.rollups import (
    HOUR_MS,
    MINUTE_MS,
)
from events.storage import events_store
from tests.events.rollup_data import (
    check,
    fleet_day,
    ingest,
    rollups,
    rollups_deleted,
    stats,
    truth,
    within_one_bucket,
)
from tests.factories import T0, make_envelope

pytestmark = pytest.mark.django_db


def test_rollup_events_rebuilds_the_days_from_their_hours(days: list[dict[str, Any]]) -> None:
    by_ingest = rollups()
    rollups_deleted()
    from events.rollups import rollups_rebuild

    assert rollups_rebuild(everything=True) == 60
    assert rollups() == by_ingest


def test_redelivery_and_batch_order_do_not_change_the_rollups(db: Any) -> None:
    rng = random.Random(3)
    events = fleet_day(rng, hours=2)
    ingest(events, random.Random(1), redeliver=False)
    once = rollups()
    rollups_deleted()
    # Everything again, in another order, with repeats: a fresh table must come out the same.
    from events.models import EventRecord, TokenEvent

    EventRecord.objects.all().delete()
    TokenEvent.objects.all().delete()
    ingest(events, random.Random(2), redeliver=True)
    ingest(events, random.Random(4), redeliver=False)  # every entry redelivered once more
    assert rollups() == once
    counted = sum(n for _, _, series, _, n in once["hour"] if series.startswith("events:"))
    assert counted == len(events)


def test_rollup_events_builds_the_hours_stored_before_rollups_existed(
    day: list[dict[str, Any]], reader_client: APIClient
) -> None:
    built_by_ingest = rollups()
    # As after the upgrade's migration: no rollups, coverage from an hour after the data.
    rollups_deleted()
    StatsCoverage.objects.update_or_create(
        pk=1, defaults={"covered_from": T0 + 7 * HOUR_MS, "minutes_from": T0 + 7 * HOUR_MS}
    )
    since, until = T0, T0 + 6 * HOUR_MS - 1
    before = stats(reader_client, since, until)
    check(before, truth(day, since, until), exact=True)  # read from the events meanwhile

    out, err = StringIO(), StringIO()
    call_command("rollup_events", stdout=out, stderr=err)
    assert "Built 7 hours of rollups" in out.getvalue()
    assert "stats read rollups for every stored hour" in out.getvalue()
    assert "hours to go" in err.getvalue()  # progress while it runs
    assert (StatsCoverage.load().covered_from, StatsCoverage.load().minutes_from) == (0, 0)
    assert rollups() == built_by_ingest
    check(stats(reader_client, since, until), truth(day, since, until), exact=False)


def test_rollup_events_builds_the_minutes_of_hours_rolled_up_before_minutes_existed(
    day: list[dict[str, Any]], reader_client: APIClient
) -> None:
    """After the upgrade that brought minute rollups: hourly ones cover every hour, minute
    ones none; ``rollup_events`` builds the minutes (and the hours again, the same)."""
    by_ingest = rollups()
    assert len({m for m, *_ in by_ingest["minute"]}) > 60  # the ingester wrote them: over an hour's minutes
    StatsMinute.objects.all().delete()
    StatsDay.objects.all().delete()
    StatsCoverage.objects.update_or_create(
        pk=1, defaults={"covered_from": 0, "minutes_from": T0 + 7 * HOUR_MS}
    )
    call_command("rollup_events", stdout=StringIO(), stderr=StringIO())
    assert (StatsCoverage.load().covered_from, StatsCoverage.load().minutes_from) == (0, 0)
    assert rollups() == by_ingest


def test_rollup_events_can_stop_at_a_day(day: list[dict[str, Any]]) -> None:
    StatsRollup.objects.all().delete()
    StatsCoverage.objects.update_or_create(pk=1, defaults={"covered_from": T0 + 6 * HOUR_MS})
    from events.rollups import rollups_rebuild

    assert rollups_rebuild(since_hour=T0 + 4 * HOUR_MS + 5) == 2
    assert StatsCoverage.load().covered_from == T0 + 4 * HOUR_MS


def test_the_first_token_is_counted_once_whichever_arrives_first(db: Any, reader_client: APIClient) -> None:
    gid = str(uuid.uuid4())
    start = make_envelope("generationStarted", generationId=gid, timestamp=T0 + 100, seq=0)
    first = make_envelope("tokenGenerated", generationId=gid, timestamp=T0 + 340, seq=1)
    second = make_envelope("tokenGenerated", generationId=gid, timestamp=T0 + 360, seq=2)
    events_store([("2-0", msgspec.json.encode(first)), ("2-1", msgspec.json.encode(second))])
    events_store([("1-0", msgspec.json.encode(start))])  # the start, late
    events_store([("1-0", msgspec.json.encode(start)), ("2-0", msgspec.json.encode(first))])  # again
    body = stats(reader_client, T0, T0 + HOUR_MS - 1)
    assert body["percentiles"] == "buckets"
    assert body["timeToFirstTokenMs"]["count"] == 1
    assert within_one_bucket(body["timeToFirstTokenMs"]["p50"], [240.0], 0.5)
    # The fleet histogram counts it once too: one lookup serves both.
    from events.models import FleetCounter

    counted = FleetCounter.objects.filter(name="mlxserve_fleet_time_to_first_token_seconds_count")
    assert sum(counted.values_list("value", flat=True)) == 1


@pytest.mark.parametrize("late_first", [True, False])
def test_first_tokens_are_found_seconds_or_hours_after_their_starts(
    db: Any, reader_client: APIClient, late_first: bool
) -> None:
    # Looked for within ten minutes of their starts first, then within the day: a slow first token
    # (three hours: a model loaded cold, a queue) is found all the same, whichever is stored first.
    fast, slow = str(uuid.uuid4()), str(uuid.uuid4())
    starts = [
        make_envelope("generationStarted", generationId=gid, timestamp=T0 + 1_000, seq=0)
        for gid in (fast, slow)
    ]
    firsts = [
        make_envelope("tokenGenerated", generationId=fast, timestamp=T0 + 1_500, seq=1),
        make_envelope("tokenGenerated", generationId=slow, timestamp=T0 + 1_000 + 3 * HOUR_MS, seq=1),
    ]
    batches = [starts, firsts] if not late_first else [firsts, starts]
    for n, batch in enumerate(batches):
        events_store([(f"{n}-{i}", msgspec.json.encode(e)) for i, e in enumerate(batch)])
    exact = stats(reader_client, T0, T0 + 30 * MINUTE_MS)  # no whole hour: every start's first token read
    assert exact["percentiles"] == "exact"
    assert exact["timeToFirstTokenMs"]["count"] == 2
    assert exact["timeToFirstTokenMs"]["p99"] == pytest.approx(3 * HOUR_MS, rel=0.02)
    rolled = stats(reader_client, T0, T0 + 4 * HOUR_MS)  # whole hours: the ingester's rollups
    assert rolled["timeToFirstTokenMs"]["count"] == 2


def test_retention_drops_the_rollups_of_hours_past_the_longest_policy(db: Any) -> None:
    events_store([("1-0", msgspec.json.encode(make_envelope("error", timestamp=T0, generationId=None)))])
    events_store([("2-0", msgspec.json.encode(make_envelope("error", timestamp=T0 + 5 * 86_400_000)))])
    RetentionPolicy.objects.all().delete()
    RetentionPolicy.objects.create(event_type="error", keep_days=3)
    events_retention_apply(now_ms=T0 + 6 * 86_400_000)
    assert set(StatsRollup.objects.values_list("hour", flat=True)) == {T0 + 5 * 86_400_000}
    assert set(StatsMinute.objects.values_list("minute", flat=True)) == {T0 + 5 * 86_400_000}
    assert set(StatsDay.objects.values_list("day", flat=True)) == {T0 + 5 * 86_400_000}


def test_rollup_events_rebuild_counts_events_loaded_around_the_ingester(day: list[dict[str, Any]]) -> None:
    built_by_ingest = rollups()
    # A bulk load or a restore of the events table alone: events, no rollups, coverage says all.
    rollups_deleted()
    assert StatsCoverage.load().covered_from == 0
    call_command("rollup_events", stdout=StringIO(), stderr=StringIO())  # nothing before coverage
    assert not StatsRollup.objects.exists()
    out = StringIO()
    call_command("rollup_events", "--rebuild", stdout=out, stderr=StringIO())
    assert f"Built 6 hours of rollups ({len(day):,} events)" in out.getvalue()
    assert rollups() == built_by_ingest
