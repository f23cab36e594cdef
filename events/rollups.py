"""Hourly rollups behind ``GET /api/stats/``: what each hour held, per model, kept small.

Each hour keeps, per model, a count of events of each type and three histograms
(time to first token, per-generation tokens/s, generation duration) in log-scale
buckets, four to a doubling (each about 19% wide). The ingester adds a batch's
share in the same transaction that stores it, counting only events stored for
the first time, so the rollups are exact under redelivery. A stats window reads
its whole hours from here and counts its partial first and last hours from the
events (a range scan of at most two hours); percentiles then come from the
buckets, within one bucket of the exact figure. A window with no whole hour is
counted from the events alone and its percentiles are exact.

The same tally serves three callers: the ingester (a batch of envelopes), the
stats endpoint (a window's edges) and ``rollup_events`` (hours stored before the
rollups existed, rebuilt from their events).
"""

from __future__ import annotations

import math
import typing
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from django.db import transaction
from django.db.models import Count, F, Q, Sum
from django.db.models.functions import Mod

from events.models import (
    MODEL_COLUMN_LENGTH,
    Channel,
    Event,
    EventRecord,
    SourceMinute,
    StatsCoverage,
    StatsRollup,
    TokenEvent,
)
from events.upsert import upsert_adding
from mlxserve.contract.events import (
    Envelope,
    ErrorEnvelope,
    GenerationCompletedEnvelope,
    GenerationStartedEnvelope,
    TokenGeneratedEnvelope,
    time_to_first_token_ms,
    tokens_per_second,
)

HOUR_MS = 3_600_000
MINUTE_MS = 60_000
# Source minutes are kept this long (the views read the last hour; a day back for context).
ACTIVITY_KEEP_MS = 2 * 86_400_000
HISTOGRAMS = ("ttftMs", "tokensPerSecond", "durationMs")
EVENTS_SERIES = "events:"

# Log-scale buckets: bucket i holds (2^(i/4), 2^((i+1)/4)]; zero and below have their own.
BUCKETS_PER_DOUBLING = 4
ZERO_BUCKET = -32768
# 2^-50 .. 2^100: every value a payload can carry fits, and the index fits a smallint.
LOWEST_BUCKET, HIGHEST_BUCKET = -50 * BUCKETS_PER_DOUBLING, 100 * BUCKETS_PER_DOUBLING


def bucket_of(value: float) -> int:
    if not value > 0:  # zero, negative, NaN
        return ZERO_BUCKET
    if math.isinf(value):
        return HIGHEST_BUCKET
    index = math.ceil(math.log2(value) * BUCKETS_PER_DOUBLING) - 1
    return max(LOWEST_BUCKET, min(HIGHEST_BUCKET, index))


def bucket_bounds(bucket: int) -> tuple[float, float]:
    if bucket == ZERO_BUCKET:
        return 0.0, 0.0
    return 2 ** (bucket / BUCKETS_PER_DOUBLING), 2 ** ((bucket + 1) / BUCKETS_PER_DOUBLING)


def hour_of(timestamp: int) -> int:
    return timestamp - timestamp % HOUR_MS


def _model_column(model: object) -> str:
    """What ``Event.model`` holds for this payload model (the stats ``model`` filter's key)."""
    return model[:MODEL_COLUMN_LENGTH] if isinstance(model, str) else ""


def completed_throughput(throughput: object, tokens: object, duration_ms: object) -> float | None:
    """A completed generation's tokens/s: its ``throughput``, or its tokens over its duration."""
    if isinstance(throughput, int | float) and not isinstance(throughput, bool):
        return float(throughput)
    if isinstance(tokens, int) and isinstance(duration_ms, int | float):
        return tokens_per_second(tokens, duration_ms / 1000)
    return None


