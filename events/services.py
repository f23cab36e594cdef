from __future__ import annotations

import logging
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import msgspec
import redis
from django.db import DatabaseError, DataError, IntegrityError, OperationalError, connection, transaction
from django.utils import timezone

from events.fleet import fleet_counters_add
from events.models import (
    MODEL_COLUMN_LENGTH,
    DeadLetter,
    Event,
    FleetCounter,
    Generation,
    PromptPolicy,
    RegisteredModel,
    Worker,
)
from events.privacy import prompt_policy_get, prompt_redact
from mlxserve.contract.events import (
    Envelope,
    GenerationOrder,
    GenerationStartedEnvelope,
    RuntimeStatusEnvelope,
    envelope_decode,
)
from mlxserve.contract.stream import (
    EntryContents,
    entry_envelopes,
    stream_ensure_group,
)
from mlxserve.contract.validation import Issue, ValidationFailed, error_object, validate

logger = logging.getLogger(__name__)


# -- intake (the API) --------------------------------------------------------------


# -- storage (the ingester) ----------------------------------------------------------


@dataclass
class StoreOutcome:
    stored: int = 0
    duplicates: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)

    @property
    def dead(self) -> int:
        return len(self.dead_letters)


_EVENT_COLUMNS = (
    "id",
    "type",
    "timestamp",
    "source",
    "generation_id",
    "seq",
    "model",
    "payload",
    "ingested_at",
)


def _event_values(envelope: Envelope, now: Any) -> tuple[Any, ...]:
    """One row of ``events_event`` in column order, payload as JSON text."""
    payload = envelope.payload
    model = getattr(payload, "model", "")
    return (
        envelope.id,
        type(envelope).__struct_config__.tag,
        envelope.timestamp,
        envelope.source,
        envelope.generation_id,
        envelope.seq,
        model[:MODEL_COLUMN_LENGTH] if isinstance(model, str) else "",
        msgspec.json.encode(payload).decode(),
        now,
    )


def _insert_postgresql(rows: list[tuple[Any, ...]]) -> int:
    """COPY into a session-local staging table, then one INSERT ... ON CONFLICT DO NOTHING.

    COPY is PostgreSQL's bulk path (no SQL text per row, no per-row round trip);
    the INSERT from the staging table keeps the insert idempotent on ``id``.
    """
    table, columns = Event._meta.db_table, ", ".join(_EVENT_COLUMNS)
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS event_staging (LIKE {table} INCLUDING DEFAULTS) "
            "ON COMMIT DELETE ROWS"
        )
        raw = cursor.cursor  # the psycopg cursor, for COPY
        with raw.copy(f"COPY event_staging ({columns}) FROM STDIN") as copy:
            # COPY's text format written directly: psycopg's write_row costs ~10 µs a row.
            copy.write("".join(map(_copy_line, rows)))
        cursor.execute(
            f"INSERT INTO {table} ({columns}) SELECT {columns} FROM event_staging ON CONFLICT (id) DO NOTHING"
        )
        inserted = cursor.rowcount
        cursor.execute("TRUNCATE event_staging")
    return int(inserted)


