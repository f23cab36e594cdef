"""The ingester: a consumer of the event stream that stores what it reads, acknowledges
after commit, dead-letters what keeps failing, and trims what every consumer has stored.
"""

from __future__ import annotations

import gc
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
from django.db import OperationalError, close_old_connections

from events.backlog import id_tuple, safe_trim_id, streams_lag, text_of
from events.decoding import DecodedBatch, events_decode
from events.fleet import fleet_labels_fold
from events.models import PromptPolicy, WorkerHost
from events.partitions import partitions_ensure
from events.privacy import prompt_policy_get
from events.retention import events_retention_apply
from events.storage import DATABASE_ERRORS, StoreOutcome, decoded_store, storage_ready, transient_conflict
from mlxserve.bus import stream_ensure_group
from mlxserve.contract.stream import (
    ENTRY_MAX_BYTES,
    EntryContents,
    EntryFields,
    entry_envelopes,
    xautoclaim_pairs,
    xreadgroup_pairs,
)
from mlxserve.contract.validation import error_object
from telemetry.services import telemetry_config_sync

logger = logging.getLogger(__name__)

# A stream entry as read: its label (its id on the shared stream, ``<host>/<id>`` on a host's own
# stream), and its fields as pairs, or None where it was deleted.
Entry = tuple[str, list[tuple[bytes, bytes]] | None]