@dataclass
class Tally:
    """Counts and observations: ``counts[(hour, model, series, bucket)]``; observed values
    are kept too (``values[histogram]``) where they were read one by one."""

    counts: Counter[tuple[int, str, str, int]] = field(default_factory=Counter)
    values: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    activity: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # (source, minute) -> counts

    def event(self, timestamp: int, model: str, event_type: str, n: int = 1) -> None:
        self.counts[(hour_of(timestamp), model, EVENTS_SERIES + event_type, 0)] += n

    def observe(self, timestamp: int, model: str, histogram: str, value: float) -> None:
        self.counts[(hour_of(timestamp), model, histogram, bucket_of(value))] += 1
        self.values[histogram].append(value)

    def completed(self, timestamp: int, model: str, duration_ms: object, rate: float | None) -> None:
        if isinstance(duration_ms, int | float) and not isinstance(duration_ms, bool):
            self.observe(timestamp, model, "durationMs", float(duration_ms))
        if rate is not None:
            self.observe(timestamp, model, "tokensPerSecond", rate)


_SERIES_OF: dict[type[Envelope], str] = {
    kind: EVENTS_SERIES + str(kind.__struct_config__.tag) for kind in typing.get_args(Envelope)
}

# -- the ingester's share ------------------------------------------------------------


@dataclass(frozen=True)
class FirstToken:
    """An attempt's start and its first token (the ``tokenGenerated`` with the next ``seq``)."""

    started: int  # epoch ms of the generationStarted
    start_model: str  # as the model column holds it (the stats key)
    token: int  # epoch ms of the first token
    token_model: str  # the token's model (the fleet histogram's label)


def first_tokens(envelopes: Sequence[Envelope]) -> list[FirstToken]:
    """Each attempt these newly stored events complete: a start whose first token is here or
    was stored before, or a first token whose start is here or was stored before. Counted
    whichever of the two is stored second, so once; one query for each side at most (the
    batch is written, so its own rows are among the stored ones)."""
    starts: dict[tuple[uuid.UUID, int], GenerationStartedEnvelope] = {}
    tokens: dict[tuple[uuid.UUID, int], TokenGeneratedEnvelope] = {}
    for e in envelopes:
        if isinstance(e, TokenGeneratedEnvelope):
            tokens[(e.generation_id, e.seq)] = e
        elif isinstance(e, GenerationStartedEnvelope):
            starts[(e.generation_id, e.seq)] = e
    if not starts and not tokens:
        return []
    found: dict[tuple[uuid.UUID, int], FirstToken] = {}  # by attempt: (generation, start seq)
    for (gid, seq), start in starts.items():
        if (token := tokens.get((gid, seq + 1))) is not None:
            found[(gid, seq)] = FirstToken(
                start.timestamp, _model_column(start.payload.model), token.timestamp, token.payload.model
            )
    # Starts whose first token was stored before; tokens whose start was stored before.
    for gid, seq, ts, model in _stored_first_tokens(
        {k: v.timestamp for k, v in starts.items() if k not in found}
    ):
        start = starts[(gid, seq - 1)]
        found[(gid, seq - 1)] = FirstToken(start.timestamp, _model_column(start.payload.model), ts, model)
    # A token can be an attempt's first only if the one before it is not a token of the batch.
    token_gids = {gid for gid, seq in tokens if (gid, seq - 1) not in tokens}
    if token_gids:
        for gid, seq, ts, model in _stored_starts(token_gids):
            token = tokens.get((gid, seq + 1))
            if token is not None and (gid, seq) not in found:
                found[(gid, seq)] = FirstToken(ts, model, token.timestamp, token.payload.model)
    return list(found.values())