_COPY_SPECIAL = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value: str) -> str:
    """A value in COPY's text format: backslash, tab, newline and CR escaped."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_SPECIAL)
    return value


@lru_cache(maxsize=4)
def _copy_timestamp(moment: datetime) -> str:
    return moment.isoformat()  # the batch's rows share one ingested_at: formatted once


def _copy_line(row: tuple[Any, ...]) -> str:
    ident, kind, timestamp, source, generation_id, seq, model, payload, now = row
    generation = "\\N" if generation_id is None else str(generation_id)
    return (
        f"{ident}\t{kind}\t{timestamp}\t{_copy_text(source)}\t{generation}\t{seq}\t"
        f"{_copy_text(model)}\t{_copy_text(payload)}\t{_copy_timestamp(now)}\n"
    )


def _insert_generic(rows: list[tuple[Any, ...]]) -> int:
    """Batched multi-row INSERT ... ON CONFLICT DO NOTHING (SQLite, or any other backend)."""
    fields: list[Any] = [Event._meta.get_field(name) for name in _EVENT_COLUMNS]
    prepared = [
        tuple(
            f.get_db_prep_save(v, connection) if f.name != "payload" else v
            for f, v in zip(fields, row, strict=True)
        )
        for row in rows
    ]
    table, columns = Event._meta.db_table, ", ".join(_EVENT_COLUMNS)
    placeholders = ", ".join(["%s"] * len(_EVENT_COLUMNS))
    inserted = 0
    with connection.cursor() as cursor:
        for start in range(0, len(prepared), 100):
            chunk = prepared[start : start + 100]
            values = ", ".join([f"({placeholders})"] * len(chunk))
            cursor.execute(
                f"INSERT INTO {table} ({columns}) VALUES {values} ON CONFLICT (id) DO NOTHING",
                [v for row in chunk for v in row],
            )
            inserted += max(cursor.rowcount, 0)
    return inserted


def _insert_events(rows: list[tuple[Any, ...]]) -> int:
    """Insert, skipping ids already stored; returns how many were stored now."""
    if not rows:
        return 0
    if connection.vendor == "postgresql":
        return _insert_postgresql(rows)
    return _insert_generic(rows)


def events_store(
    entries: Sequence[tuple[str, bytes]], *, refused: Sequence[tuple[str, bytes, dict[str, Any]]] = ()
) -> StoreOutcome:
    """Store stream entries ``(entry_id, body)`` in one transaction.

    Valid envelopes become events, idempotent on ``id`` (a repeat is skipped
    by the database, not by a read first). Invalid ones, and ``refused`` items
    (what an entry held besides envelopes), become dead letters with their
    error, so they never hold up the entries behind them. Everything stored for
    an event (its row, its worker, the fleet counters) is refused or kept
    together: an event the database will not take becomes a dead letter with
    the database's reason, and the rest of the batch is stored. Only a database
    that cannot be reached raises (the caller waits for it and tries again).
    """
    now = timezone.now()
    now_ms = int(now.timestamp() * 1000)
    pending: dict[Any, tuple[Envelope, str, bytes]] = {}
    dead: list[DeadLetter] = [_dead_letter(label, body, error) for label, body, error in refused]
    policy: PromptPolicy | None = None
    for entry_id, body in entries:
        try:
            envelope = envelope_decode(storable_body(body), now_ms=now_ms)
        except ValidationFailed as exc:
            dead.append(_dead_letter(entry_id, body, exc.as_error()))
            continue
        if isinstance(envelope, GenerationStartedEnvelope):
            policy = policy or prompt_policy_get()
            envelope = _prompt_redacted(envelope, policy)
        pending.setdefault(envelope.id, (envelope, entry_id, body))
    with transaction.atomic():
        stored = _store_refusing(list(pending.values()), now, dead)
        DeadLetter.objects.bulk_create(dead)
    invalid = len(dead) - len(refused)
    return StoreOutcome(stored=stored, duplicates=len(entries) - invalid - stored, dead_letters=dead)


def _store_together(envelopes: list[Envelope], now: Any) -> int:
    """Everything one batch writes: event rows, workers, fleet counters."""
    stored = _insert_events([_event_values(e, now) for e in envelopes])
    workers_note(envelopes)
    # Only events stored for the first time count: a redelivered entry adds nothing.
    fleet_counters_add(_stored_now(envelopes, stored, now))
    return stored


def _store_refusing(items: list[tuple[Envelope, str, bytes]], now: Any, dead: list[DeadLetter]) -> int:
    """Store ``items`` together; if the database refuses one of them, halve the batch until
    the events it refuses stand alone, and keep those as dead letters (log2(n) tries for
    each bad one). A failure that is not an event's fault (a database gone, a table
    missing, a deadlock) is raised as it is: the batch waits and is tried again."""
    if not items:
        return 0
    try:
        with transaction.atomic():
            return _store_together([envelope for envelope, _, _ in items], now)
    except Exception as exc:
        if not (refuses_the_event(exc) and storage_ready()):
            raise
        if len(items) == 1:
            _, entry_id, body = items[0]
            logger.warning("Event in %s refused by the database: %s", entry_id, exc)
            dead.append(_dead_letter(entry_id, body, _storage_error(exc)))
            return 0
    middle = len(items) // 2
    return _store_refusing(items[:middle], now, dead) + _store_refusing(items[middle:], now, dead)


# What the database (through Django, or a driver cursor used directly, as COPY is) may raise.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (DatabaseError, sqlite3.Error)
try:
    import psycopg

    DATABASE_ERRORS += (psycopg.Error,)
except ImportError:  # pragma: no cover - SQLite-only installs
    pass

# SQLSTATE classes that describe the data, not the database: data exceptions (22: out of
# range, too long, bad encoding), integrity violations (23) and program limits (54: an
# index row too large, a value too deep to parse).
_EVENT_SQLSTATE_CLASSES = frozenset({"22", "23", "54"})


def refuses_the_event(exc: BaseException) -> bool:
    """Whether a failure to store an event is that event's own fault."""
    if not isinstance(exc, DATABASE_ERRORS):
        return True  # raised by our own code on this event's values (a bug shows up here too)
    sqlstate = getattr(exc, "sqlstate", None) or getattr(exc.__cause__, "sqlstate", None)
    if sqlstate:
        return str(sqlstate)[:2] in _EVENT_SQLSTATE_CLASSES
    return isinstance(exc, DataError | IntegrityError | sqlite3.DataError | sqlite3.IntegrityError)


