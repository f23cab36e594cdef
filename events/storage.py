"""Storing stream entries: events exactly once, workers, fleet counters, dead letters.

One transaction a batch; an event the database refuses becomes a dead letter and the
rest of the batch is stored.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from django.conf import settings
from django.db import DatabaseError, DataError, IntegrityError, connection, transaction
from django.db.models import Q

from events.copy import copy_text, copy_timestamp
from events.decoding import DecodedBatch, dead_letter, events_decode
from events.fleet import fleet_counters_add
from events.models import (
    MODEL_COLUMN_LENGTH,
    DeadLetter,
    EventRecord,
    FleetCounter,
    PromptPolicy,
    SourceMinute,
    StatsMinute,
    StatsRollup,
    TokenEvent,
    Worker,
)
from events.privacy import prompt_policy_get
from events.rollups import first_tokens, rollups_add
from events.tokens import ids_stored, tokens_insert, tokens_sorted
from events.upsert import upsert_adding
from mlxserve.contract.events import (
    Envelope,
    ErrorEnvelope,
    GenerationStartedEnvelope,
    RuntimeStatusEnvelope,
    TokenGeneratedEnvelope,
)
from mlxserve.contract.validation import INT64_MAX, error_object

logger = logging.getLogger(__name__)


@dataclass
class StoreOutcome:
    stored: int = 0
    duplicates: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)

    @property
    def dead(self) -> int:
        return len(self.dead_letters)


# The table's columns as the model declares them (``EventColumns``), in its order.
_EVENT_COLUMNS = tuple(field.column for field in EventRecord._meta.concrete_fields)


def _event_values(envelope: Envelope, now: Any) -> tuple[Any, ...]:
    """One row of ``events_event`` in ``_EVENT_COLUMNS``' order, payload as JSON text."""
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
    """COPY straight into the table; if an id is already stored (a redelivery), COPY into a
    session-local staging table instead, then one INSERT ... ON CONFLICT DO NOTHING.

    COPY is PostgreSQL's bulk path (no SQL text per row, no per-row round trip). It
    cannot skip a row it conflicts with, so it runs under a savepoint: a batch holding a
    stored id rolls back to it and takes the idempotent path. Redeliveries are rare
    (an ingester that died before acknowledging), so nearly every batch is written once.
    """
    import psycopg.errors

    text = "".join(map(_copy_line, rows))
    table, columns = EventRecord._meta.db_table, ", ".join(_EVENT_COLUMNS)
    with connection.cursor() as cursor:
        raw = cursor.cursor  # the psycopg cursor, for COPY; its errors raised as Django's
        try:
            with (
                transaction.atomic(),
                connection.wrap_database_errors,
                raw.copy(f"COPY {table} ({columns}) FROM STDIN") as copy,
            ):
                # COPY's text format written directly: psycopg's write_row costs ~10 µs a row.
                copy.write(text)
            return len(rows)
        except IntegrityError as exc:
            if not isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                raise
        cursor.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS event_staging (LIKE {table} INCLUDING DEFAULTS) "
            "ON COMMIT DELETE ROWS"
        )
        with connection.wrap_database_errors, raw.copy(f"COPY event_staging ({columns}) FROM STDIN") as copy:
            copy.write(text)
        cursor.execute(
            # In id order, so two ingesters storing the same entries wait on each other in one order.
            f"INSERT INTO {table} ({columns}) SELECT {columns} FROM event_staging ORDER BY id "
            "ON CONFLICT (id, timestamp) DO NOTHING"
        )
        inserted = cursor.rowcount
        cursor.execute("TRUNCATE event_staging")
    return int(inserted)


def _copy_line(row: tuple[Any, ...]) -> str:
    ident, kind, timestamp, source, generation_id, seq, model, payload, now = row
    # UUIDs as 32 hex digits, which PostgreSQL reads as it reads the hyphenated form
    # (str(uuid) costs twice as much, and this runs for every event).
    generation = "\\N" if generation_id is None else generation_id.hex
    return (
        f"{ident.hex}\t{kind}\t{timestamp}\t{copy_text(source)}\t{generation}\t{seq}\t"
        f"{copy_text(model)}\t{copy_text(payload)}\t{copy_timestamp(now)}\n"
    )


