"""Reading a stats window: whole days, hours and minutes from the rollups, what is left at the
ends from the events (``events.rollups.window_tally``), in one snapshot; percentiles from the
buckets, or exact where every observation was read."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from django.db import connection, transaction
from django.db.models import Case, F, Q, Sum, When

from events.models import (
    MODEL_COLUMN_LENGTH,
    RollupColumns,
    StatsCoverage,
)
from events.rollups import (
    DAY_MS,
    EVENTS_SERIES,
    HISTOGRAMS,
    HOUR_MS,
    MINUTE_MS,
    ROLLUPS,
    bucket_bounds,
    window_tally,
)


@dataclass
class WindowFigures:
    """A window's counts and histograms; ``exact`` values where every one was read."""

    events: Counter[tuple[str, str]]  # (model, type) -> count
    buckets: dict[str, Counter[int]]  # histogram -> bucket -> count
    exact: dict[str, list[float]] | None


@dataclass(frozen=True)
class _Part:
    """Part of a window: ``[since, end)`` read from the rollups of ``width`` (a day, an hour
    or a minute) or, ``width`` 0, from the events; its counts added (``sign`` 1) or taken away (-1)."""

    width: int
    since: int
    end: int
    sign: int


def _plan(since: int, end: int, levels: Sequence[tuple[int, int]], sign: int = 1) -> list[_Part]:
    """``[since, end)`` as rollup ranges and event ranges. ``levels``: (width, covered from),
    widest first. Each level takes the whole units it covers; a partial unit at either end
    goes to the next level, or, when less of that unit lies outside the range than inside,
    is taken whole and the part outside taken away (so events are read for at most half
    the narrowest unit at each end)."""
    if since >= end:
        return []
    if not levels:
        return [_Part(0, since, end, sign)]
    (width, covered), narrower = levels[0], levels[1:]
    first = max(-(-since // width) * width, covered)
    last = end // width * width
    if first >= last:
        return _plan(since, end, narrower, sign)
    parts = [_Part(width, first, last, sign)]
    if since < first:
        edge = first - width
        if covered <= edge and since - edge < first - since:
            parts += [_Part(width, edge, first, sign), *_plan(edge, since, narrower, -sign)]
        else:
            parts += _plan(since, first, narrower, sign)
    if last < end:
        edge = last + width
        if edge - end < end - last:
            parts += [_Part(width, last, edge, sign), *_plan(end, edge, narrower, -sign)]
        else:
            parts += _plan(last, end, narrower, sign)
    return parts


@contextlib.contextmanager
def _read_snapshot() -> Iterator[None]:
    """Read the window in one snapshot: rollups and events that each hold a batch or not
    (a batch stored between two reads would be counted in one and taken away in the other).
    PostgreSQL's must be asked for, first thing in the transaction; SQLite's is a deferred
    transaction (a reader of the write-ahead log), not the project's IMMEDIATE one, which takes
    the write lock: a read would wait behind every write (and fail after 30 s behind a long one).
    Inside a caller's transaction, the caller's isolation stands."""
    outermost = not connection.in_atomic_block
    deferred = outermost and connection.vendor == "sqlite"
    if deferred:
        connection.ensure_connection()  # a new connection would set its mode again
        mode = connection.transaction_mode  # type: ignore[attr-defined]
        connection.transaction_mode = "DEFERRED"  # type: ignore[attr-defined]
    try:
        with transaction.atomic():  # BEGIN is sent here
            if deferred:
                connection.transaction_mode = mode  # type: ignore[attr-defined]
            if outermost and connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield
    finally:
        if deferred:
            connection.transaction_mode = mode  # type: ignore[attr-defined]


def window_figures(
    since: int, until: int, *, model: str | None = None, use_rollups: bool = True
) -> WindowFigures:
    """``[since, until]`` (epoch ms) from the rollups where they cover it, the rest from the
    events (``_plan``); a window with no whole hour with every observation read (exact
    percentiles), its counts from the minute rollups and the events of its part-minutes."""
    events: Counter[tuple[str, str]] = Counter()
    buckets: dict[str, Counter[int]] = {h: Counter() for h in HISTOGRAMS}
    # Before the snapshot, which reads only: the coverage row is made if it is missing.
    coverage = StatsCoverage.load()
    with _read_snapshot():
        end = until + 1
        covered_from = coverage.covered_from if use_rollups else end
        minutes_from = max(coverage.minutes_from, covered_from)
        if max(-(-since // HOUR_MS) * HOUR_MS, covered_from) >= end // HOUR_MS * HOUR_MS:
            # No whole hour: every observation read (exact percentiles); the whole minutes'
            # counts from their rollups, the events counted only at the edges.
            start = max(-(-since // MINUTE_MS), -(-minutes_from // MINUTE_MS)) * MINUTE_MS
            counted = (start, end // MINUTE_MS * MINUTE_MS)
            tally = window_tally((since, until), model=model, counted=counted if start < counted[1] else None)
            for (_, m, series, bucket), n in tally.counts.items():
                _add(events, buckets, m, series, bucket, n)
            return WindowFigures(events=events, buckets=buckets, exact=tally.values)
        levels = (
            (DAY_MS, -(-minutes_from // DAY_MS) * DAY_MS),  # a day is whole from its first minute
            (HOUR_MS, covered_from),
            (MINUTE_MS, minutes_from),
        )
        parts = _plan(since, end, levels)
        for width, table in ROLLUPS:
            _add_rollups(events, buckets, [p for p in parts if p.width == width], table, model)
        # The events' parts, one read: at most one part at each end, so a minute's sign is its part's.
        read = [p for p in parts if p.width == 0]
        if read:
            tally = window_tally(*((p.since, p.end - 1) for p in read), model=model)
            for (minute, m, series, bucket), n in tally.counts.items():
                sign = next(p.sign for p in read if p.since < minute + MINUTE_MS and minute < p.end)
                _add(events, buckets, m, series, bucket, sign * n)
    # Taken-away parts leave zero counts behind: a type with none in the window is not listed.
    for key in [k for k, n in events.items() if n == 0]:
        del events[key]
    return WindowFigures(events=events, buckets=buckets, exact=None)


def _add_rollups(
    events: Counter[tuple[str, str]],
    buckets: dict[str, Counter[int]],
    parts: Sequence[_Part],
    table: type[RollupColumns],
    model: str | None,
) -> None:
    """Add the rollups of ``parts`` (one width, disjoint), each with its sign, in one query."""
    if not parts:
        return
    inside = Q()
    signed = []
    for part in parts:
        span = Q(**{f"{table.unit}__gte": part.since, f"{table.unit}__lt": part.end})
        inside |= span
        signed.append(When(span, then=F("count") * part.sign))
    rows = table._default_manager.filter(inside)
    if model is not None:
        rows = rows.filter(model=model[:MODEL_COLUMN_LENGTH])
    total = Sum(Case(*signed)) if len(parts) > 1 else Sum(F("count") * parts[0].sign)
    for m, series, bucket, n in rows.order_by().values_list("model", "series", "bucket").annotate(n=total):
        _add(events, buckets, m, series, bucket, int(n))


def _add(
    events: Counter[tuple[str, str]],
    buckets: dict[str, Counter[int]],
    model: str,
    series: str,
    bucket: int,
    n: int,
) -> None:
    if series.startswith(EVENTS_SERIES):
        events[(model, series[len(EVENTS_SERIES) :])] += n
    elif series in buckets:
        buckets[series][bucket] += n


def bucket_percentile(counts: Counter[int], q: float) -> float | None:
    """The value at rank ``q * (n - 1)`` (the exact percentiles' definition), placed by
    linear interpolation inside the bucket that holds that rank."""
    n = sum(counts.values())
    if n == 0:
        return None
    rank = q * (n - 1)
    seen = 0
    for bucket in sorted(counts):
        count = counts[bucket]
        if count > 0 and rank < seen + count:
            low, high = bucket_bounds(bucket)
            return low + (high - low) * min((rank - seen + 0.5) / count, 1.0)
        seen += count
    low, high = bucket_bounds(max(counts))
    return high