def batch_tally(envelopes: Sequence[Envelope], firsts: Sequence[FirstToken]) -> Tally:
    """What newly stored ``envelopes`` add to the rollups and to each source's minutes; time to
    first token from ``firsts``, under the start's hour and model."""
    tally = Tally()
    # Per event only a tuple is counted (this runs for every event stored); keys are made
    # once per distinct (hour, model, type) at the end.
    per_type: Counter[tuple[int, object, type[Envelope]]] = Counter()
    activity = tally.activity
    for e in envelopes:
        ts = e.timestamp
        kind = type(e)
        per_type[(ts - ts % HOUR_MS, getattr(e.payload, "model", ""), kind)] += 1
        row = activity.get(key := (e.source, ts - ts % MINUTE_MS))
        if row is None:
            row = activity[key] = [0, 0, 0]  # events, tokens, errors
        row[0] += 1
        if kind is TokenGeneratedEnvelope:
            row[1] += 1
        elif kind is ErrorEnvelope:
            row[2] += 1
        elif isinstance(e, GenerationCompletedEnvelope):
            p = e.payload
            rate = completed_throughput(p.throughput, p.tokens_generated, p.duration_ms)
            tally.completed(ts, _model_column(p.model), p.duration_ms, rate)
    for (hour, model, kind), n in per_type.items():
        tally.counts[(hour, _model_column(model), _SERIES_OF[kind], 0)] += n
    for first in firsts:
        if (ttft := time_to_first_token_ms(first.started, first.token)) is not None:
            tally.observe(first.started, first.start_model, "ttftMs", float(ttft))
    return tally


# A first token is looked for within a day of its start (a generation's time limit is far less):
# bounded in time, a lookup reads the partition or two it can be in, not every one.
FIRST_TOKEN_WITHIN_MS = 86_400_000


def _stored_first_tokens(
    attempts: dict[tuple[uuid.UUID, int], int],
) -> Iterable[tuple[uuid.UUID, int, int, str]]:
    """(generation, seq, timestamp, model) of the stored tokens right after these attempts'
    starts (``attempts``: (generation, start seq) -> the start's timestamp)."""
    items = sorted(attempts.items())
    models: dict[int, str] | None = None
    for start in range(0, len(items), 100):
        chunk = items[start : start + 100]
        wanted = Q()
        for (gid, seq), started in chunk:
            wanted |= Q(
                generation_id=gid,
                seq=seq + 1,
                timestamp__gte=started,
                timestamp__lt=started + FIRST_TOKEN_WITHIN_MS,
            )
        # Both tables, each by its generation index (the view's per-row model would cost more).
        rows = list(
            EventRecord.objects.filter(wanted, type="tokenGenerated").values_list(
                "generation_id", "seq", "timestamp", "model"
            )
        )
        typed = list(
            TokenEvent.objects.filter(wanted).values_list("generation_id", "seq", "timestamp", "channel_id")
        )
        if typed and models is None:
            models = dict(Channel.objects.values_list("id", "model"))
        rows += [(g, s, t, (models or {}).get(c, "")) for g, s, t, c in typed]
        yield from ((g, s, t, m) for g, s, t, m in rows if g is not None)


def _stored_starts(generation_ids: set[uuid.UUID]) -> Iterable[tuple[uuid.UUID, int, int, str]]:
    ids = sorted(generation_ids)
    for start in range(0, len(ids), 500):
        rows = EventRecord.objects.filter(
            type="generationStarted", generation_id__in=ids[start : start + 500]
        ).values_list("generation_id", "seq", "timestamp", "model")
        yield from ((g, s, t, m) for g, s, t, m in rows if g is not None)


def rollups_add(envelopes: Sequence[Envelope], firsts: Sequence[FirstToken]) -> None:
    """Add newly stored events to the rollups and to each source's minutes, in key order so
    two ingesters never wait on each other in a cycle."""
    if not envelopes:
        return
    tally = batch_tally(envelopes, firsts)
    _upsert(tally.counts)
    upsert_adding(
        SourceMinute._meta.db_table,
        ("source", "minute"),
        ("events", "tokens", "errors"),
        [(source, minute, *row) for (source, minute), row in sorted(tally.activity.items())],
    )


def activity_prune(now_ms: int) -> int:
    deleted, _ = SourceMinute.objects.filter(minute__lt=now_ms - ACTIVITY_KEEP_MS).delete()
    return deleted