def storage_ready() -> bool:
    """Whether the database answers and has every table the ingester writes.

    Checked before a batch that failed is read again: until then the failure is the
    database's (down, restarting, a migration under way), and its events wait for it.
    """
    tables = [m._meta.db_table for m in (Event, Worker, FleetCounter, DeadLetter)]
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            for table in tables:
                cursor.execute(f"SELECT 1 FROM {table} WHERE 1 = 0")
    except Exception:
        return False
    return True


# PostgreSQL cannot hold U+0000 in text or jsonb. An escaped NUL in the JSON
# (never a raw one: JSON forbids it) is stored as U+FFFD, on SQLite too, so
# both databases keep the same thing. An escaped backslash before "u0000"
# is literal text and is left alone.
_ESCAPED_NUL = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")


def _stored_now(kept: list[Envelope], stored: int, now: Any) -> list[Envelope]:
    """Which of ``kept`` this batch stored (the others were stored before: a redelivery).

    Usually all of them, and the row count says so without reading anything back.
    Otherwise the rows this batch wrote carry its ``ingested_at`` to the microsecond;
    rows stored earlier carry an earlier one.
    """
    if stored == len(kept):
        return kept
    if stored == 0:
        return []
    fresh = set(
        Event.objects.filter(id__in=[e.id for e in kept], ingested_at=now).values_list("id", flat=True)
    )
    return [e for e in kept if e.id in fresh]


def _prompt_redacted(envelope: GenerationStartedEnvelope, policy: PromptPolicy) -> GenerationStartedEnvelope:
    if policy.mode == PromptPolicy.KEEP:
        return envelope
    payload = msgspec.structs.replace(envelope.payload, prompt=prompt_redact(envelope.payload.prompt, policy))
    return msgspec.structs.replace(envelope, payload=payload)


def storable_body(body: bytes) -> bytes:
    if b"\\u0000" not in body:
        return body
    return _ESCAPED_NUL.sub(rb"\1\\ufffd", body)


def _dead_letter(entry_id: str, body: bytes, error: dict[str, Any]) -> DeadLetter:
    text = body.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    # The error quotes what was sent (an unknown field's name, the database's message):
    # stored as the body is, with NUL (which PostgreSQL cannot hold) made U+FFFD.
    storable_error = msgspec.json.decode(storable_body(msgspec.json.encode(error)))
    return DeadLetter(
        stream_id=entry_id, event_id=dead_letter_event_id(body), body=text, error=storable_error
    )


class _EnvelopeId(msgspec.Struct):
    id: uuid.UUID | None = None


def dead_letter_event_id(body: bytes) -> uuid.UUID | None:
    """The id of the envelope in ``body`` if one can be read, whatever else is wrong with it."""
    try:
        return msgspec.json.decode(body, type=_EnvelopeId).id
    except Exception:
        return None


def _storage_error(exc: Exception) -> dict[str, Any]:
    return error_object("StorageFailed", f"The database refused the event: {exc}".strip(), "storage_failed")


