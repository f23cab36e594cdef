from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis
from django.db import DataError, transaction
from django.utils import timezone

from events.models import MODEL_COLUMN_LENGTH, DeadLetter, Event, Generation, RegisteredModel, Worker
from events.schemas import Envelope, GenerationOrder, envelope_decode, envelope_encode, envelope_validate
from events.stream import entry_envelopes, stream_append, stream_append_batch, stream_ensure_group
from mlxserve.validation import ValidationFailed, validate

logger = logging.getLogger(__name__)


# -- intake (the API) --------------------------------------------------------------


@dataclass
class BatchOutcome:
    accepted: list[str] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


def event_submit(*, client: redis.Redis, stream: str, data: Any) -> str:
    """One envelope: validate it and append it to the stream. Returns its id."""
    envelope = envelope_validate(data)
    stream_append(client, stream, [envelope_encode(envelope)])
    return str(envelope.id)


def event_submit_batch(*, client: redis.Redis, stream: str, items: Sequence[Any]) -> BatchOutcome:
    """An array of envelopes: the valid ones go to the stream whatever the others hold."""
    outcome = BatchOutcome()
    valid: list[Envelope] = []
    for index, item in enumerate(items):
        try:
            valid.append(envelope_validate(item))
        except ValidationFailed as exc:
            outcome.rejected.append({"index": index, "error": exc.as_error()})
    # One stream entry for the whole batch, as workers send theirs.
    stream_append_batch(client, stream, [envelope_encode(e) for e in valid])
    outcome.accepted = [str(e.id) for e in valid]
    return outcome


# -- storage (the ingester) ----------------------------------------------------------


@dataclass
class StoreOutcome:
    stored: int = 0
    duplicates: int = 0
    dead: int = 0


def _event_row(envelope: Envelope, now: Any) -> Event:
    payload = envelope.payload
    model = getattr(payload, "model", "")
    return Event(
        id=envelope.id,
        type=str(type(envelope).__struct_config__.tag),
        timestamp=envelope.timestamp,
        source=envelope.source,
        generation_id=envelope.generation_id,
        seq=envelope.seq,
        model=model[:MODEL_COLUMN_LENGTH] if isinstance(model, str) else "",
        payload=_to_builtins(payload),
        ingested_at=now,
    )


def _to_builtins(payload: Any) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.to_builtins(payload)
    return result


def events_store(entries: Sequence[tuple[str, bytes]]) -> StoreOutcome:
    """Store stream entries ``(entry_id, body)`` in one transaction.

    Valid envelopes become events, idempotent on ``id`` (a repeat is skipped
    by the database, not by a read first). Invalid ones become dead letters
    with their error, so they never hold up the entries behind them.
    """
    now = timezone.now()
    rows: dict[Any, tuple[Event, str, bytes]] = {}
    dead: list[DeadLetter] = []
    for entry_id, body in entries:
        try:
            envelope = envelope_decode(storable_body(body))
        except ValidationFailed as exc:
            dead.append(_dead_letter(entry_id, body, exc.as_error()))
            continue
        rows.setdefault(envelope.id, (_event_row(envelope, now), entry_id, body))
    with transaction.atomic():
        before = Event.objects.filter(pk__in=list(rows)).count() if rows else 0
        events = [row for row, _, _ in rows.values()]
        try:
            with transaction.atomic():
                Event.objects.bulk_create(events, ignore_conflicts=True, batch_size=500)
        except DataError:
            # One row the database will not take must not hold up the rest: go row
            # by row, and keep the ones it refuses as dead letters with its reason.
            events = []
            for row, entry_id, body in rows.values():
                try:
                    with transaction.atomic():
                        Event.objects.bulk_create([row], ignore_conflicts=True)
                    events.append(row)
                except DataError as exc:
                    dead.append(_dead_letter(entry_id, body, _storage_error(exc)))
        DeadLetter.objects.bulk_create(dead)
        workers_note(events)
    duplicates = before + (len(entries) - len(dead) - len(rows))
    return StoreOutcome(stored=len(events) - before, duplicates=max(duplicates, 0), dead=len(dead))


# PostgreSQL cannot hold U+0000 in text or jsonb. An escaped NUL in the JSON
# (never a raw one: JSON forbids it) is stored as U+FFFD, on SQLite too, so
# both databases keep the same thing. An escaped backslash before "u0000"
# is literal text and is left alone.
_ESCAPED_NUL = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")


def storable_body(body: bytes) -> bytes:
    if b"\\u0000" not in body:
        return body
    return _ESCAPED_NUL.sub(rb"\1\\ufffd", body)


def _dead_letter(entry_id: str, body: bytes, error: dict[str, Any]) -> DeadLetter:
    text = body.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    return DeadLetter(stream_id=entry_id, body=text, error=error)


def _storage_error(exc: Exception) -> dict[str, Any]:
    message = f"The database refused the event: {exc}".strip()
    return {
        "code": "StorageFailed",
        "message": message,
        "details": {"field": "root", "issues": [{"path": [], "message": message, "code": "storage_failed"}]},
    }


