"""Stats from hourly and minute rollups: the same counts as reading every event, percentiles
within one bucket, exact under redelivery and out-of-order batches, rebuilt for hours stored
before."""

from __future__ import annotations

import itertools
import math
import random
import re
import uuid
from collections import Counter
from io import StringIO
from typing import Any

import msgspec
import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from events.models import RetentionPolicy, StatsCoverage, StatsDay, StatsMinute, StatsRollup
from events.retention import events_retention_apply
from events.rollups import (
    DAY_MS,
    HIGHEST_BUCKET,
    HOUR_MS,
    LOWEST_BUCKET,
    MINUTE_MS,
    ZERO_BUCKET,
    bucket_bounds,
    bucket_of,
)
from events.selectors import _percentiles
from events.storage import events_store
from events.windows import _plan, bucket_percentile
from tests.factories import T0, make_envelope, writers_locked_out

pytestmark = pytest.mark.django_db

LONG_MODEL = "m" * 300  # stored cut to 200 characters, filtered the same way
MODELS = ["llama-3-8b", "qwen", LONG_MODEL]


def fleet_day(rng: random.Random, hours: int = 6) -> list[dict[str, Any]]:
    """Generations over ``hours`` hours from T0: lognormal time to first token, some retried
    (a second attempt in the same generation), some without throughput; errors and statuses."""
    events: list[dict[str, Any]] = []
    for g in range(hours * 12):
        gid, model = str(uuid.uuid4()), MODELS[g % 3]
        start = T0 + rng.randrange(hours * HOUR_MS - 60_000)
        seq = 0
        for _attempt in range(2 if g % 9 == 0 else 1):
            ttft = int(rng.lognormvariate(5, 1.2))
            events.append(
                make_envelope(
                    "generationStarted",
                    generationId=gid,
                    timestamp=start,
                    seq=seq,
                    payload={"model": model, "prompt": "Hi"},
                )
            )
            tokens = rng.randrange(1, 12)
            for i in range(tokens):
                events.append(
                    make_envelope(
                        "tokenGenerated",
                        generationId=gid,
                        timestamp=start + ttft + i * 15,
                        seq=seq + 1 + i,
                        payload={"model": model, "token": f"t{i}"},
                    )
                )
            seq += tokens + 1
            start += ttft + tokens * 15 + 5
        payload: dict[str, Any] = {
            "model": model,
            "tokensGenerated": tokens,
            "durationMs": rng.uniform(5, 9000),
        }
        if g % 4:
            payload["throughput"] = rng.uniform(1, 400)
        events.append(
            make_envelope("generationCompleted", generationId=gid, timestamp=start, seq=seq, payload=payload)
        )
        if g % 7 == 0:
            events.append(make_envelope("error", timestamp=start + 1, generationId=None))
        events.append(make_envelope("runtimeStatus", timestamp=T0 + rng.randrange(hours * HOUR_MS)))
    return events


def ingest(events: list[dict[str, Any]], rng: random.Random, *, redeliver: bool = True) -> None:
    """Store as the ingester does, in shuffled batches (a start may come after its first
    token), some batches delivered twice."""
    shuffled = events[:]
    rng.shuffle(shuffled)
    for start in range(0, len(shuffled), 37):
        batch = [(f"{start}-{i}", msgspec.json.encode(e)) for i, e in enumerate(shuffled[start : start + 37])]
        events_store(batch)
        if redeliver and start % 3 == 0:
            events_store(batch)


def truth(events: list[dict[str, Any]], since: int, until: int, model: str | None = None) -> dict[str, Any]:
    """What the window holds, worked out from the envelopes themselves."""

    def column(e: dict[str, Any]) -> str:
        m = e["payload"].get("model", "")
        return m[:200] if isinstance(m, str) else ""

    inside = [
        e for e in events if since <= e["timestamp"] <= until and (model is None or column(e) == model[:200])
    ]
    by_type = Counter(e["type"] for e in inside)
    by_model = Counter(column(e) for e in inside if column(e))
    tokens_at = {
        (e["generationId"], e["seq"]): e["timestamp"] for e in events if e["type"] == "tokenGenerated"
    }
    ttft = [
        float(tokens_at[(e["generationId"], e["seq"] + 1)] - e["timestamp"])
        for e in inside
        if e["type"] == "generationStarted" and (e["generationId"], e["seq"] + 1) in tokens_at
    ]
    completed = [e["payload"] for e in inside if e["type"] == "generationCompleted"]
    rates = [
        p["throughput"] if "throughput" in p else (p["tokensGenerated"] - 1) / (p["durationMs"] / 1000)
        for p in completed
        if "throughput" in p or p["tokensGenerated"] > 1
    ]
    return {
        "byType": dict(by_type),
        "byModel": dict(by_model),
        "ttft": ttft,
        "rates": rates,
        "durations": [float(p["durationMs"]) for p in completed],
    }