def workers_note(events: Iterable[Envelope]) -> None:
    """Bring each source's worker row up to date: when last heard, last runtime status.

    Idempotent and order-free (an older or repeated event changes nothing), so
    several ingesters and redelivered entries are harmless.
    """
    heard: dict[str, int] = {}
    statuses: dict[str, RuntimeStatusEnvelope] = {}
    for event in events:
        heard[event.source] = max(heard.get(event.source, 0), event.timestamp)
        if isinstance(event, RuntimeStatusEnvelope) and event.timestamp >= getattr(
            statuses.get(event.source), "timestamp", 0
        ):
            statuses[event.source] = event
    if not heard:
        return
    Worker.objects.bulk_create([Worker(source=s) for s in heard], ignore_conflicts=True)
    for source, timestamp in heard.items():
        Worker.objects.filter(source=source, last_heard_at__lt=timestamp).update(last_heard_at=timestamp)
    for source, event in statuses.items():
        active = event.payload.active_tasks
        Worker.objects.filter(source=source, last_status_at__lte=event.timestamp).update(
            status=event.payload.status,
            models_loaded=event.payload.models_loaded,
            active_tasks=active if isinstance(active, int) else 0,
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
    # Events per transaction, roughly. Entries hold one event (the API) or a
    # batch (workers), so how many entries to read is adjusted from the last read.
    batch_size: int = 5000
    block_ms: int = 1000
    claim_idle_ms: int = 60_000
    # Start by re-reading our own pending entries: a previous run of this
    # consumer may have stored them and died before acknowledging.
    claim_every_s: float = 30.0
    _read_pending: bool = True
    # An entry delivered this many times without being stored (the ingester failed on it,
    # or died with it, every time) is kept as a dead letter instead of tried again.
    max_deliveries: int = 5
    _verify_database: bool = False
    _group_ready: bool = False
    _entries_per_read: int = 10
    _next_claim: float = 0.0

    def step(self) -> StoreOutcome:
        if not self._group_ready:
            stream_ensure_group(self.client, self.stream, self.group)
            self._group_ready = True
        if self._verify_database:
            # Reading pending entries again counts as one more delivery of each: do it only
            # once the database answers, so an outage never makes good entries look poisoned.
            if not storage_ready():
                raise OperationalError("The database is unreachable or incomplete; pending entries wait")
            self._verify_database = False
        entries, redelivered = self._read()
        if not entries:
            return StoreOutcome()
        contents = EntryContents()
        poisoned = self._poisoned(entries) if redelivered else {}
        for entry_id, fields in entries:
            if entry_id in poisoned:
                _deliveries_refuse(entry_id, fields, poisoned[entry_id], contents)
            else:
                entry_envelopes(entry_id, fields, contents)
        per_entry = max(1, (len(contents.bodies) + len(contents.refused)) // len(entries))
        self._entries_per_read = max(1, min(1000, self.batch_size // per_entry))
        try:
            outcome = events_store(contents.bodies, refused=contents.refused)
            self.client.xack(self.stream, self.group, *[entry_id for entry_id, _ in entries])
        except Exception:
            # Not stored, or stored and not acknowledged (Redis went away between
            # the two): read our pending entries again next turn; the insert skips repeats.
            self._read_pending = True
            self._verify_database = True
            raise
        return outcome

    def _poisoned(self, entries: list[tuple[str, dict[bytes, bytes]]]) -> dict[str, int]:
        """Entries delivered more than ``max_deliveries`` times, with their counts: every
        delivery before failed or took the ingester down with it."""
        ids = [entry_id for entry_id, _ in entries]
        rows: Any = self.client.xpending_range(
            self.stream,
            self.group,
            min=min(ids, key=_id_tuple),
            max=max(ids, key=_id_tuple),
            count=max(len(ids), 1000),
            consumername=self.consumer,
        )
        wanted = set(ids)
        return {
            key: int(row["times_delivered"])
            for row in rows
            if (key := _text(row["message_id"])) in wanted
            and int(row["times_delivered"]) > self.max_deliveries
        }

    def _read(self) -> tuple[list[tuple[str, dict[bytes, bytes]]], bool]:
        """Entries to store, and whether they were delivered before (pending or claimed)."""
        if self._read_pending:
            pending = self._xread("0", block=None)
            if pending:
                return pending, True
            self._read_pending = False
        now = time.monotonic()
        if now >= self._next_claim:
            # Another ingester may have died holding entries: take them over.
            self._next_claim = now + self.claim_every_s
            claimed = self._claim()
            if claimed:
                return claimed, True
        return self._xread(">", block=self.block_ms), False

    def trim(self) -> int:
        """Drop stream entries every consumer has acknowledged; returns how many went.

        Never past an entry that is pending (read, not yet stored) or not yet
        delivered: trimming by length (MAXLEN) could drop those, MINID below
        the oldest of them cannot.
        """
        floor = safe_trim_id(client=self.client, stream=self.stream, group=self.group)
        if floor is None:
            return 0
        return int(self.client.xtrim(self.stream, minid=floor, approximate=False))

    def _xread(self, start: str, block: int | None) -> list[tuple[str, dict[bytes, bytes]]]:
        response: Any = self.client.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=self._entries_per_read, block=block
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
            count=self._entries_per_read,
        )
        entries: list[tuple[str, dict[bytes, bytes]]] = []
        for entry_id, fields in response[1]:
            key = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            if fields is None:
                self.client.xack(self.stream, self.group, key)
                continue
            entries.append((key, fields))
        return entries


def _deliveries_refuse(
    entry_id: str, fields: dict[bytes, bytes], deliveries: int, into: EntryContents
) -> None:
    """Keep a poisoned entry's envelopes as dead letters without decoding them again."""
    held = entry_envelopes(entry_id, fields)
    message = (
        f"Not stored after {deliveries} deliveries: the ingester failed on this entry every time; "
        "kept for replay"
    )
    error = error_object("DeliveryFailed", message, "delivery_failed")
    into.refused.extend((label, body, error) for label, body in held.bodies)
    into.refused.extend(held.refused)


def _id_ms(entry_id: Any) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-", 1)[0])


def _id_tuple(entry_id: Any) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def safe_trim_id(*, client: redis.Redis, stream: str, group: str) -> str | None:
    """The oldest entry id the group still needs (pending, or not yet delivered), or None if unknown."""
    try:
        groups: Any = client.xinfo_groups(stream)
        pending: Any = client.xpending(stream, group)
    except redis.ResponseError:
        return None
    info = next(
        (g for g in groups if (g["name"].decode() if isinstance(g["name"], bytes) else g["name"]) == group),
        None,
    )
    if info is None:
        return None
    if pending["pending"]:
        return str(pending["min"].decode() if isinstance(pending["min"], bytes) else pending["min"])
    # Nothing pending: everything up to the last delivered entry is acknowledged.
    ms, seq = _id_tuple(info["last-delivered-id"])
    return f"{ms}-{seq + 1}"


def stream_lag(*, client: redis.Redis, stream: str, group: str) -> dict[str, int]:
    """How far ingestion is behind the stream.

    ``pending``: entries an ingester read and has not stored yet (and the age of the
    oldest, ``oldest_pending_ms``); ``undelivered``: entries no ingester has read
    yet (and the age of the oldest, ``oldest_undelivered_ms``: with every ingester
    down, this is the one that grows). ``lag_ms`` is the older of the two ages: how
    long the oldest event not yet stored has waited.
    """
    lag = {
        "length": 0,
        "pending": 0,
        "oldest_pending_ms": 0,
        "undelivered": 0,
        "oldest_undelivered_ms": 0,
        "lag_ms": 0,
    }
    try:
        pending: Any = client.xpending(stream, group)
        length = client.xlen(stream)
        info = next((g for g in client.xinfo_groups(stream) if _text(g.get("name")) == group), None)
    except redis.ResponseError:
        return lag
    now_ms = time.time_ns() // 1_000_000
    lag["length"], lag["pending"] = int(length), int(pending["pending"])
    if pending["pending"]:
        lag["oldest_pending_ms"] = max(0, now_ms - _id_ms(pending["min"]))
    if info is not None:
        after = _text(info.get("last-delivered-id")) or "0-0"
        first = client.xrange(stream, min=f"({after}", max="+", count=1)
        if first:
            lag["oldest_undelivered_ms"] = max(0, now_ms - _id_ms(first[0][0]))
            undelivered = info.get("lag")
            lag["undelivered"] = int(undelivered) if undelivered is not None else int(length)
    lag["lag_ms"] = max(lag["oldest_pending_ms"], lag["oldest_undelivered_ms"])
    return lag


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


# -- generations -------------------------------------------------------------------------


def generation_queue(*, data: Any, user: Any = None) -> Generation:
    """Validate a generation request, record it and queue it for a worker (SPEC section 4).

    ``model`` may name a registry entry; the worker gets the path it stands for.
    Raises ``ValidationFailed``, or ``kombu``/``redis`` errors if the broker is down
    (then nothing is recorded).
    """
    from events.tasks import generation_run

    order = validate(data, GenerationOrder)
    if "\x00" in order.model:
        raise ValidationFailed([Issue(["model"], "Cannot contain NUL characters", "invalid")])
    registered = RegisteredModel.objects.filter(name=order.model).first()
    generation = Generation.objects.create(
        id=uuid.uuid4(),
        model=order.model,
        model_path=registered.path if registered else "",
        # Stored as the events are: an escaped NUL (PostgreSQL cannot hold one) becomes U+FFFD.
        prompt=msgspec.json.decode(
            storable_body(msgspec.json.encode(prompt_redact(order.prompt, prompt_policy_get())))
        ),
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


# -- dead letters and retention --------------------------------------------------------


class ReplayRefused(Exception):
    """A dead letter that still cannot be stored; ``error`` is why (also saved on it)."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error["message"])
        self.error = error


def dead_letter_replay(letter: DeadLetter) -> None:
    """Validate a dead letter again and store it as an event (say, after a producer or
    contract fix, or once its timestamp is no longer ahead of the clock).

    Raises ``ReplayRefused`` with the current error when it still cannot be stored:
    nothing is stored then, and the letter keeps that error.
    """
    body = letter.body.encode()
    try:
        with transaction.atomic():
            outcome = events_store([(letter.stream_id, body)])
            if outcome.dead_letters:
                raise ReplayRefused(outcome.dead_letters[0].error)  # rolls the new dead letter back
            letter.replayed_at = timezone.now()
            letter.save(update_fields=["replayed_at"])
    except ReplayRefused as refused:
        letter.error = refused.error
        letter.save(update_fields=["error"])
        raise


def dead_letters_replay(letters: Iterable[DeadLetter]) -> tuple[int, int]:
    """Replay each dead letter not yet replayed. Returns (stored, still refused)."""
    stored = refused = 0
    for letter in letters:
        if letter.replayed_at is not None:
            continue
        try:
            dead_letter_replay(letter)
            stored += 1
        except ReplayRefused:
            refused += 1
    return stored, refused


def events_retention_apply(
    *,
    now_ms: int | None = None,
    chunk: int = 10_000,
    on_chunk: Callable[[str, int, float], None] | None = None,
) -> dict[str, int]:
    """Delete events past their type's kept-for period, about ``chunk`` rows a transaction.

    Each transaction deletes one time window, a range scan of the (type,
    timestamp) index; the window widens or narrows to hold about ``chunk``
    rows, and empty stretches are skipped with one index lookup. So no
    transaction runs long (no long locks, no replica lag spike) and a run
    costs what it deletes, not the size of the table.
    """
    from events.models import RetentionPolicy

    now_ms = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    table = Event._meta.db_table
    deleted: dict[str, int] = {}

    def oldest_from(cursor: Any, event_type: str, since: int) -> int | None:
        cursor.execute(
            f"SELECT MIN(timestamp) FROM {table} WHERE type = %s AND timestamp >= %s", [event_type, since]
        )
        row = cursor.fetchone()
        return None if row is None or row[0] is None else int(row[0])

    for policy in RetentionPolicy.objects.all():
        event_type, cutoff = policy.event_type, now_ms - policy.keep_days * 86_400_000
        deleted[event_type] = 0
        window = 60_000  # ms; adjusted to the data's rate below
        with connection.cursor() as cursor:
            start = oldest_from(cursor, event_type, 0)
        while start is not None and start < cutoff:
            end = min(start + window, cutoff)
            started = time.perf_counter()
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(
                    f"DELETE FROM {table} WHERE type = %s AND timestamp >= %s AND timestamp < %s",
                    [event_type, start, end],
                )
                count = max(cursor.rowcount, 0)
            deleted[event_type] += count
            if on_chunk is not None:
                on_chunk(event_type, count, time.perf_counter() - started)
            if count:
                window = max(1, min(window * 8, int(window * chunk / count)))
                start = end
            else:
                window *= 8
                with connection.cursor() as cursor:
                    start = oldest_from(cursor, event_type, end)
    return deleted
