"""Token events in typed columns: which ones fit, storing each once, and their payloads written
out again byte for byte as the JSON form stores them.

A token event is the row nearly every stored event is, so it is kept small (``TokenEvent``):
its id, generation, time, sequence number, token, log-probability, when it was stored, and the
(source, model) pair as a ``Channel`` id. What that shape cannot hold (metadata, a sequence
number past 2^31, a model name past 200 characters) is stored as JSON with the other types.
"""

from __future__ import annotations

import functools
import logging
import math
import struct
import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import msgspec
from django.conf import settings
from django.db import connection
from django.db.models import Q
from msgspec import UNSET

from events.copy import copy_text, copy_timestamp
from events.models import MODEL_COLUMN_LENGTH, Channel, TokenEvent
from mlxserve.contract.events import Envelope, TokenGenerated, TokenGeneratedEnvelope

logger = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1
# A token event for the typed columns, with its channel (its (source, model) pair's id).
TypedToken = tuple[TokenGeneratedEnvelope, int]
INT16_MAX = 2**15 - 1
_FLOAT32 = struct.Struct("<f")


def token_compact(envelope: TokenGeneratedEnvelope) -> bool:
    """Whether this token event fits the typed columns: no metadata, a sequence number under
    2^31, a model name of at most 200 characters, and a log-probability a 32-bit float holds
    exactly (every one a worker sends: mlx computes them in 32 bits or fewer). SQLite keeps -0.0
    as an integer zero, so there a log-probability of -0.0 keeps its sign as JSON."""
    payload = envelope.payload
    if payload.metadata is not UNSET or envelope.seq > INT32_MAX or len(payload.model) > MODEL_COLUMN_LENGTH:
        return False
    logprob = payload.logprob
    if isinstance(logprob, float):
        try:
            if _FLOAT32.unpack(_FLOAT32.pack(logprob))[0] != logprob:
                return False
        except OverflowError:
            return False
        if logprob == 0 and math.copysign(1, logprob) < 0 and connection.vendor == "sqlite":
            return False
    return True


def tokens_sorted(envelopes: Sequence[Envelope]) -> tuple[list[TypedToken], list[Envelope]]:
    """Which of ``envelopes`` go to the typed columns (each with its channel) and which are JSON
    rows. A pair past the 32,767th (the column is 16 bits) is stored as JSON."""
    candidates = [e for e in envelopes if type(e) is TokenGeneratedEnvelope and token_compact(e)]
    if not candidates:
        return [], list(envelopes)
    # Channels by source, then model: two lookups of strings (their hashes kept by Python) for
    # each of a batch's thousands of tokens, instead of a tuple made and hashed.
    pairs = {(e.source, e.payload.model) for e in candidates}
    by_source: dict[str, dict[str, int]] = {source: {} for source, _ in pairs}
    for (source, model), ident in channels_for(pairs).items():
        by_source[source][model] = ident
    # A pair with no channel (its producer has its share of them) is stored as JSON, as past 16 bits.
    tokens = [
        (e, channel)
        for e in candidates
        if (channel := by_source[e.source].get(e.payload.model, _NO_CHANNEL)) <= INT16_MAX
    ]
    if len(tokens) == len(envelopes):
        return tokens, []
    typed = {id(e) for e, _ in tokens}
    return tokens, [e for e in envelopes if id(e) not in typed]