def within_one_bucket(got: float | None, values: list[float], q: float) -> bool:
    """Whether ``got`` lies within one bucket of the exact percentile: of the values at the
    ranks either side of ``q * (n - 1)``, which the exact figure interpolates between (in a
    sparse tail they can be buckets apart)."""
    if not values:
        return got is None
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low, high = ordered[math.floor(rank)], ordered[math.ceil(rank)]
    return got is not None and bucket_of(low) - 1 <= bucket_of(got) <= bucket_of(high) + 1


def check(body: dict[str, Any], expected: dict[str, Any], *, exact: bool) -> None:
    assert body["events"]["byType"] == expected["byType"]
    assert body["events"]["byModel"] == expected["byModel"]
    assert body["events"]["total"] == sum(expected["byType"].values())
    assert body["tokens"] == expected["byType"].get("tokenGenerated", 0)
    assert body["timeToFirstTokenMs"]["count"] == len(expected["ttft"])
    assert body["durationMs"]["count"] == len(expected["durations"])
    assert body["percentiles"] == ("exact" if exact else "buckets")
    for field, values in (
        ("timeToFirstTokenMs", "ttft"),
        ("tokensPerSecond", "rates"),
        ("durationMs", "durations"),
    ):
        want = _percentiles(expected[values])
        for p in ("p50", "p95", "p99"):
            if exact:
                assert body[field][p] == pytest.approx(want[p], abs=1e-3), (field, p)
            else:
                q = {"p50": 0.5, "p95": 0.95, "p99": 0.99}[p]
                assert within_one_bucket(body[field][p], expected[values], q), (
                    field,
                    p,
                    body[field][p],
                    want[p],
                )


def rollups() -> dict[str, list[tuple[Any, ...]]]:
    """Every rollup row, by width."""
    return {
        key: sorted(table.objects.values_list(key, "model", "series", "bucket", "count"))
        for table, key in ((StatsDay, "day"), (StatsRollup, "hour"), (StatsMinute, "minute"))
    }


def rollups_deleted() -> None:
    for table in (StatsDay, StatsRollup, StatsMinute):
        table.objects.all().delete()


def stats(client: APIClient, since: int, until: int, model: str | None = None) -> dict[str, Any]:
    query = {"since": since, "until": until} | ({"model": model} if model else {})
    response = client.get("/api/stats/", query)
    assert response.status_code == 200, response.content
    return response.json()


@pytest.fixture
def day(db: Any) -> list[dict[str, Any]]:
    rng = random.Random(11)
    events = fleet_day(rng)
    ingest(events, rng)
    return events


@pytest.mark.parametrize(
    ("since", "until"),
    [
        (T0, T0 + 6 * HOUR_MS - 1),  # whole hours only
        (T0 + 1_234_567, T0 + 5 * HOUR_MS + 777_777),  # a partial hour at each end
        (T0 + 3_000_000, T0 + 4 * HOUR_MS + 3_000_000),  # the other way round: more in than out
        (T0 - HOUR_MS, T0 + 9 * HOUR_MS),  # wider than the data
        (T0 + 2 * HOUR_MS, T0 + 3 * HOUR_MS),  # one whole hour and one millisecond of the next
        (T0 + 59_999, T0 + 2 * HOUR_MS + 1),  # a millisecond short of a minute, a millisecond past one
        (T0 + 20_000, T0 + 3 * HOUR_MS + 45_000),  # more of the edge minutes in than out
    ],
)
@pytest.mark.parametrize("model", [None, "qwen", LONG_MODEL])
def test_stats_over_whole_hours_equal_reading_every_event(
    day: list[dict[str, Any]], reader_client: APIClient, since: int, until: int, model: str | None
) -> None:
    check(stats(reader_client, since, until, model), truth(day, since, until, model), exact=False)