def workers_note(events: Iterable[Event]) -> None:
    """Bring each source's worker row up to date: when last heard, last runtime status.

    Idempotent and order-free (an older or repeated event changes nothing), so
    several ingesters and redelivered entries are harmless.
    """
    heard: dict[str, int] = {}
    statuses: dict[str, Event] = {}
    for event in events:
        heard[event.source] = max(heard.get(event.source, 0), event.timestamp)
        if event.type == "runtimeStatus" and event.timestamp >= getattr(
            statuses.get(event.source), "timestamp", 0
        ):
            statuses[event.source] = event
    if not heard:
        return
    Worker.objects.bulk_create([Worker(source=s) for s in heard], ignore_conflicts=True)
    for source, timestamp in heard.items():
        Worker.objects.filter(source=source, last_heard_at__lt=timestamp).update(last_heard_at=timestamp)
    for source, event in statuses.items():
        Worker.objects.filter(source=source, last_status_at__lte=event.timestamp).update(
            status=event.payload["status"],
            models_loaded=event.payload["modelsLoaded"],
            active_tasks=event.payload.get("activeTasks", 0),
            last_status_at=event.timestamp,
        )


@dataclass
class EventIngester:
    """Redis stream to database, through a consumer group. One ``step`` per loop turn.

    An entry is acknowledged only after the transaction that stored it has
    committed; if the process dies in between, the entry is delivered again
    and the idempotent insert skips it. Entries left pending by a consumer
    that died are claimed after ``claim_idle_ms``.
    """

    client: redis.Redis
    stream: str
    group: str
    consumer: str
    batch_size: int = 500
    block_ms: int = 1000
    claim_idle_ms: int = 60_000
    # Start by re-reading our own pending entries: a previous run of this
    # consumer may have stored them and died before acknowledging.
    _read_pending: bool = True
    _group_ready: bool = False

    def step(self) -> StoreOutcome:
        if not self._group_ready:
            stream_ensure_group(self.client, self.stream, self.group)
            self._group_ready = True
        entries = self._read()
        if not entries:
            return StoreOutcome()
        try:
            outcome = events_store(
                [e for entry_id, fields in entries for e in entry_envelopes(entry_id, fields)]
            )
        except Exception:
            # Nothing was acknowledged; read these again next turn.
            self._read_pending = True
            raise
        self.client.xack(self.stream, self.group, *[entry_id for entry_id, _ in entries])
        return outcome

    def _read(self) -> list[tuple[str, dict[bytes, bytes]]]:
        if self._read_pending:
            pending = self._xread("0", block=None)
            if pending:
                return pending
            self._read_pending = False
            claimed = self._claim()
            if claimed:
                return claimed
        return self._xread(">", block=self.block_ms)

    def _xread(self, start: str, block: int | None) -> list[tuple[str, dict[bytes, bytes]]]:
        response: Any = self.client.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=self.batch_size, block=block
        )
        entries: list[tuple[str, dict[bytes, bytes]]] = []
        for _stream, items in response or []:
            for entry_id, fields in items:
                if fields is None:  # deleted while pending
                    self.client.xack(self.stream, self.group, entry_id)
                    continue
                key = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                entries.append((key, fields))
        return entries

    def _claim(self) -> list[tuple[str, dict[bytes, bytes]]]:
        """Take over entries another consumer read and never acknowledged (it died)."""
        response: Any = self.client.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id="0-0",
            count=self.batch_size,
        )
        entries: list[tuple[str, dict[bytes, bytes]]] = []
        for entry_id, fields in response[1]:
            key = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            if fields is None:
                self.client.xack(self.stream, self.group, key)
                continue
            entries.append((key, fields))
        return entries


def stream_lag(*, client: redis.Redis, stream: str, group: str) -> dict[str, int]:
    """Stream length and entries read but not yet acknowledged."""
    try:
        pending = client.xpending(stream, group)
        length = client.xlen(stream)
    except redis.ResponseError:
        return {"length": 0, "pending": 0}
    return {"length": int(length), "pending": int(pending["pending"])}


# -- generations -------------------------------------------------------------------------


def generation_queue(*, data: Any, user: Any = None) -> Generation:
    """Validate a generation request, record it and queue it for a worker (SPEC section 4).

    ``model`` may name a registry entry; the worker gets the path it stands for.
    Raises ``ValidationFailed``, or ``kombu``/``redis`` errors if the broker is down
    (then nothing is recorded).
    """
    from events.tasks import generation_run

    order = validate(data, GenerationOrder)
    registered = RegisteredModel.objects.filter(name=order.model).first()
    generation = Generation.objects.create(
        id=uuid.uuid4(),
        model=order.model,
        model_path=registered.path if registered else "",
        prompt=order.prompt,
        max_tokens=order.max_tokens,
        options={"temperature": order.temperature, "topP": order.top_p, "seed": order.seed},
        requested_by=user if user is not None and user.is_authenticated else None,
    )
    try:
        generation_run.apply_async(
            kwargs={
                "generation_id": str(generation.id),
                "model": order.model,
                "model_path": registered.path if registered else None,
                "prompt": order.prompt,
                "max_tokens": order.max_tokens,
                "temperature": order.temperature,
                "top_p": order.top_p,
                "seed": order.seed,
            },
            retry=False,
        )
    except Exception:
        generation.delete()
        raise
    return generation
