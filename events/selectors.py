"""Reads that answer users' questions: a generation's life, the fleet."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from django.conf import settings
from django.db.models import Count, Sum

from events.history import StoredEvent, generation_events
from events.models import DeadLetter, Generation, SourceMinute, Worker
from events.responses import (
    AttemptOut,
    EventCounts,
    GenerationCounts,
    GenerationError,
    GenerationOut,
    LatencyFigures,
    Percentiles,
    RateFigures,
    StatsOut,
    WorkerOut,
)
from events.rollups import MINUTE_MS
from events.windows import bucket_percentile, window_figures
from mlxserve.contract.generations import time_to_first_token_ms, tokens_per_second
from telemetry.services import telemetry_config_get

# A worker is stale after this many heartbeat intervals without a word.
STALE_AFTER_HEARTBEATS = 3


@dataclass
class Attempt:
    number: int
    events: list[StoredEvent] = field(default_factory=list)

    def first(self, event_type: str) -> StoredEvent | None:
        return next((e for e in self.events if e.out.type == event_type), None)

    @property
    def tokens(self) -> list[StoredEvent]:
        return [e for e in self.events if e.out.type == "tokenGenerated"]

    @property
    def state(self) -> str:
        if self.first("generationCompleted"):
            return "completed"
        if self.first("error"):
            return "failed"
        return "running" if self.first("generationStarted") else "queued"

    @property
    def source(self) -> str | None:
        return self.events[0].out.source if self.events else None

    def summary(self) -> AttemptOut:
        started, completed, error = (
            self.first("generationStarted"),
            self.first("generationCompleted"),
            self.first("error"),
        )
        tokens = self.tokens
        ttft = (
            time_to_first_token_ms(started.out.timestamp, tokens[0].out.timestamp)
            if started and tokens
            else None
        )
        if completed is not None and "throughput" in completed.payload:
            rate = completed.payload["throughput"]
        elif tokens:
            rate = tokens_per_second(len(tokens), (tokens[-1].out.timestamp - tokens[0].out.timestamp) / 1000)
        else:
            rate = None
        return AttemptOut(
            attempt=self.number,
            state=self.state,  # type: ignore[arg-type]
            source=self.source,
            text="".join(e.payload["token"] for e in tokens),
            tokens=len(tokens),
            time_to_first_token_ms=ttft,
            tokens_per_second=rate,
            duration_ms=completed.payload["durationMs"] if completed else None,
            error=GenerationError(code=error.payload.get("code"), message=error.payload["error"])
            if error
            else None,
        )


def _attempts(events: list[StoredEvent]) -> list[Attempt]:
    """Split a generation's events into attempts: each ``generationStarted`` opens one.

    Timestamps are milliseconds, so the end of one attempt and the start of the
    next can share one; ``seq`` cannot lie: an event continues the latest attempt
    whose last ``seq`` is just before its own.
    """
    attempts: list[Attempt] = []
    for event in events:
        if event.out.type == "generationStarted" or not attempts:
            number = (
                (event.payload.get("metadata") or {}).get("attempt")
                if event.out.type == "generationStarted"
                else None
            )
            attempts.append(Attempt(number=number if isinstance(number, int) else len(attempts) + 1))
            attempts[-1].events.append(event)
            continue
        owner = attempts[-1]
        if owner.events[-1].out.seq != event.out.seq - 1:  # not the latest attempt's next: an older one's?
            owner = next((a for a in reversed(attempts) if a.events[-1].out.seq == event.out.seq - 1), owner)
        owner.events.append(event)
    return attempts


def _summaries(attempts: list[Attempt]) -> list[AttemptOut]:
    summaries = [a.summary() for a in attempts]
    for summary in summaries[:-1]:
        if summary.state == "running":
            # A newer attempt began (the worker died and the task was redelivered).
            summary.state = "abandoned"
    return summaries


def generation_detail(*, generation_id: uuid.UUID) -> GenerationOut | None:
    """The generation's state, text so far, figures, every attempt and its events in order.

    None if neither the request nor any event of it is known.
    """
    read = generation_read(generation_id=generation_id)
    return read[0] if read else None


def generation_read(*, generation_id: uuid.UUID) -> tuple[GenerationOut, list[Attempt]] | None:
    """``generation_detail`` and the attempts it was made from (the admin page draws their
    tokens: text, log-probabilities, times)."""
    own = Generation.objects.filter(pk=generation_id).values_list("model", "created_at")
    events, [generation_rows] = generation_events(generation_id, also=[own])
    if not generation_rows and not events:
        return None
    # No row: a generation queued elsewhere (straight on the broker) is known by its events.
    model, created_at = generation_rows[0] if generation_rows else (events[0].payload.get("model"), None)
    raw = _attempts(events)
    attempts = _summaries(raw)
    latest = attempts[-1] if attempts else Attempt(number=0).summary()
    detail = GenerationOut(
        **{f: getattr(latest, f) for f in AttemptOut.__struct_fields__},
        generation_id=str(generation_id),
        model=model,
        created_at=created_at,
        attempts=attempts,
        events=[e.out for e in events],
    )
    return detail, raw


def generation_latest_tokens(*, generation_id: uuid.UUID) -> tuple[int, list[tuple[int, str]]]:
    """The number of the generation's latest attempt (0 before it starts) and that attempt's
    tokens stored so far as ``(seq, token)``, in ``seq`` order (there may be gaps still)."""
    events, _ = generation_events(generation_id)
    attempts = _attempts(events)
    if not attempts:
        return 0, []
    return attempts[-1].number, sorted((e.out.seq, e.payload["token"]) for e in attempts[-1].tokens)


def heartbeat_interval_ms() -> int:
    """How often workers say they are alive: ``MLXSERVE_HEARTBEAT_SECONDS``, or the config's interval."""
    return settings.WORKER_HEARTBEAT_SECONDS * 1000 or telemetry_config_get().export_interval_ms