def _insert_generic(rows: list[tuple[Any, ...]]) -> int:
    """Batched multi-row INSERT ... ON CONFLICT DO NOTHING (SQLite, or any other backend)."""
    fields: list[Any] = [EventRecord._meta.get_field(name) for name in _EVENT_COLUMNS]
    prepared = [
        tuple(
            f.get_db_prep_save(v, connection) if f.name != "payload" else v
            for f, v in zip(fields, row, strict=True)
        )
        for row in rows
    ]
    table, columns = EventRecord._meta.db_table, ", ".join(_EVENT_COLUMNS)
    placeholders = ", ".join(["%s"] * len(_EVENT_COLUMNS))
    inserted = 0
    with connection.cursor() as cursor:
        for start in range(0, len(prepared), 100):
            chunk = prepared[start : start + 100]
            values = ", ".join([f"({placeholders})"] * len(chunk))
            cursor.execute(
                f"INSERT INTO {table} ({columns}) VALUES {values} ON CONFLICT (id, timestamp) DO NOTHING",
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
    """Store stream entries ``(entry_id, body)`` in one transaction: ``events_decode``, then
    ``decoded_store``."""
    return decoded_store(events_decode(entries, refused=refused, policy=prompt_policy_get()))


def decoded_store(batch: DecodedBatch) -> StoreOutcome:
    """Store a decoded batch in one transaction (again from the start if it is tried again).

    Valid envelopes become events, idempotent on ``id``. Invalid ones become dead letters with
    their error, so they never hold up the entries behind them. Everything stored for an event
    (its row, its worker, the fleet counters) is refused or kept together: an event the database
    will not take becomes a dead letter with the database's reason, and the rest of the batch is
    stored. Only a database that cannot be reached raises (the caller waits and tries again).
    """
    dead = list(batch.dead)
    with transaction.atomic():
        _generations_lock([envelope for envelope, _, _ in batch.pending])
        stored = _store_refusing(batch.pending, batch.now, dead, batch.policy)
        dead_letters_keep(dead)
    invalid = len(dead) - batch.refused
    return StoreOutcome(stored=stored, duplicates=batch.entries - invalid - stored, dead_letters=dead)


_LOCKED_TYPES = frozenset({GenerationStartedEnvelope, TokenGeneratedEnvelope})


def _generations_lock(envelopes: Sequence[Envelope]) -> None:
    """On PostgreSQL, one transaction at a time stores events of a given generation: each takes
    a lock per generation its batch holds a start or a token of (advisory, released at commit),
    all at once, in key order, before it writes anything.

    Without it, an attempt's start and first token stored by two ingesters at once were each
    looked for by the other's transaction before either had committed, and its time to first
    token was never counted. SQLite runs one writing transaction at a time anyway.
    """
    if connection.vendor != "postgresql":
        return
    # The lock key: a generation id's first 8 bytes as a signed 64-bit integer (from its 128-bit
    # integer, without UUID's Python-level hashing for each of a batch's thousands of tokens).
    tops = {e.generation_id.int >> 64 for e in envelopes if type(e) in _LOCKED_TYPES and e.generation_id}
    keys = sorted(top - 2**64 if top >= 2**63 else top for top in tops)
    if keys:
        with connection.cursor() as cursor:
            # unnest hands the keys over in the array's (sorted) order: every ingester takes them
            # in the same order, so none waits on another in a cycle.
            cursor.execute("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%s::bigint[]) AS k", [keys])


DEAD_LETTERS_SERIES = ("mlxserve_dead_letters_total", "{}")


def dead_letters_keep(dead: Sequence[DeadLetter]) -> int:
    """Store the letters not stored before and add them to the running total the control plane's
    ``/metrics`` reads (a scrape never counts the table). One letter per item of an entry: a
    redelivered entry (stored, then not acknowledged; or claimed by a second ingester) adds
    none. Returns how many were new."""
    if not dead:
        return 0
    labels = sorted({letter.stream_id for letter in dead})
    stored: set[str] = set()
    for start in range(0, len(labels), 500):
        chunk = labels[start : start + 500]
        stored.update(DeadLetter.objects.filter(stream_id__in=chunk).values_list("stream_id", flat=True))
    fresh: dict[str, DeadLetter] = {}
    for letter in dead:
        if letter.stream_id not in stored:
            fresh.setdefault(letter.stream_id, letter)
    DeadLetter.objects.bulk_create(list(fresh.values()), ignore_conflicts=True)
    if fresh:
        upsert_adding(
            FleetCounter._meta.db_table,
            ("name", "labels"),
            ("value",),
            [(*DEAD_LETTERS_SERIES, float(len(fresh)))],
        )
    return len(fresh)


def dead_letters_total() -> float:
    name, labels = DEAD_LETTERS_SERIES
    row = FleetCounter.objects.filter(name=name, labels=labels).values_list("value", flat=True).first()
    return float(row or 0)


def _store_together(envelopes: list[Envelope], now: Any) -> int:
    """Everything one batch writes: event rows (token events in their compact table), workers,
    fleet counters, stats rollups."""
    tokens, records = tokens_sorted(envelopes)
    records = _not_stored(records)
    stored = _insert_events([_event_values(e, now) for e in records])
    # Only events stored for the first time count: a redelivered entry adds nothing.
    fresh = _stored_now(records, stored, now)
    fresh_tokens = tokens_insert(tokens, now)
    stored += len(fresh_tokens)
    fresh += fresh_tokens
    workers_note(envelopes)
    firsts = first_tokens(fresh)  # looked up once, for the fleet histogram and the stats rollups
    fleet_counters_add(fresh, firsts)
    rollups_add(fresh, firsts)
    return stored


def _not_stored(records: list[Envelope]) -> list[Envelope]:
    """The events whose id is not stored yet, at any time: the table's key is (id, timestamp)
    (a partitioned table's key holds its partition key), so an id reused with another
    timestamp would pass it. One probe of the key's index per id; a redelivery (the same
    timestamp) is caught by the key itself all the same, even between two ingesters."""
    if not records:
        return records
    stored = ids_stored(EventRecord._meta.db_table, [e.id for e in records])
    return [e for e in records if e.id not in stored] if stored else records


def _store_refusing(
    items: list[tuple[Envelope, str, bytes]], now: Any, dead: list[DeadLetter], policy: PromptPolicy
) -> int:
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
            dead.append(dead_letter(entry_id, body, _storage_error(exc), policy))
            return 0
    middle = len(items) // 2
    return _store_refusing(items[:middle], now, dead, policy) + _store_refusing(
        items[middle:], now, dead, policy
    )


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


def transient_conflict(exc: BaseException) -> bool:
    """A deadlock or serialization failure (SQLSTATE class 40): another transaction's timing,
    not the events' fault nor the database's health; the same batch succeeds when tried again."""
    while exc is not None:
        sqlstate = getattr(exc, "sqlstate", None)
        if sqlstate:
            return str(sqlstate)[:2] == "40"
        exc = exc.__cause__  # type: ignore[assignment]
    return False


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
    tables = [
        m._meta.db_table
        for m in (
            EventRecord,
            TokenEvent,
            Worker,
            FleetCounter,
            StatsRollup,
            StatsMinute,
            SourceMinute,
            DeadLetter,
        )
    ]
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            for table in tables:
                cursor.execute(f"SELECT 1 FROM {table} WHERE 1 = 0")
    except Exception:
        return False
    return True


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
        EventRecord.objects.filter(id__in=[e.id for e in kept], ingested_at=now).values_list("id", flat=True)
    )
    return [e for e in kept if e.id in fresh]


