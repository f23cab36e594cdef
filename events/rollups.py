"""Rollups behind ``GET /api/stats/``: what each day, hour and minute held, per model.

Each day (UTC), hour and minute keeps per model a count of events of each type and three
histograms (time to first token, per-generation tokens/s, generation duration) in
log-scale buckets, four to a doubling (each about 19% wide). The ingester adds a
batch's share in the same transaction that stores it, counting only events stored
for the first time, so the rollups are exact under redelivery. A stats window reads
its whole days from the daily rollups, the whole hours of its partial days from the
hourly ones, the whole minutes of its partial hours from the minute ones, and at most
half a minute of events at each end (``_plan``); percentiles then come from the
buckets, within one bucket of the exact figure. A window with no whole hour has exact
percentiles (every observation in it read), its counts from the minute rollups and from
the events of the part-minutes at its ends.

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
    RollupColumns,
    SourceMinute,
    StatsCoverage,
    StatsDay,
    StatsMinute,
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
)
from mlxserve.contract.generations import time_to_first_token_ms, tokens_per_second

DAY_MS = 86_400_000
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


def minute_of(timestamp: int) -> int:
    return timestamp - timestamp % MINUTE_MS


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
    """Counts and observations: ``counts[(minute, model, series, bucket)]``; observed values
    are kept too (``values[histogram]``) where they were read one by one."""

    counts: Counter[tuple[int, str, str, int]] = field(default_factory=Counter)
    values: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    activity: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # (source, minute) -> counts

    def event(self, timestamp: int, model: str, event_type: str, n: int = 1) -> None:
        self.counts[(minute_of(timestamp), model, EVENTS_SERIES + event_type, 0)] += n

    def observe(self, timestamp: int, model: str, histogram: str, value: float) -> None:
        self.counts[(minute_of(timestamp), model, histogram, bucket_of(value))] += 1
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
    # Tokens by (generation as its integer, seq): hashed in C, for each of a batch's thousands.
    tokens: dict[tuple[int, int], TokenGeneratedEnvelope] = {}
    for e in envelopes:
        if isinstance(e, TokenGeneratedEnvelope):
            tokens[(e.generation_id.int, e.seq)] = e
        elif isinstance(e, GenerationStartedEnvelope):
            starts[(e.generation_id, e.seq)] = e
    if not starts and not tokens:
        return []
    found: dict[tuple[uuid.UUID, int], FirstToken] = {}  # by attempt: (generation, start seq)
    for (gid, seq), start in starts.items():
        if (token := tokens.get((gid.int, seq + 1))) is not None:
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
    token_gids = {uuid.UUID(int=gid) for gid in {gid for gid, seq in tokens if (gid, seq - 1) not in tokens}}
    if token_gids:
        for gid, seq, ts, model in _stored_starts(token_gids):
            token = tokens.get((gid.int, seq + 1))
            if token is not None and (gid, seq) not in found:
                found[(gid, seq)] = FirstToken(ts, model, token.timestamp, token.payload.model)
    return list(found.values())


def batch_tally(envelopes: Sequence[Envelope], firsts: Sequence[FirstToken]) -> Tally:
    """What newly stored ``envelopes`` add to the rollups and to each source's minutes; time to
    first token from ``firsts``, under the start's minute and model."""
    tally = Tally()
    # Per event only a tuple is counted (this runs for every event stored); keys are made
    # once per distinct (minute, model, type) at the end.
    per_type: Counter[tuple[int, object, type[Envelope]]] = Counter()
    activity = tally.activity
    for e in envelopes:
        ts = e.timestamp
        kind = type(e)
        minute = ts - ts % MINUTE_MS
        per_type[(minute, getattr(e.payload, "model", ""), kind)] += 1
        row = activity.get(key := (e.source, minute))
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
    for (minute, model, kind), n in per_type.items():
        tally.counts[(minute, _model_column(model), _SERIES_OF[kind], 0)] += n
    for first in firsts:
        if (ttft := time_to_first_token_ms(first.started, first.token)) is not None:
            tally.observe(first.started, first.start_model, "ttftMs", float(ttft))
    return tally


# A first token is looked for within a day of its start (a generation's time limit is far less):
# bounded in time, a lookup reads the partition or two it can be in, not every one.
FIRST_TOKEN_WITHIN_MS = 86_400_000


# Nearly every first token comes within seconds of its start: looked for within this first, and
# only the attempts with none there within the day (a range over two partitions, a day of rows,
# made the planner walk the next day's time index: 9 of a one-hour window's 14 ms).
FIRST_TOKEN_NEAR_MS = 600_000