def worker_is_stale(worker: Worker, *, interval_ms: int | None = None, now_ms: int | None = None) -> bool:
    return worker.last_heard_at < heard_since(interval_ms=interval_ms, now_ms=now_ms)


def heard_since(*, interval_ms: int | None = None, now_ms: int | None = None) -> int:
    """The epoch ms a worker must have been heard from since to be live (not stale)."""
    interval_ms = interval_ms or heartbeat_interval_ms()
    now_ms = now_ms or time.time_ns() // 1_000_000
    return now_ms - STALE_AFTER_HEARTBEATS * interval_ms


@dataclass
class WorkerActivity:
    """A worker's last hour, from its per-minute counts: ``per_minute`` holds the tokens of
    each of the 60 whole minutes before the current one, oldest first; ``current`` those of
    the minute under way, ``current_fraction`` of which has passed."""

    per_minute: list[int]
    errors_last_hour: int
    current: int = 0
    current_fraction: float = 0.0

    @property
    def tokens_per_second_last_minute(self) -> float:
        """Over the last 60 seconds: the minute under way, and the part of the one before
        it that is still within 60 seconds (as if its tokens came evenly)."""
        return (self.current + self.per_minute[-1] * (1 - self.current_fraction)) / 60

    @property
    def tokens_per_second_last_hour(self) -> float:
        return sum(self.per_minute) / 3600