def _storage_error(exc: Exception) -> dict[str, Any]:
    return error_object("StorageFailed", f"The database refused the event: {exc}".strip(), "storage_failed")


def _new_workers_admitted(heard: dict[str, int]) -> set[str]:
    """The sources of this batch that get a worker row made: at most
    ``MLXSERVE_SOURCES_PER_PRODUCER`` rows per host or producer (the source's first part, ``N`` of
    ``N/...``), whatever writes the stream: a host's credentials on the stream, like a producer's
    on the API, cannot make the fleet's rows (and pages, and series) grow without bound. Their
    events are stored all the same."""
    known: set[str] = set()
    names = sorted(heard)
    for start in range(0, len(names), 500):
        known.update(
            Worker.objects.filter(source__in=names[start : start + 500]).values_list("source", flat=True)
        )
    fresh = [source for source in names if source not in known]
    admitted: set[str] = set()
    by_prefix: dict[str, list[str]] = {}
    for source in fresh:
        by_prefix.setdefault(source.split("/", 1)[0], []).append(source)
    limit = settings.SOURCES_PER_PRODUCER
    for prefix, sources in by_prefix.items():
        rows = Worker.objects.filter(Q(source=prefix) | Q(source__startswith=prefix + "/")).count()
        room = max(0, limit - rows)
        admitted.update(sources[:room])
        if len(sources) > room:
            logger.warning(
                "%d new sources of %s get no worker row: it has %d (MLXSERVE_SOURCES_PER_PRODUCER)",
                len(sources) - room,
                prefix,
                rows,
            )
    return admitted