@pytest.mark.parametrize(
    ("since", "until"),
    [
        (T0 + 600_000, T0 + HOUR_MS + 900_000),
        (T0, T0 + HOUR_MS - 2),
        (T0 + 61_000, T0 + 119_998),  # inside one minute: no whole minute either
        (T0 + 59_999, T0 + 60_000),  # two milliseconds astride a minute
    ],
)
@pytest.mark.parametrize("model", [None, "qwen", LONG_MODEL])
def test_a_window_with_no_whole_hour_is_exact(
    day: list[dict[str, Any]], reader_client: APIClient, since: int, until: int, model: str | None
) -> None:
    check(stats(reader_client, since, until, model), truth(day, since, until, model), exact=True)


def test_a_window_with_no_whole_hour_reads_token_events_only_at_its_edges(
    day: list[dict[str, Any]], reader_client: APIClient
) -> None:
    """The default last hour at a busy fleet: its token events (nearly all of its rows) are counted
    from the minute rollups, and read only in the part-minutes at its ends; its percentiles stay
    exact (every start, completion and first token read)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    since, until = T0 + 600_123, T0 + HOUR_MS + 599_000
    with CaptureQueriesContext(connection) as queries:
        body = stats(reader_client, since, until)
    check(body, truth(day, since, until), exact=True)
    spans = [
        (int(low), int(high))
        for q in queries.captured_queries
        if "COUNT" in q["sql"] and "events_token" in q["sql"]
        for low, high in re.findall(
            r'"events_token"\."timestamp" >= (-?\d+) AND "events_token"\."timestamp" <= (-?\d+)', q["sql"]
        )
    ]
    assert spans == [(since, T0 + 659_999), (T0 + HOUR_MS + 540_000, until)], spans
    # Minute rollups not built for that time (hours stored before them): every event is read.
    StatsMinute.objects.all().delete()
    StatsCoverage.objects.update_or_create(pk=1, defaults={"minutes_from": T0 + 7 * HOUR_MS})
    check(stats(reader_client, since, until), truth(day, since, until), exact=True)


@pytest.fixture
def days(db: Any) -> list[dict[str, Any]]:
    rng = random.Random(13)
    events = fleet_day(rng, hours=60)
    ingest(events, rng, redeliver=False)
    return events


@pytest.mark.parametrize(
    ("since", "until"),
    [
        (
            T0 + 1_234_567,
            T0 + 59 * HOUR_MS + 777_777,
        ),  # two whole days, partial hours and minutes at the ends
        (T0 + 5 * HOUR_MS, T0 + 48 * HOUR_MS + 30_000),  # more of the first day in than out: taken away
        (T0 + 20 * HOUR_MS + 1, T0 + 47 * HOUR_MS - 1),  # no whole day
    ],
)
@pytest.mark.parametrize("model", [None, "qwen"])
def test_stats_over_whole_days_equal_reading_every_event(
    days: list[dict[str, Any]], reader_client: APIClient, since: int, until: int, model: str | None
) -> None:
    assert len({d for d, *_ in rollups()["day"]}) == 3
    check(stats(reader_client, since, until, model), truth(days, since, until, model), exact=False)


def test_rollup_events_rebuilds_the_days_from_their_hours(days: list[dict[str, Any]]) -> None:
    by_ingest = rollups()
    rollups_deleted()
    from events.rollups import rollups_rebuild

    assert rollups_rebuild(everything=True) == 60
    assert rollups() == by_ingest


def test_hours_before_the_minute_rollups_read_their_partial_hours_from_the_events(
    day: list[dict[str, Any]], reader_client: APIClient
) -> None:
    # As after the upgrade that brought minute rollups: the hours before it have none.
    StatsMinute.objects.all().delete()
    StatsCoverage.objects.update_or_create(pk=1, defaults={"minutes_from": T0 + 7 * HOUR_MS})
    since, until = T0 + 1_234_567, T0 + 5 * HOUR_MS + 777_777
    check(stats(reader_client, since, until), truth(day, since, until), exact=False)


def test_a_stats_window_reads_at_most_half_a_minute_of_events_at_each_end() -> None:
    """Whatever its edges, a window is its parts added and taken away exactly, and the events
    read (part width 0) are at most half a minute at each end."""
    rng = random.Random(5)
    levels = ((DAY_MS, 0), (HOUR_MS, 0), (MINUTE_MS, 0))
    for _ in range(2000):
        since = rng.randrange(0, 3 * 86_400_000)
        end = since + rng.choice([1, 59_999, 60_001, HOUR_MS + 1, rng.randrange(1, 30 * 86_400_000)])
        parts = _plan(since, end, levels)
        # Signed coverage at every boundary equals the window's: 1 inside, 0 outside.
        points = sorted({p for part in parts for p in (part.since, part.end)} | {since, end})
        for a, b in itertools.pairwise(points):
            depth = sum(part.sign for part in parts if part.since <= a and b <= part.end)
            assert depth == (1 if since <= a and b <= end else 0), (since, end, parts)
        read = sum(part.end - part.since for part in parts if part.width == 0)
        whole_hours = -(-since // HOUR_MS) * HOUR_MS < end // HOUR_MS * HOUR_MS
        if whole_hours:
            assert read <= MINUTE_MS, (since, end, parts)


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


@pytest.mark.parametrize(
    ("value", "bucket"),
    [
        (0.0, ZERO_BUCKET),
        (-5.0, ZERO_BUCKET),
        (math.nan, ZERO_BUCKET),
        (math.inf, HIGHEST_BUCKET),
        (1e300, HIGHEST_BUCKET),
        (1e-300, LOWEST_BUCKET),
        (1.0, -1),
        (2.0, 3),
    ],
)
def test_every_value_has_a_bucket_that_fits_a_smallint(value: float, bucket: int) -> None:
    assert bucket_of(value) == bucket
    assert -32768 <= bucket_of(value) <= 32767


@pytest.mark.parametrize("seed", range(5))
def test_bucket_percentiles_stay_within_one_bucket_of_the_exact_ones(seed: int) -> None:
    rng = random.Random(seed)
    values = [
        rng.lognormvariate(rng.uniform(0, 8), rng.uniform(0.1, 2)) for _ in range(rng.randrange(1, 3000))
    ]
    counts = Counter(bucket_of(v) for v in values)
    exact = _percentiles(values)
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        got = bucket_percentile(counts, q)
        assert got is not None
        low, high = bucket_bounds(bucket_of(exact[name]))  # type: ignore[arg-type]
        assert abs(bucket_of(got) - bucket_of(exact[name])) <= 1  # type: ignore[arg-type]
        assert low / 2**0.25 <= got <= high * 2**0.25
    assert bucket_percentile(Counter(), 0.5) is None


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


@pytest.mark.parametrize(
    ("since", "until"),
    [
        (0, 2**63 - 1),
        (2**63 - 2, 2**63 - 1),
        (0, 0),
        (5, 5),
        (0, 2**63 - 1 - 86_400_000 // 2 - 5),  # the top day taken whole, the part past the top taken away
        (3 * 3_600_000 + 1, 2**63 - 1 - 3_600_000 // 4),  # the same with the top hour
    ],
)
def test_the_widest_and_narrowest_windows_are_answered(
    day: list[dict[str, Any]], reader_client: APIClient, since: int, until: int
) -> None:
    body = stats(reader_client, since, until)  # 200, whatever the bounds the API accepts
    expected = truth(day, since, until)
    assert body["events"]["byType"] == expected["byType"]


@pytest.mark.django_db(transaction=True)
def test_a_window_is_read_in_one_snapshot_outside_any_transaction(reader_client: APIClient) -> None:
    """As the web server reads it (no transaction around the request): on PostgreSQL a
    repeatable-read, read-only one of its own; the same answer as reading every event."""
    rng = random.Random(7)
    events = fleet_day(rng, hours=3)
    ingest(events, rng)
    StatsCoverage.objects.all().delete()  # a missing row is made again, not inside the read-only snapshot
    since, until = T0 + 1_234_567, T0 + 2 * HOUR_MS + 777_777
    check(stats(reader_client, since, until), truth(events, since, until), exact=False)


@pytest.mark.django_db(transaction=True)
def test_a_stats_read_is_answered_while_another_session_holds_the_write_lock(
    reader_client: APIClient,
) -> None:
    """A read takes no write lock: on SQLite, a snapshot is a deferred transaction (the project's
    IMMEDIATE one would wait behind every write, and fail after 30 s behind a long one)."""
    rng = random.Random(3)
    events = fleet_day(rng, hours=2)
    ingest(events, rng)
    since, until = T0 + 1_000, T0 + HOUR_MS + 5_000
    StatsCoverage.load()  # made on first use, as in any running deployment
    with writers_locked_out("events_statsrollup"):
        body = stats(reader_client, since, until)  # 200 (it was a 500 after 30 s on SQLite)
    check(body, truth(events, since, until), exact=True)
