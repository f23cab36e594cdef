"""Stats from day, hour and minute rollups: the same counts as reading every event, percentiles
within one bucket, the widest and narrowest windows, one snapshot (rollup upkeep:
test_rollup_upkeep.py)."""

from __future__ import annotations

import itertools
import math
import random
import re
from collections import Counter
from typing import Any

import pytest
from rest_framework.test import APIClient

from events.models import StatsCoverage, StatsMinute
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
from events.windows import _plan, bucket_percentile
from tests.events.rollup_data import (
    LONG_MODEL,
    check,
    fleet_day,
    ingest,
    rollups,
    stats,
    truth,
)
from tests.factories import T0, writers_locked_out

pytestmark = pytest.mark.django_db


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