def workers_activity(
    sources: list[str] | None = None, *, now_ms: int | None = None
) -> dict[str, WorkerActivity]:
    """The last hour of each source (all of them when ``sources`` is None): one range read of
    the per-minute table, at most 61 rows a source."""
    now_ms = now_ms or time.time_ns() // 1_000_000
    current = now_ms - now_ms % MINUTE_MS
    since = current - 60 * MINUTE_MS
    fraction = (now_ms - current) / MINUTE_MS
    rows = SourceMinute.objects.filter(minute__gte=since, minute__lte=current)
    if sources is not None:
        rows = rows.filter(source__in=sources)

    def empty() -> WorkerActivity:
        return WorkerActivity(per_minute=[0] * 60, errors_last_hour=0, current_fraction=fraction)

    activity: dict[str, WorkerActivity] = {}
    for source, minute, tokens, errors in rows.values_list("source", "minute", "tokens", "errors"):
        entry = activity.setdefault(source, empty())
        if minute == current:
            entry.current += tokens
        else:
            entry.per_minute[(minute - since) // MINUTE_MS] += tokens
            entry.errors_last_hour += errors
    for source in sources or ():
        activity.setdefault(source, empty())
    return activity


@dataclass
class FleetOverview:
    """What the admin's index shows first: is the fleet healthy."""

    workers: int
    by_status: dict[str, int]
    stale: list[Worker]  # the longest silent first, at most ``STALE_SHOWN``
    stale_count: int
    tokens_per_second_last_minute: float
    tokens_per_second_last_hour: float
    errors_last_hour: int
    dead_letters_waiting: int  # counted up to DEAD_LETTERS_COUNTED
    ingest_lag: dict[str, int] | None  # None: Redis did not answer


@dataclass
class ConfigRollout:
    """Which live workers (heard from within three heartbeats) run config ``version``."""

    version: int
    applied: list[Worker]
    behind: list[Worker]  # on an older version, or silent about theirs (older workers)

    @property
    def live(self) -> int:
        return len(self.applied) + len(self.behind)


def config_rollout(version: int, *, now_ms: int | None = None, limit: int = 200) -> ConfigRollout:
    live = Worker.objects.filter(last_heard_at__gte=heard_since(now_ms=now_ms)).order_by("source")
    return ConfigRollout(
        version=version,
        applied=list(live.filter(config_version__gte=version)[:limit]),
        behind=list(live.exclude(config_version__gte=version)[:limit]),
    )


STALE_SHOWN = 10
DEAD_LETTERS_COUNTED = 10_000


def fleet_overview(
    *, now_ms: int | None = None, lag: Callable[[], dict[str, int]] | None = None
) -> FleetOverview:
    """A few indexed reads, whatever the fleet's size and the events stored: worker rows, the
    last hour's per-minute table and the first 10,000 dead letters waiting."""
    now_ms = now_ms or time.time_ns() // 1_000_000
    threshold = heard_since(now_ms=now_ms)
    by_status = {
        (row["status"] or "no status yet"): row["n"]
        for row in Worker.objects.order_by().values("status").annotate(n=Count("*"))
    }
    stale = Worker.objects.filter(last_heard_at__lt=threshold)
    current = now_ms - now_ms % MINUTE_MS
    hour = SourceMinute.objects.filter(minute__gte=current - 60 * MINUTE_MS, minute__lt=current)
    totals = hour.aggregate(tokens=Sum("tokens"), errors=Sum("errors"))
    recent = {
        minute: tokens or 0
        for minute, tokens in SourceMinute.objects.filter(minute__gte=current - MINUTE_MS)
        .order_by()
        .values_list("minute")
        .annotate(tokens=Sum("tokens"))
    }
    fleet_minute = WorkerActivity(
        per_minute=[recent.get(current - MINUTE_MS, 0)],
        errors_last_hour=0,
        current=recent.get(current, 0),
        current_fraction=(now_ms - current) / MINUTE_MS,
    )
    waiting = DeadLetter.objects.filter(replayed_at__isnull=True).order_by()[:DEAD_LETTERS_COUNTED].count()
    try:
        ingest_lag = lag() if lag is not None else None
    except Exception:  # Redis unreachable: the page says so, it does not fail
        ingest_lag = None
    return FleetOverview(
        workers=sum(by_status.values()),
        by_status=dict(sorted(by_status.items())),
        stale=list(stale.order_by("last_heard_at")[:STALE_SHOWN]),
        stale_count=stale.count(),
        tokens_per_second_last_minute=fleet_minute.tokens_per_second_last_minute,
        tokens_per_second_last_hour=(totals["tokens"] or 0) / 3600,
        errors_last_hour=totals["errors"] or 0,
        dead_letters_waiting=waiting,
        ingest_lag=ingest_lag,
    )


def workers_out(workers: Iterable[Worker]) -> list[WorkerOut]:
    """Worker rows as the API shows them (``stale`` worked out now)."""
    interval_ms = heartbeat_interval_ms()
    now_ms = time.time_ns() // 1_000_000
    return [
        WorkerOut(
            source=w.source,
            status=w.status or None,
            models_loaded=w.models_loaded,
            active_tasks=w.active_tasks,
            last_status_at=w.last_status_at or None,
            last_heard_at=w.last_heard_at,
            stale=worker_is_stale(w, interval_ms=interval_ms, now_ms=now_ms),
        )
        for w in workers
    ]


def _percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 by linear interpolation between closest ranks (None when there is no data)."""
    if not values:
        return dict.fromkeys(Percentiles.__struct_fields__)
    ordered = sorted(values)
    result: dict[str, float | None] = {}
    for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        result[name] = round(ordered[low] + (ordered[high] - ordered[low]) * (position - low), 3)
    return result


def events_stats(*, since: int, until: int, model: str | None = None, use_rollups: bool = True) -> StatsOut:
    """What the fleet did in ``[since, until]`` (epoch ms): counts, tokens/s, time to first
    token and duration, from the hourly rollups for whole hours and the events for the
    rest (``events.rollups``). Per generation: tokens/s and duration from each
    ``generationCompleted`` in the window (its ``throughput``, or tokens over duration);
    time to first token from each ``generationStarted`` in the window to its attempt's
    first token. ``use_rollups=False`` reads every event in the window (the figures the
    rollups stand for, exact and slow: tests and the bench compare the two).
    """
    figures = window_figures(since, until, model=model, use_rollups=use_rollups)
    by_type: dict[str, int] = {}
    by_model: dict[str, int] = {}
    for (m, event_type), count in sorted(figures.events.items()):
        by_type[event_type] = by_type.get(event_type, 0) + count
        if m:
            by_model[m] = by_model.get(m, 0) + count

    def percentiles(histogram: str) -> dict[str, float | None]:
        if figures.exact is not None:
            return _percentiles(figures.exact.get(histogram, []))
        counts = figures.buckets[histogram]
        return {
            name: None if (v := bucket_percentile(counts, q)) is None else round(v, 3)
            for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
        }

    def observed(histogram: str) -> int:
        return sum(figures.buckets[histogram].values())

    seconds = max(until - since, 1) / 1000
    tokens = by_type.get("tokenGenerated", 0)
    return StatsOut(
        since=since,
        until=until,
        model=model,
        events=EventCounts(total=sum(by_type.values()), by_type=by_type, by_model=by_model),
        generations=GenerationCounts(
            started=by_type.get("generationStarted", 0),
            completed=by_type.get("generationCompleted", 0),
            errors=by_type.get("error", 0),
        ),
        tokens=tokens,
        tokens_per_second=RateFigures(fleet=round(tokens / seconds, 3), **percentiles("tokensPerSecond")),
        time_to_first_token_ms=LatencyFigures(count=observed("ttftMs"), **percentiles("ttftMs")),
        duration_ms=LatencyFigures(count=observed("durationMs"), **percentiles("durationMs")),
        percentiles="exact" if figures.exact is not None else "buckets",
    )