ENTRY_DELETED = (
    "The stream entry was deleted (XDEL, or a trim past it) after it was read and before it was stored: "
    "what it held is lost"
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
    # A batch that meets a deadlock or a serialization failure is tried again in place this many times.
    conflict_retries: int = 10
    _verify_database: bool = False
    _entries_per_read: int = 10
    _next_claim: float = 0.0
    _reader: redis.Redis | None = None
    # Worker hosts with a stream of their own (``<stream>:<host>``), read beside the shared one.
    hosts: tuple[str, ...] = ()
    _ready_streams: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        # Reads on the same connections, each entry's fields kept as Redis sent them (pairs, in
        # order): redis-py's dict would keep only the last value of a repeated field name.
        self._reader = redis.Redis(connection_pool=self.client.connection_pool)
        self._reader.set_response_callback("XREADGROUP", xreadgroup_pairs)
        self._reader.set_response_callback("XAUTOCLAIM", xautoclaim_pairs)

    @property
    def streams(self) -> list[str]:
        """The shared stream (the API, workers without a stream of their own), then each host's."""
        return [self.stream, *(host_stream(self.stream, host) for host in self.hosts)]

    def _stream_of(self, label: str) -> tuple[str, str]:
        """(stream, entry id) of an entry's label."""
        host, _, entry_id = label.rpartition("/")
        return (host_stream(self.stream, host) if host else self.stream), entry_id

    def _label(self, stream: str, entry_id: str) -> str:
        return entry_id if stream == self.stream else f"{stream.removeprefix(self.stream + ':')}/{entry_id}"

    def step(self) -> StoreOutcome:
        for stream in self.streams:
            if stream not in self._ready_streams:
                stream_ensure_group(self.client, stream, self.group)
                self._ready_streams.add(stream)
        if self._verify_database:
            # Reading pending entries again counts as one more delivery of each: do it only
            # once the database answers, so an outage never makes good entries look poisoned.
            if not storage_ready():
                raise OperationalError("The database is unreachable or incomplete; pending entries wait")
            self._verify_database = False
        try:
            entries, redelivered = self._read()
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis lost its groups (a restart with no persistence): made again
                self._ready_streams.clear()
            raise
        if not entries:
            return StoreOutcome()
        return self._commit(entries, self._decoded(entries, redelivered, prompt_policy_get()))

    def _decoded(self, entries: list[Entry], redelivered: bool, policy: PromptPolicy) -> DecodedBatch:
        """The batch in ``entries``, decoded."""
        contents = EntryContents()
        poisoned = self._poisoned(entries) if redelivered else {}
        for entry_id, fields in entries:
            if fields is None:
                # Deleted from the stream (XDEL, or a trim past it) after it was read and before
                # it was stored: what it held is gone, and that is said, not passed over.
                logger.error("Stream entry %s was deleted before it was stored", entry_id)
                contents.refused.append(
                    (entry_id, b"", error_object("EntryDeleted", ENTRY_DELETED, "entry_deleted"))
                )
            elif (size := sum(len(name) + len(value) for name, value in fields)) > ENTRY_MAX_BYTES:
                # Never decoded: a producer's 500 MB entry costs the ingester a length, not a parse.
                logger.error(
                    "Stream entry %s holds %d bytes, past the limit of %d", entry_id, size, ENTRY_MAX_BYTES
                )
                message = (
                    f"The stream entry holds {size} bytes, past the limit of {ENTRY_MAX_BYTES}: "
                    "its first 64 KiB are kept"
                )
                body = b"".join(value for _, value in fields)[:65536]
                contents.refused.append((entry_id, body, error_object("EntryTooLarge", message, "too_big")))
            elif entry_id in poisoned:
                _deliveries_refuse(entry_id, fields, poisoned[entry_id], contents)
            else:
                entry_envelopes(entry_id, fields, contents)
        per_entry = max(1, (len(contents.bodies) + len(contents.refused)) // len(entries))
        self._entries_per_read = max(1, min(1000, self.batch_size // per_entry))
        return events_decode(contents.bodies, refused=contents.refused, policy=policy)

    def _commit(self, entries: list[Entry], batch: DecodedBatch) -> StoreOutcome:
        """Store the batch, then acknowledge its entries."""
        try:
            outcome = self._store(batch)
            by_stream: dict[str, list[str]] = {}
            for label, _ in entries:
                stream, entry_id = self._stream_of(label)
                by_stream.setdefault(stream, []).append(entry_id)
            pipe = self.client.pipeline(transaction=False)
            for stream, ids in by_stream.items():
                pipe.xack(stream, self.group, *ids)
            pipe.execute()
        except Exception:
            # Not stored, or stored and not acknowledged (Redis went away between
            # the two): read our pending entries again next turn; the insert skips repeats.
            self._read_pending = True
            self._verify_database = True
            raise
        return outcome

    def _store(self, batch: DecodedBatch) -> StoreOutcome:
        """Store the batch; a deadlock or serialization failure (ingesters side by side) is
        retried here, after a short random pause, never counted as a delivery of its entries."""
        for attempt in range(1, self.conflict_retries + 1):
            try:
                return decoded_store(batch)
            except DATABASE_ERRORS as exc:
                if not transient_conflict(exc) or attempt == self.conflict_retries:
                    raise
                logger.warning("Batch met another transaction (%s); trying it again", exc)
                time.sleep(random.uniform(0.01, 0.05) * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _poisoned(self, entries: list[Entry]) -> dict[str, int]:
        """Entries delivered more than ``max_deliveries`` times, with their counts: every
        delivery before failed or took the ingester down with it."""
        by_stream: dict[str, list[str]] = {}
        for label, _ in entries:
            stream, entry_id = self._stream_of(label)
            by_stream.setdefault(stream, []).append(entry_id)
        poisoned: dict[str, int] = {}
        for stream, ids in by_stream.items():
            rows: Any = self.client.xpending_range(
                stream,
                self.group,
                min=min(ids, key=id_tuple),
                max=max(ids, key=id_tuple),
                count=max(len(ids), 1000),
                consumername=self.consumer,
            )
            wanted = set(ids)
            for row in rows:
                key = text_of(row["message_id"])
                if key in wanted and int(row["times_delivered"]) > self.max_deliveries:
                    poisoned[self._label(stream, key)] = int(row["times_delivered"])
        return poisoned

    def _read(self) -> tuple[list[Entry], bool]:
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
        trimmed = 0
        for stream in self.streams:
            floor = safe_trim_id(client=self.client, stream=stream, group=self.group)
            if floor is not None:
                try:
                    trimmed += int(self.client.xtrim(stream, minid=floor, approximate=False))
                except redis.ResponseError as exc:  # one stream's oddity stops no other's trim
                    logger.error("Could not trim %s to %s: %s", stream, floor, exc)
        return trimmed

    def _xread(self, start: str, block: int | None) -> list[Entry]:
        assert self._reader is not None
        response: Any = self._reader.xreadgroup(
            self.group,
            self.consumer,
            dict.fromkeys(self.streams, start),
            count=self._entries_per_read,
            block=block,
        )
        # An entry deleted while pending comes back with no fields (None): kept as such.
        return [
            (self._label(text_of(stream), text_of(entry_id)), fields)
            for stream, items in response or []
            for entry_id, fields in items
        ]

    def _claim(self) -> list[Entry]:
        """Take over entries another consumer read and never acknowledged (it died)."""
        assert self._reader is not None
        claimed: list[Entry] = []
        for stream in self.streams:
            response: Any = self._reader.xautoclaim(
                stream,
                self.group,
                self.consumer,
                min_idle_time=self.claim_idle_ms,
                start_id="0-0",
                count=self._entries_per_read,
            )
            # Redis 7 leaves deleted entries out of the claimed ones, drops them from the group
            # and names them apart: they come back here as deleted (no fields).
            claimed += [(self._label(stream, text_of(entry_id)), fields) for entry_id, fields in response[1]]
            claimed += [(self._label(stream, text_of(entry_id)), None) for entry_id in response[2]]
        return claimed


def _drained(ingester: EventIngester) -> bool:
    """Whether no entry of the group's streams waits to be delivered: a read that came back empty
    is taken for the end only then (entries left pending by a consumer that died are its own to
    read again, or another's to claim, as ever)."""
    lag = streams_lag(client=ingester.client, streams=ingester.streams, group=ingester.group)
    return lag["undelivered"] == 0


def worker_hosts() -> tuple[str, ...]:
    """The worker hosts with a stream of their own (``manage.py create_worker_host``)."""
    return tuple(WorkerHost.objects.order_by("name").values_list("name", flat=True))


def host_stream(stream: str, host: str) -> str:
    """A worker host's own stream: only it (its ACL user) may append to it."""
    return f"{stream}:{host}"


def _deliveries_refuse(entry_id: str, fields: EntryFields, deliveries: int, into: EntryContents) -> None:
    """Keep a poisoned entry's envelopes as dead letters without decoding them again."""
    held = entry_envelopes(entry_id, fields)
    message = (
        f"Not stored after {deliveries} deliveries: the ingester failed on this entry every time; "
        "kept for replay"
    )
    error = error_object("DeliveryFailed", message, "delivery_failed")
    into.refused.extend((label, body, error) for label, body in held.bodies)
    into.refused.extend(held.refused)


# Redis or the database unreachable (or refusing for reasons no event caused): wait, retry.
PAUSING_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, *DATABASE_ERRORS)

progress_logger = logging.getLogger("mlxserve.ingest")

# Objects made between young-generation collections while ingesting: about one batch's worth.
INGEST_GC_YOUNG_THRESHOLD = 50_000


@contextmanager
def gc_for_batches(young: int = INGEST_GC_YOUNG_THRESHOLD) -> Iterator[None]:
    """Garbage collection for a process that makes and drops some 100,000 short-lived objects
    a batch (envelopes, UUIDs, rows): what the process holds from startup (Django, the
    modules) is frozen out of collections, and the young generation is collected once a
    batch rather than every 700 objects. Each batch's objects are freed by their reference
    counts anyway; the collector only looks for cycles, and with the defaults it spent
    about 15% of the ingester's time doing so (bench/ingest.py, docs/figures.md)."""
    gc.collect()
    gc.freeze()
    before = gc.get_threshold()
    gc.set_threshold(young, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def ingest_run(
    ingester: EventIngester,
    *,
    stopping: Callable[[], bool],
    retention_every: float = 3600.0,
    log_every: float = 10.0,
    idle_log_every: float = 300.0,
    exit_when_idle: bool = False,
) -> tuple[int, int]:
    """Run ``ingester`` until ``stopping()`` (or, with ``exit_when_idle``, until the stream has
    nothing new): the config re-published every 5 s, retention every ``retention_every`` s
    (0: never), a trim every ``log_every`` s, and a progress line then if anything happened
    (events stored or dead-lettered, entries waiting or trimmed); with nothing to do, one
    line every ``idle_log_every`` s says it is alive. Redis or the database going away pauses
    it, with backoff, never stops it. Returns (events stored, dead letters).
    """
    with gc_for_batches():
        return _ingest_loop(
            ingester,
            stopping=stopping,
            retention_every=retention_every,
            log_every=log_every,
            idle_log_every=idle_log_every,
            exit_when_idle=exit_when_idle,
        )


def _ingest_loop(
    ingester: EventIngester,
    *,
    stopping: Callable[[], bool],
    retention_every: float,
    log_every: float,
    idle_log_every: float,
    exit_when_idle: bool,
) -> tuple[int, int]:
    stored = dead = 0
    window_start = last_line = time.monotonic()
    window_stored = window_dead = 0
    next_sync = 0.0
    next_retention = time.monotonic() + 60 if retention_every > 0 else float("inf")
    backoff = 0.5
    while not stopping():
        try:
            if time.monotonic() >= next_sync:
                if next_sync == 0.0:  # on starting: the days ahead have their partitions
                    partitions_ensure(now_ms=time.time_ns() // 1_000_000)
                telemetry_config_sync()
                ingester.hosts = worker_hosts()  # a host added since is read from now on
                next_sync = time.monotonic() + 5
            if time.monotonic() >= next_retention:
                removed = {k: v for k, v in events_retention_apply().items() if v}
                if removed:
                    progress_logger.info("Retention: deleted %s", removed)
                if folded := fleet_labels_fold():
                    progress_logger.info(
                        "Retention: %d metric label values folded into the overflow series", folded
                    )
                next_retention = time.monotonic() + retention_every
            outcome = ingester.step()
            stored += outcome.stored
            dead += outcome.dead
            window_stored += outcome.stored
            window_dead += outcome.dead
            backoff = 0.5
            if (
                exit_when_idle
                and outcome.stored + outcome.duplicates + outcome.dead == 0
                and _drained(ingester)
            ):
                break
        except PAUSING_ERRORS as exc:
            progress_logger.error(
                "Ingest paused (%s: %s); retrying in %.1fs", type(exc).__name__, exc, backoff
            )
            close_old_connections()
            time.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            continue
        elapsed = time.monotonic() - window_start
        if elapsed >= log_every:
            try:
                trimmed = ingester.trim()
                lag = streams_lag(client=ingester.client, streams=ingester.streams, group=ingester.group)
            except redis.RedisError:
                continue  # reported by the next step's retry
            busy = window_stored or window_dead or trimmed or lag["pending"] or lag["undelivered"]
            if busy or time.monotonic() - last_line >= idle_log_every:
                progress_logger.info(
                    "%s %d events (%.0f/s), %d dead letters; stored %d in all; stream length %d "
                    "(%d trimmed), pending %d, not yet read %d, oldest not stored %.1fs",
                    "stored" if busy else "idle: stored",
                    window_stored,
                    window_stored / elapsed,
                    window_dead,
                    stored,
                    lag["length"],
                    trimmed,
                    lag["pending"],
                    lag["undelivered"],
                    lag["lag_ms"] / 1000,
                )
                last_line = time.monotonic()
            window_start, window_stored, window_dead = time.monotonic(), 0, 0
    progress_logger.info("Stopped: stored %d events, %d dead letters", stored, dead)
    return stored, dead