def workers_note(events: Iterable[Envelope]) -> None:
    """Bring each source's worker row up to date: when last heard, last runtime status.

    Idempotent and order-free (an older or repeated event changes nothing), so
    several ingesters and redelivered entries are harmless.
    """
    heard: dict[str, int] = {}
    statuses: dict[str, RuntimeStatusEnvelope] = {}
    errors: dict[str, ErrorEnvelope] = {}
    for event in events:
        heard[event.source] = max(heard.get(event.source, 0), event.timestamp)
        if isinstance(event, RuntimeStatusEnvelope) and event.timestamp >= getattr(
            statuses.get(event.source), "timestamp", 0
        ):
            statuses[event.source] = event
        elif isinstance(event, ErrorEnvelope) and event.timestamp >= getattr(
            errors.get(event.source), "timestamp", 0
        ):
            errors[event.source] = event
    if not heard:
        return
    new = _new_workers_admitted(heard)
    # Rows written in source order: two ingesters updating the same workers wait on each other
    # in one order, never in a cycle (a deadlock).
    Worker.objects.bulk_create([Worker(source=s) for s in sorted(new)], ignore_conflicts=True)
    for source, timestamp in sorted(heard.items()):
        Worker.objects.filter(source=source, last_heard_at__lt=timestamp).update(last_heard_at=timestamp)
    for source, error in sorted(errors.items()):
        code = error.payload.code if isinstance(error.payload.code, str) else ""
        text = f"{code}: {error.payload.error}" if code else error.payload.error
        Worker.objects.filter(source=source, last_error_at__lte=error.timestamp).update(
            last_error_at=error.timestamp, last_error=text[:500]
        )
    for source, event in sorted(statuses.items()):
        active = event.payload.active_tasks
        metadata = event.payload.metadata if isinstance(event.payload.metadata, dict) else {}
        version = metadata.get("configVersion")
        changes: dict[str, Any] = {}
        if type(version) is int and 0 <= version <= INT64_MAX:  # whatever a producer says, it fits
            changes["config_version"] = version
        Worker.objects.filter(source=source, last_status_at__lte=event.timestamp).update(
            status=event.payload.status,
            models_loaded=event.payload.models_loaded,
            active_tasks=active if isinstance(active, int) else 0,
            last_status_at=event.timestamp,
            **changes,
        )