def _upsert(counts: Counter[tuple[int, str, str, int]]) -> None:
    upsert_adding(
        StatsRollup._meta.db_table,
        ("hour", "model", "series", "bucket"),
        ("count",),
        [(*key, n) for key, n in sorted(counts.items())],
    )


# -- counting a window from its events ------------------------------------------------


def window_tally(since: int, until: int, *, model: str | None = None) -> Tally:
    """The tally of the events stamped in ``[since, until]`` (epoch ms), read from the events:
    one GROUP BY for the counts, the ``generationCompleted`` payloads, and each attempt's
    first token by the generation index."""
    tally = Tally()
    window = EventRecord.objects.filter(timestamp__gte=since, timestamp__lte=until)
    tokens = TokenEvent.objects.filter(timestamp__gte=since, timestamp__lte=until)
    channels = dict(Channel.objects.values_list("id", "model"))
    if model is not None:
        window = window.filter(model=model[:MODEL_COLUMN_LENGTH])
        tokens = tokens.filter(
            channel_id__in=[c for c, m in channels.items() if m == model[:MODEL_COLUMN_LENGTH]]
        )
    hours = window.order_by().annotate(hour=F("timestamp") - Mod("timestamp", HOUR_MS))
    for row in hours.values("hour", "model", "type").annotate(n=Count("*")):
        tally.event(int(row["hour"]), row["model"], row["type"], row["n"])
    # Token events by their (source, model) pair, a small number each hour; the pair's model.
    token_hours = tokens.order_by().annotate(hour=F("timestamp") - Mod("timestamp", HOUR_MS))
    for row in token_hours.values("hour", "channel_id").annotate(n=Count("*")):
        tally.event(int(row["hour"]), channels.get(row["channel_id"], ""), "tokenGenerated", row["n"])
    completed = window.filter(type="generationCompleted")
    for ts, m, payload in completed.values_list("timestamp", "model", "payload"):
        if isinstance(payload, dict):
            rate = completed_throughput(
                payload.get("throughput"), payload.get("tokensGenerated"), payload.get("durationMs")
            )
            tally.completed(ts, m, payload.get("durationMs"), rate)
    attempts = window.filter(type="generationStarted", generation_id__isnull=False)
    starts = {
        (gid, seq): (ts, m)
        for gid, seq, ts, m in attempts.values_list("generation_id", "seq", "timestamp", "model")
        if gid is not None
    }
    for gid, seq, first, _ in _stored_first_tokens({k: ts for k, (ts, _) in starts.items()}):
        started, m = starts[(gid, seq - 1)]
        if (ttft := time_to_first_token_ms(started, first)) is not None:
            tally.observe(started, m, "ttftMs", float(ttft))
    return tally


# -- reading a window ----------------------------------------------------------------


@dataclass
class WindowFigures:
    """A window's counts and histograms; ``exact`` values where every one was read."""

    events: Counter[tuple[str, str]]  # (model, type) -> count
    buckets: dict[str, Counter[int]]  # histogram -> bucket -> count
    exact: dict[str, list[float]] | None