def _stored_first_tokens(
    attempts: dict[tuple[uuid.UUID, int], int],
) -> Iterable[tuple[uuid.UUID, int, int, str]]:
    """(generation, seq, timestamp, model) of the stored tokens right after these attempts'
    starts (``attempts``: (generation, start seq) -> the start's timestamp), each within
    ``FIRST_TOKEN_WITHIN_MS`` of its start: looked for within ``FIRST_TOKEN_NEAR_MS`` first,
    then, for the attempts with none there, within the day."""
    left = dict(attempts)
    for within in (FIRST_TOKEN_NEAR_MS, FIRST_TOKEN_WITHIN_MS):
        for found in _first_tokens_within(left, within):
            del left[(found[0], found[1] - 1)]
            yield found
        if not left:
            return


def _first_tokens_within(
    attempts: dict[tuple[uuid.UUID, int], int], within: int
) -> Iterable[tuple[uuid.UUID, int, int, str]]:
    """The first tokens of ``attempts`` stamped within ``within`` ms of their starts.

    One query a table for up to 500 attempts: their generations and next seqs as two lists
    and one time range (so the partitions outside it are never read), each row then matched
    to its attempt here (a list of generations by a list of seqs can pair one attempt's
    generation with another's seq: those few rows are dropped)."""
    items = sorted(attempts.items())
    models: dict[int, str] | None = None
    found: list[tuple[uuid.UUID, int, int, str]] = []
    for start in range(0, len(items), 500):
        chunk = dict(items[start : start + 500])
        since = min(chunk.values())
        wanted = Q(
            generation_id__in={gid for gid, _ in chunk},
            seq__in={seq + 1 for _, seq in chunk},
            timestamp__gte=since,
            timestamp__lt=max(chunk.values()) + within,
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
        for g, s, t, m in rows:
            started = None if g is None else chunk.get((g, s - 1))
            if g is not None and started is not None and started <= t < started + within:
                found.append((g, s, t, m))
    # An attempt's first token once, whichever table or duplicate row it came from (the earliest).
    first: dict[tuple[uuid.UUID, int], tuple[uuid.UUID, int, int, str]] = {}
    for row in sorted(found, key=lambda r: r[2]):
        first.setdefault((row[0], row[1]), row)
    return list(first.values())


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


# Each width of rollup and its table, widest first.
ROLLUPS: tuple[tuple[int, type[RollupColumns]], ...] = (
    (DAY_MS, StatsDay),
    (HOUR_MS, StatsRollup),
    (MINUTE_MS, StatsMinute),
)


def _upsert(
    counts: Counter[tuple[int, str, str, int]], widths: Sequence[int] = (DAY_MS, HOUR_MS, MINUTE_MS)
) -> None:
    """Add minute-keyed ``counts`` to the rollups of ``widths``, each summed to its units."""
    for width, table in ROLLUPS:
        if width not in widths:
            continue
        rows: Counter[tuple[int, str, str, int]] = Counter()
        for (minute, model, series, bucket), n in counts.items():
            rows[(minute - minute % width, model, series, bucket)] += n
        upsert_adding(
            table._meta.db_table,
            (table.unit, "model", "series", "bucket"),
            ("count",),
            [(*k, n) for k, n in sorted(rows.items())],
        )


# -- counting a window from its events ------------------------------------------------


def window_tally(
    *spans: tuple[int, int], model: str | None = None, counted: tuple[int, int] | None = None
) -> Tally:
    """The tally of the events stamped in ``spans`` (each ``(since, until)``, epoch ms, both
    included), read from the events: one GROUP BY for the counts of each table, the
    ``generationCompleted`` payloads, and each attempt's first token by the generation index.

    ``counted``: whole minutes ``[start, end)`` inside the one span whose event counts are
    read from the minute rollups instead (exact, as the ingester keeps them), so a window's
    token events (nearly all of its rows) are read only at its edges; its observations (the
    percentiles' values) are still every one of the window's."""
    tally = Tally()
    stamped = Q()
    for since, until in spans:
        stamped |= Q(timestamp__gte=since, timestamp__lte=until)
    window = EventRecord.objects.filter(stamped)
    counting = stamped
    if counted is not None:
        ((since, until),), (start, end) = spans, counted
        counting = Q(pk__in=[])  # nothing, unless an edge holds time
        for edge_since, edge_until in ((since, start - 1), (end, until)):
            if edge_since <= edge_until:
                counting |= Q(timestamp__gte=edge_since, timestamp__lte=edge_until)
        rolled = StatsMinute.objects.filter(
            minute__gte=start, minute__lt=end, series__startswith=EVENTS_SERIES
        )
        if model is not None:
            rolled = rolled.filter(model=model[:MODEL_COLUMN_LENGTH])
        for minute, m, series, n in rolled.values_list("minute", "model", "series", "count"):
            tally.counts[(minute, m, series, 0)] += n
    records = EventRecord.objects.filter(counting)
    tokens = TokenEvent.objects.filter(counting)
    channels = dict(Channel.objects.values_list("id", "model"))
    if model is not None:
        window = window.filter(model=model[:MODEL_COLUMN_LENGTH])
        records = records.filter(model=model[:MODEL_COLUMN_LENGTH])
        tokens = tokens.filter(
            channel_id__in=[c for c, m in channels.items() if m == model[:MODEL_COLUMN_LENGTH]]
        )
    minutes = records.order_by().annotate(minute=F("timestamp") - Mod("timestamp", MINUTE_MS))
    for row in minutes.values("minute", "model", "type").annotate(n=Count("*")):
        tally.event(int(row["minute"]), row["model"], row["type"], row["n"])
    # Token events by their (source, model) pair, a small number each minute; the pair's model.
    token_minutes = tokens.order_by().annotate(minute=F("timestamp") - Mod("timestamp", MINUTE_MS))
    for row in token_minutes.values("minute", "channel_id").annotate(n=Count("*")):
        tally.event(int(row["minute"]), channels.get(row["channel_id"], ""), "tokenGenerated", row["n"])
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


# -- rebuilding hours from their events ----------------------------------------------


def rollups_rebuild(
    *,
    since_hour: int | None = None,
    everything: bool = False,
    on_hour: Callable[[int, int, int], None] | None = None,
) -> int:
    """Build the rollups (hourly, minute and daily) of the hours stored before they existed, newest
    first, one hour a transaction, moving the coverage back as each is done (stats read it
    at once). ``everything`` rebuilds every stored hour (events loaded around the ingester,
    by a restore or a bulk load). ``on_hour(hour, events, hours_left)`` reports progress.
    Returns the hours built.

    Safe beside running ingesters: an hour's rows are replaced under the rows' locks,
    and an ingester's later addition adds to what was counted without it.
    """
    coverage = StatsCoverage.load()
    oldest = Event.objects.order_by("timestamp").values_list("timestamp", flat=True).first()
    if oldest is None:
        StatsCoverage.objects.filter(pk=coverage.pk).update(covered_from=0, minutes_from=0)
        return 0
    # An hour without its minutes is built again whole (after the upgrade that brought them).
    hour, built = max(coverage.covered_from, coverage.minutes_from), 0
    if everything:
        newest = Event.objects.order_by("-timestamp").values_list("timestamp", flat=True).first() or 0
        hour = hour_of(newest) + HOUR_MS
        StatsCoverage.objects.filter(pk=coverage.pk).update(covered_from=hour, minutes_from=hour)
    hours_from = min(coverage.covered_from, hour)
    stop = hour_of(oldest) if since_hour is None else max(hour_of(oldest), hour_of(since_hour))
    while hour > stop:
        hour -= HOUR_MS
        hours_from = min(hours_from, hour)
        with transaction.atomic():
            StatsRollup.objects.filter(hour=hour).delete()
            StatsMinute.objects.filter(minute__gte=hour, minute__lt=hour + HOUR_MS).delete()
            tally = window_tally((hour, hour + HOUR_MS - 1))
            _upsert(tally.counts, (HOUR_MS, MINUTE_MS))
            if hour % DAY_MS == 0 or hour == stop:  # the day's hours are done: its sum
                _day_from_hours(hour - hour % DAY_MS)
            StatsCoverage.objects.filter(pk=coverage.pk).update(covered_from=hours_from, minutes_from=hour)
        built += 1
        if on_hour is not None:
            events = sum(n for (_, _, s, _), n in tally.counts.items() if s.startswith(EVENTS_SERIES))
            on_hour(hour, events, (hour - stop) // HOUR_MS)
    if since_hour is None:
        StatsCoverage.objects.filter(pk=coverage.pk).update(covered_from=0, minutes_from=0)
    return built


def _day_from_hours(day: int) -> None:
    """A day's rollups made again as the sum of its hours' (after those were rebuilt)."""
    StatsDay.objects.filter(day=day).delete()
    hours = StatsRollup.objects.filter(hour__gte=day, hour__lt=day + DAY_MS).order_by()
    rows = hours.values_list("model", "series", "bucket").annotate(n=Sum("count"))
    upsert_adding(
        StatsDay._meta.db_table,
        ("day", "model", "series", "bucket"),
        ("count",),
        sorted((day, m, series, bucket, n) for m, series, bucket, n in rows),
    )


def rollups_prune(before_ms: int) -> int:
    """Delete the rollups of hours that end before ``before_ms`` (retention), their minutes, and
    the days those hours were part of."""
    cutoff = hour_of(before_ms)
    deleted, _ = StatsRollup.objects.filter(hour__lt=cutoff).delete()
    StatsMinute.objects.filter(minute__lt=cutoff).delete()
    StatsDay.objects.filter(day__lt=cutoff).delete()
    return deleted
