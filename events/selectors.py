"""Reads that answer users' questions: a generation's life, the fleet."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from events.models import Event, Generation, Worker
from telemetry.services import telemetry_config_get

# A worker is stale after this many heartbeat intervals without a word.
STALE_AFTER_HEARTBEATS = 3


@dataclass
class Attempt:
    number: int
    events: list[Event] = field(default_factory=list)

    def first(self, event_type: str) -> Event | None:
        return next((e for e in self.events if e.type == event_type), None)

    @property
    def tokens(self) -> list[Event]:
        return [e for e in self.events if e.type == "tokenGenerated"]

    @property
    def state(self) -> str:
        if self.first("generationCompleted"):
            return "completed"
        if self.first("error"):
            return "failed"
        return "running" if self.first("generationStarted") else "queued"

    @property
    def source(self) -> str | None:
        return self.events[0].source if self.events else None

    def summary(self) -> dict[str, Any]:
        started, completed, error = (
            self.first("generationStarted"),
            self.first("generationCompleted"),
            self.first("error"),
        )
        tokens = self.tokens
        ttft = tokens[0].timestamp - started.timestamp if started and tokens else None
        if completed is not None and "throughput" in completed.payload:
            tokens_per_second = completed.payload["throughput"]
        elif len(tokens) > 1 and tokens[-1].timestamp > tokens[0].timestamp:
            tokens_per_second = (len(tokens) - 1) * 1000 / (tokens[-1].timestamp - tokens[0].timestamp)
        else:
            tokens_per_second = None
        return {
            "attempt": self.number,
            "state": self.state,
            "source": self.source,
            "text": "".join(e.payload["token"] for e in tokens),
            "tokens": len(tokens),
            "timeToFirstTokenMs": ttft,
            "tokensPerSecond": tokens_per_second,
            "durationMs": completed.payload["durationMs"] if completed else None,
            "error": {"code": error.payload.get("code"), "message": error.payload["error"]}
            if error
            else None,
        }


def _attempts(events: list[Event]) -> list[Attempt]:
    """Split a generation's events into attempts: each ``generationStarted`` opens one.

    Timestamps are milliseconds, so the end of one attempt and the start of the
    next can share one; ``seq`` cannot lie: an event continues the latest attempt
    whose last ``seq`` is just before its own.
    """
    attempts: list[Attempt] = []
    for event in events:
        if event.type == "generationStarted" or not attempts:
            number = (
                (event.payload.get("metadata") or {}).get("attempt")
                if event.type == "generationStarted"
                else None
            )
            attempts.append(Attempt(number=number if isinstance(number, int) else len(attempts) + 1))
            attempts[-1].events.append(event)
            continue
        owner = next(
            (a for a in reversed(attempts) if a.events[-1].seq == event.seq - 1),
            attempts[-1],
        )
        owner.events.append(event)
    return attempts


def _summaries(attempts: list[Attempt]) -> list[dict[str, Any]]:
    summaries = [a.summary() for a in attempts]
    for summary in summaries[:-1]:
        if summary["state"] == "running":
            # A newer attempt began (the worker died and the task was redelivered).
            summary["state"] = "abandoned"
    return summaries


def generation_detail(*, generation_id: uuid.UUID) -> dict[str, Any] | None:
    """The generation's state, text so far, figures, every attempt and its events in order.

    None if neither the request nor any event of it is known.
    """
    generation = Generation.objects.filter(pk=generation_id).first()
    events = list(Event.objects.filter(generation_id=generation_id).order_by("timestamp", "seq"))
    if generation is None and not events:
        return None
    attempts = _summaries(_attempts(events))
    latest = attempts[-1] if attempts else Attempt(number=0).summary()
    return {
        "generationId": str(generation_id),
        "model": generation.model if generation else (events[0].model if events else None),
        "createdAt": generation.created_at if generation else None,
        **{k: v for k, v in latest.items() if k != "attempt"},
        "attempt": latest["attempt"] if attempts else 0,
        "attempts": attempts,
        "events": events,
    }


def workers_list() -> list[dict[str, Any]]:
    interval_ms = telemetry_config_get().export_interval_ms
    now_ms = time.time_ns() // 1_000_000
    return [
        {
            "source": w.source,
            "status": w.status or None,
            "modelsLoaded": w.models_loaded,
            "activeTasks": w.active_tasks,
            "lastStatusAt": w.last_status_at or None,
            "lastHeardAt": w.last_heard_at,
            "stale": now_ms - w.last_heard_at > STALE_AFTER_HEARTBEATS * interval_ms,
        }
        for w in Worker.objects.order_by("source")
    ]
