"""The API's response shapes, declared once: the selectors build them, the views return them
(msgspec encodes them), and the OpenAPI schema is generated from them, as request bodies' is."""

from __future__ import annotations

import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from mlxserve.web.openapi import ERROR_SCHEMA

Uuid = Annotated[str, Meta(extra_json_schema={"format": "uuid"})]
Timestamp = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]
# A payload goes out as the database holds it: read as JSON text, never decoded and re-encoded.
RawObject = Annotated[msgspec.Raw, Meta(extra_json_schema={"type": "object"})]


class _Shape(msgspec.Struct, rename="camel", kw_only=True, gc=False):
    pass


class EventOut(_Shape):
    """A stored event: the envelope as it was sent, plus when it was stored."""

    id: Uuid
    type: str
    timestamp: int
    source: str
    generation_id: Uuid | None
    seq: int
    payload: RawObject
    ingested_at: Timestamp


class Accepted(_Shape):
    """One event accepted: it is on the stream and will be stored."""

    id: Uuid


# The error object (its schema is the one every error response has).
ErrorObject = Annotated[dict[str, Any], Meta(extra_json_schema=ERROR_SCHEMA)]


class Rejected(_Shape):
    index: int
    error: ErrorObject


class BatchOutcome(_Shape):
    """Each item of a posted array: accepted (its id), or rejected with its index and error object."""

    accepted: list[Uuid]
    rejected: list[Rejected]


class GenerationQueued(_Shape):
    generation_id: Uuid


class GenerationError(_Shape):
    code: str | None
    message: str


GenerationState = Literal["queued", "running", "completed", "failed", "abandoned"]


class AttemptOut(_Shape):
    """One attempt at a generation (a worker that died makes the next one)."""

    attempt: int
    state: GenerationState
    source: str | None
    text: str
    tokens: int
    time_to_first_token_ms: float | None
    tokens_per_second: float | None
    duration_ms: float | None
    error: GenerationError | None


class GenerationOut(AttemptOut):
    """A generation: the figures of its latest attempt, every attempt, every event in order."""

    generation_id: Uuid
    model: str | None
    created_at: datetime.datetime | None
    attempts: list[AttemptOut]
    events: list[EventOut]


class WorkerOut(_Shape):
    """A worker as its events tell it: last runtimeStatus, when last heard from."""

    source: str
    status: str | None
    models_loaded: int
    active_tasks: int
    last_status_at: int | None
    last_heard_at: int
    stale: bool


class EventCounts(_Shape):
    total: int
    by_type: dict[str, int]
    by_model: dict[str, int]


class GenerationCounts(_Shape):
    started: int
    completed: int
    errors: int


class Percentiles(_Shape):
    p50: float | None
    p95: float | None
    p99: float | None


class RateFigures(Percentiles):
    """Per-generation tokens/s percentiles, and ``fleet``: every token in the window over its length."""

    fleet: float


class LatencyFigures(Percentiles):
    count: int


class StatsOut(_Shape):
    since: int
    until: int
    model: str | None
    events: EventCounts
    generations: GenerationCounts
    tokens: int
    tokens_per_second: RateFigures
    time_to_first_token_ms: LatencyFigures
    duration_ms: LatencyFigures
    # "exact" when every value in the window was read; "buckets" when whole hours came from
    # the hourly rollups (percentiles within one of their buckets, about 19% wide).
    percentiles: Literal["exact", "buckets"]


class UnloadSent(_Shape):
    listeners: int


class DeadLetterOut(_Shape):
    """What the ingester could not store, and why; the body stays in the admin."""

    id: int
    stream_id: str
    event_id: Uuid | None
    error: ErrorObject
    received_at: datetime.datetime
    replayed_at: datetime.datetime | None


def dead_letter_out(letter: Any) -> DeadLetterOut:
    return DeadLetterOut(
        id=letter.id,
        stream_id=letter.stream_id,
        event_id=str(letter.event_id) if letter.event_id else None,
        error=letter.error,
        received_at=letter.received_at,
        replayed_at=letter.replayed_at,
    )