def channels_for(pairs: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """The channel id of each (source, model), made where new (in pair order, so two ingesters
    making the same ones wait on each other in one order). Read each batch, never cached: an id
    remembered past a rollback or a restore would name a row that is not there."""
    wanted = sorted(pairs)
    found: dict[tuple[str, str], int] = {}

    def read() -> None:
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            rows = Channel.objects.filter(source__in={s for s, _ in chunk}, model__in={m for _, m in chunk})
            for ident, source, model in rows.values_list("id", "source", "model"):
                if (source, model) in pairs:
                    found[(source, model)] = ident

    read()
    if missing := _channels_admitted([pair for pair in wanted if pair not in found]):
        Channel.objects.bulk_create([Channel(source=s, model=m) for s, m in missing], ignore_conflicts=True)
        read()
    return found


_NO_CHANNEL = INT16_MAX + 1


def _channels_admitted(missing: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The new pairs that get a channel: at most ``MLXSERVE_CHANNELS_PER_PRODUCER`` per host or
    producer (a source's first part, ``N`` of ``N/...``), so whatever one of them sends cannot use
    up the 16-bit ids the fleet's pairs need. (Two ingesters making a producer's last ones at once
    may each make its share: by a batch's pairs at most.)"""
    by_prefix: dict[str, list[tuple[str, str]]] = {}
    for pair in missing:
        by_prefix.setdefault(pair[0].split("/", 1)[0], []).append(pair)
    admitted: list[tuple[str, str]] = []
    limit = settings.CHANNELS_PER_PRODUCER
    for prefix, pairs in by_prefix.items():
        held = Channel.objects.filter(Q(source=prefix) | Q(source__startswith=prefix + "/")).count()
        room = max(0, limit - held)
        admitted += pairs[:room]
        if len(pairs) > room:
            logger.warning(
                "%d new (source, model) pairs of %s get no channel: it has %d "
                "(MLXSERVE_CHANNELS_PER_PRODUCER); their token events are stored as JSON rows",
                len(pairs) - room,
                prefix,
                held,
            )
    return admitted


def tokens_insert(tokens: Sequence[TypedToken], now: Any) -> list[TokenGeneratedEnvelope]:
    """Store the token events not stored before; returns those stored now.

    An event whose id is stored already (a redelivery; or a producer reusing an id, at any
    time) is skipped: read first (the hash index on ``id``), under the batch's per-generation
    locks (``events.storage``), so two ingesters storing the same entries store them once.
    """
    if not tokens:
        return []
    table = TokenEvent._meta.db_table
    if connection.vendor == "postgresql":
        hexes = [e.id.hex for e, _ in tokens]  # each id written out once: looked for, then stored
        stored = ids_stored(table, [], hexes=hexes)
        rows = [(e, channel, ident) for (e, channel), ident in zip(tokens, hexes, strict=True)]
        if stored:
            rows = [row for row in rows if row[0].id not in stored]
        _copy(rows, now)
        return [e for e, _, _ in rows]
    stored = ids_stored(table, [e.id for e, _ in tokens])
    fresh = [(e, channel) for e, channel in tokens if e.id not in stored]
    TokenEvent.objects.bulk_create(
        [
            TokenEvent(
                id=e.id,
                generation_id=e.generation_id,
                timestamp=e.timestamp,
                seq=e.seq,
                channel_id=channel,
                token=e.payload.token,
                logprob=None if e.payload.logprob is UNSET else e.payload.logprob,
                ingested_at=now,
            )
            for e, channel in fresh
        ],
        batch_size=500,
    )
    return [e for e, _ in fresh]


def ids_stored(table: str, ids: Sequence[uuid.UUID], *, hexes: Sequence[str] = ()) -> set[uuid.UUID]:
    """Which of ``ids`` ``table`` holds. On PostgreSQL the ids go as one uuid[] literal written
    here (``{hex,hex,...}``): the ORM's ``id IN (...)`` adapts each id on its own, and psycopg's
    list adapter still costs ~2 µs an id, about a tenth of the ingester's time. ``hexes``: the
    ids as 32 hex digits, where the caller has them already (PostgreSQL)."""
    if not ids and not hexes:
        return set()
    found: set[uuid.UUID] = set()
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            literal = "{" + ",".join(hexes or [i.hex for i in ids]) + "}"
            cursor.execute(f"SELECT id FROM {table} WHERE id = ANY(%s::uuid[])", [literal])
            return {row[0] for row in cursor.fetchall()}
        for start in range(0, len(ids), 500):  # SQLite keeps a UUID as 32 hex digits
            chunk = [i.hex for i in ids[start : start + 500]]
            cursor.execute(f"SELECT id FROM {table} WHERE id IN ({', '.join(['%s'] * len(chunk))})", chunk)
            found.update(uuid.UUID(hex=row[0]) for row in cursor.fetchall())
    return found


_COLUMNS = 'id, generation_id, "timestamp", logprob, ingested_at, seq, channel_id, token'


def _copy(rows: Sequence[tuple[TokenGeneratedEnvelope, int, str]], now: Any) -> None:
    """COPY the rows (token event, its channel, its id's hex) into the token table."""
    if not rows:
        return
    at = copy_timestamp(now)
    lines = []
    generations: dict[int, str] = {}  # a batch holds a few hundred tokens a generation: its hex once
    for e, channel, ident in rows:
        p = e.payload
        logprob = "\\N" if p.logprob is UNSET else repr(p.logprob)
        key = e.generation_id.int
        if (generation := generations.get(key)) is None:
            generation = generations[key] = e.generation_id.hex
        lines.append(
            f"{ident}\t{generation}\t{e.timestamp}\t{logprob}\t{at}\t{e.seq}\t{channel}\t{copy_text(p.token)}\n"
        )
    table = TokenEvent._meta.db_table
    with (
        connection.cursor() as cursor,
        connection.wrap_database_errors,
        cursor.cursor.copy(f"COPY {table} ({_COLUMNS}) FROM STDIN") as copy,
    ):
        copy.write("".join(lines))


# -- the payload, as the JSON form would have stored it ---------------------------------------

# A string as jsonb prints it: msgspec's encoding is the same text (``"``, ``\``, ``\b``, ``\f``,
# ``\n``, ``\r``, ``\t`` and ``\u00xx`` for the other control characters; the rest as it is),
# made in C (a tenth of the time of ``str.translate`` with jsonb's table).
_jsonb_string = msgspec.json.encode


def _jsonb_number(value: float) -> str:
    """A float as jsonb prints the number msgspec wrote for it: a numeric, in plain notation
    with the digits written (``1e-07`` is ``0.0000001``, ``-1.0`` is ``-1.0``), zero unsigned.
    Python's ``repr`` has msgspec's digits (both the shortest that read back the same float)."""
    text = repr(value)
    if "e" not in text:  # already plain: as jsonb prints it, but a signed zero
        return "0.0" if value == 0 else text
    number = Decimal(text)
    plain = format(number, "f")
    return plain[1:] if number.is_zero() and plain.startswith("-") else plain


@functools.cache
def _jsonb() -> bool:
    """Whether the JSON form is jsonb (PostgreSQL): asked once, as ``connection.vendor`` costs
    3 µs a call and this runs for every token event read."""
    return connection.vendor == "postgresql"


def token_payload_value(model: str, token: str, logprob: float | None) -> dict[str, Any]:
    """``token_payload`` decoded: the same keys in the same order, the same values (jsonb keeps
    no sign on a zero)."""
    if logprob is None:
        return {"model": model, "token": token}
    if _jsonb():
        if abs(logprob) >= 1e15:  # jsonb may print it with no point: it reads back as an integer
            return {"model": model, "token": token, "logprob": msgspec.json.decode(_jsonb_number(logprob))}
        logprob += 0.0
    return {"model": model, "token": token, "logprob": logprob}


def token_payload(model: str, token: str, logprob: float | None) -> bytes:
    """A token event's payload as the JSON form stores it on this database: msgspec's bytes on
    SQLite (a JSON text column), jsonb's text on PostgreSQL (keys by length, then by bytes)."""
    if not _jsonb():
        return msgspec.json.encode(
            TokenGenerated(model=model, token=token, logprob=UNSET if logprob is None else logprob)
        )
    if logprob is None:
        return b"%s%s}" % (_jsonb_head(model), _jsonb_string(token))
    return b'%s%s, "logprob": %s}' % (
        _jsonb_head(model),
        _jsonb_string(token),
        _jsonb_number(logprob).encode(),
    )


@functools.lru_cache(maxsize=1024)
def _jsonb_head(model: str) -> bytes:
    """A token payload's text up to its token, the same for every token of a model."""
    return b'{"model": ' + _jsonb_string(model) + b', "token": '