def window_figures(
    since: int, until: int, *, model: str | None = None, use_rollups: bool = True
) -> WindowFigures:
    """Whole hours covered by the rollups from the rollups, the rest from the events.

    A partial first or last hour is read from its events, or, when the part of that hour
    outside the window is the smaller one, taken from the rollups less the events of that
    part: at most half an hour of events is read at each end.
    """
    covered_from = StatsCoverage.load().covered_from if use_rollups else until + 1
    first_whole = max(-(-since // HOUR_MS) * HOUR_MS, covered_from)
    end_whole = (until + 1) // HOUR_MS * HOUR_MS  # hours ending at or before until
    events: Counter[tuple[str, str]] = Counter()
    buckets: dict[str, Counter[int]] = {h: Counter() for h in HISTOGRAMS}
    if first_whole >= end_whole:
        tally = window_tally(since, until, model=model)
        for (_, m, series, bucket), n in tally.counts.items():
            _add(events, buckets, m, series, bucket, n)
        return WindowFigures(events=events, buckets=buckets, exact=tally.values)
    hours_from, hours_to = first_whole, end_whole
    scans: list[tuple[int, int, int]] = []  # (since, until, +1 to add or -1 to take away)
    if since < first_whole:
        edge = first_whole - HOUR_MS
        if covered_from <= edge < since and since - edge < first_whole - since:
            hours_from = edge
            scans.append((edge, since - 1, -1))
        else:
            scans.append((since, first_whole - 1, 1))
    if end_whole <= until:
        edge_end = end_whole + HOUR_MS
        if edge_end - 1 - until < until + 1 - end_whole:
            hours_to = edge_end
            scans.append((until + 1, edge_end - 1, -1))
        else:
            scans.append((end_whole, until, 1))
    rows = StatsRollup.objects.filter(hour__gte=hours_from, hour__lt=hours_to)
    if model is not None:
        rows = rows.filter(model=model[:MODEL_COLUMN_LENGTH])
    for m, series, bucket, n in (
        rows.order_by().values_list("model", "series", "bucket").annotate(n=Sum("count"))
    ):
        _add(events, buckets, m, series, bucket, int(n))
    for start, end, sign in scans:
        for (_, m, series, bucket), n in window_tally(start, end, model=model).counts.items():
            _add(events, buckets, m, series, bucket, sign * n)
    # Taken-away parts leave zero counts behind: a type with none in the window is not listed.
    for key in [k for k, n in events.items() if n == 0]:
        del events[key]
    return WindowFigures(events=events, buckets=buckets, exact=None)


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


# -- rebuilding hours from their events ----------------------------------------------


def rollups_rebuild(
    *,
    since_hour: int | None = None,
    everything: bool = False,
    on_hour: Callable[[int, int, int], None] | None = None,
) -> int:
    """Build the rollups of the hours stored before they existed, newest first, one hour a
    transaction, moving the coverage back as each is done (stats read it at once).
    ``everything`` rebuilds every stored hour (events loaded around the ingester, by a
    restore or a bulk load). ``on_hour(hour, events, hours_left)`` reports progress.
    Returns the hours built.

    Safe beside running ingesters: an hour's rows are replaced under the rows' locks,
    and an ingester's later addition adds to what was counted without it.
    """
    coverage = StatsCoverage.load()
    oldest = Event.objects.order_by("timestamp").values_list("timestamp", flat=True).first()
    if oldest is None:
        StatsCoverage.objects.filter(pk=coverage.pk).update(covered_from=0)
        return 0
    hour, built = coverage.covered_from, 0
    if everything:
        newest = Event.objects.order_by("-timestamp").values_list("timestamp", flat=True).first() or 0
        hour = hour_of(newest) + HOUR_MS
        StatsCoverage.objects.filter(pk=coverage.pk).update(covered_from=hour)
    stop = hour_of(oldest) if since_hour is None else max(hour_of(oldest), hour_of(since_hour))
    while hour > stop:
        hour -= HOUR_MS
        with transaction.atomic():
            StatsRollup.objects.filter(hour=hour).delete()
            tally = window_tally(hour, hour + HOUR_MS - 1)
            _upsert(tally.counts)
            StatsCoverage.objects.filter(pk=coverage.pk).update(covered_from=hour)
        built += 1
        if on_hour is not None:
            events = sum(n for (_, _, s, _), n in tally.counts.items() if s.startswith(EVENTS_SERIES))
            on_hour(hour, events, (hour - stop) // HOUR_MS)
    if since_hour is None:
        StatsCoverage.objects.filter(pk=coverage.pk).update(covered_from=0)
    return built


def rollups_prune(before_ms: int) -> int:
    """Delete the rollups of hours that end before ``before_ms`` (retention)."""
    deleted, _ = StatsRollup.objects.filter(hour__lt=hour_of(before_ms)).delete()
    return deleted
