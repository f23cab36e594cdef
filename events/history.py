"""The stored events, from both tables they live in, as the API writes them and in one order.

JSON events are ``EventRecord`` rows and token events ``TokenEvent`` rows. A read takes the
rows it needs from each table (each query on its own indexes, in the list's order, with the
same filters and cursor) and merges them: every answer is what one table holding all of them
would give, byte for byte.
"""

from __future__ import annotations

import heapq
import itertools
import operator
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from functools import cache, lru_cache
from typing import Any

import msgspec
from django.db import connection
from django.db.models import Case, F, FloatField, Q, QuerySet, TextField, Value, When
from django.db.models.functions import Cast

from events.models import MODEL_COLUMN_LENGTH, Channel, EventRecord, TokenEvent
from events.partitions import DAY_MS
from events.responses import EventOut
from events.tokens import token_payload, token_payload_value
from mlxserve.contract.validation import INT64_MAX

TOKEN_TYPE = "tokenGenerated"
# A row of ``event_values``: a tuple of ``_ROW_FIELDS`` (no dict a row).
Row = tuple[Any, ...]


class StoredEvent(msgspec.Struct, gc=False):
    """A stored event as the read paths use it: as the API shows it (its payload written out as
    the database holds it, never re-encoded), and its payload decoded (for the figures)."""

    out: EventOut
    payload: dict[str, Any]


# A row is read with ``EventOut``'s fields in their order (under the names of the columns that
# hold them where SQL writes them as text: parsing 500 timestamps and UUIDs into Python objects
# only to print them again was most of a generation view's time), then the columns a token event's
# payload is written from (events.tokens; never cast).
_READ_AS_TEXT = {"id": "id_text", "generation_id": "generation_text", "ingested_at": "ingested_text"}
_AS_TEXT = {alias: Cast(name, TextField()) for name, alias in _READ_AS_TEXT.items()}
_READ_AS = {**_READ_AS_TEXT, "payload": "payload_text"}
_ROW_FIELDS = (
    *(_READ_AS.get(name, name) for name in EventOut.__struct_fields__),
    "model",
    "token",
    "logprob_value",
)


def _at(field: str) -> int:
    return _ROW_FIELDS.index(_READ_AS.get(field, field))


_ID, _TYPE, _TIMESTAMP, _SOURCE, _GENERATION, _SEQ, _PAYLOAD, _INGESTED, _MODEL, _TOKEN, _LOGPROB = map(
    _at,
    (
        "id",
        "type",
        "timestamp",
        "source",
        "generation_id",
        "seq",
        "payload",
        "ingested_at",
        "model",
        "token",
        "logprob_value",
    ),
)


class _AsDouble(Cast):
    """``logprob`` read as a double (a 32-bit float's own text is its shortest, not the number
    stored), taken as the driver gives it: a float, so no converter runs on every row."""

    def __init__(self, expression: Any) -> None:
        super().__init__(expression, FloatField())

    @property
    def convert_value(self) -> Callable[..., Any]:  # type: ignore[override]
        return self._convert_value_noop  # type: ignore[attr-defined, no-any-return]


def event_values(queryset: QuerySet[Any]) -> QuerySet[Any, Row]:
    """Plain rows (tuples of ``_ROW_FIELDS``) of either table, or of the ``Event`` view: every
    column the API shows read as text; no model instances."""
    if queryset.model is TokenEvent:
        columns: dict[str, Any] = {
            "logprob_value": _AsDouble("logprob"),
            "type": Value(TOKEN_TYPE, TextField()),
            "source": F("channel__source"),
            "model": F("channel__model"),
            "payload_text": Value(None, TextField()),
        }
    elif queryset.model is EventRecord:
        columns = {
            "payload_text": Cast("payload", TextField()),
            "token": Value(None, TextField()),
            "logprob_value": Value(None, TextField()),  # always null: no float converter a row
        }
    else:  # the Event view
        columns = {
            "payload_text": Case(When(token__isnull=True, then=Cast("payload", TextField()))),
            "logprob_value": F("logprob"),
        }
    return queryset.annotate(**_AS_TEXT, **columns).values_list(*_ROW_FIELDS)


@cache
def rows_of(model: type[EventRecord] | type[TokenEvent]) -> QuerySet[Any, Row]:
    """``event_values`` of a whole table, made once a process: a request filters it (a clone),
    instead of resolving the columns' expressions again. Never evaluated itself."""
    return event_values(model.objects.all())


def _dashed(value: str | None) -> str | None:
    # SQLite keeps a UUID as 32 hex digits; PostgreSQL's text is already dashed.
    if value is None or len(value) != 32:
        return value
    return f"{value[:8]}-{value[8:12]}-{value[12:16]}-{value[16:20]}-{value[20:]}"


@lru_cache(maxsize=4096)
def _iso(value: str) -> str:
    """A stored timestamp's text (either database's) as ISO 8601 UTC; a batch shares one."""
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def stored_event(row: Row, decode: Callable[[bytes], dict[str, Any]] | None = None) -> StoredEvent:
    """A row of ``event_values``; ``decode`` parses the payload when figures need it."""
    text = row[_PAYLOAD]
    if text is not None:
        raw = text.encode()
        payload = decode(raw) if decode else {}
    else:
        model, token, logprob = row[_MODEL], row[_TOKEN], row[_LOGPROB]
        raw = token_payload(model, token, logprob)
        # What decoding ``raw`` gives, without decoding it.
        payload = token_payload_value(model, token, logprob) if decode else {}
    out = EventOut(
        id=_dashed(row[_ID]) or "",
        type=row[_TYPE],
        timestamp=row[_TIMESTAMP],
        source=row[_SOURCE],
        generation_id=_dashed(row[_GENERATION]),
        seq=row[_SEQ],
        payload=msgspec.Raw(raw),
        ingested_at=_iso(row[_INGESTED]),
    )
    return StoredEvent(out, payload)


def event_row(row: Row) -> EventOut:
    """A row of ``event_values`` as the API shows it; the payload goes out as the database holds
    it (msgspec writes ``Raw`` as is)."""
    return stored_event(row).out


# -- which rows: the event list's filters on both tables ---------------------------------------


# A source or model filter reads each (source, model) pair's rows off its own index, merged; past
# this many pairs, one query sorts their rows instead.
CHANNELS_MERGED = 32


def tokens_matching(filters: Mapping[str, Any]) -> list[QuerySet[Any, Row]]:
    """The token events the event list's (validated) ``filters`` select: one queryset, or one
    per (source, model) pair for a source or model filter (each in time order off the pair's
    index); none when they can hold none (another type asked for, or no such source or model)."""
    event_type, source, model = filters.get("type"), filters.get("source"), filters.get("model")
    if event_type and event_type != TOKEN_TYPE:
        return []
    tokens = rows_of(TokenEvent)
    if generation_id := filters.get("generationId"):
        tokens = tokens.filter(generation_id=generation_id)
    if (since := filters.get("since")) is not None:
        tokens = tokens.filter(timestamp__gte=since)
    if (until := filters.get("until")) is not None:
        tokens = tokens.filter(timestamp__lte=until)
    if not (source or model):
        return [_by_generation(tokens) if generation_id else tokens]
    # The pairs first (a small table), then the token rows by their ids.
    channels = Channel.objects.all()
    if source:
        channels = channels.filter(source=source)
    if model:
        channels = channels.filter(model=model[:MODEL_COLUMN_LENGTH])
    ids = sorted(channels.values_list("id", flat=True))
    if generation_id:
        return [_by_generation(tokens.filter(channel_id__in=ids))] if ids else []
    if len(ids) > CHANNELS_MERGED:
        return [tokens.filter(channel_id__in=ids)] if ids else []
    return [tokens.filter(channel_id=ident) for ident in ids]


def _by_generation(tokens: QuerySet[Any, Row]) -> QuerySet[Any, Row]:
    """A generation's token events, sorted after they are found by the generation index: ordered
    by ``timestamp + 0``, which no index holds, so the planner cannot walk the time index
    hoping to meet the generation soon (at 30 million rows it read whole days for an old one)."""
    return tokens.annotate(sort_timestamp=F("timestamp") + 0)


def history(records: QuerySet[Any, Row], filters: Mapping[str, Any]) -> list[QuerySet[Any, Row]]:
    """The rows of both tables that ``filters`` select (``records``: ``rows_of(EventRecord)``
    already filtered by them)."""
    return [records, *tokens_matching(filters)]


def row_key(row: Row) -> tuple[int, int, uuid.UUID]:
    """A row's place in the event order: ``(timestamp, seq, id)``, which no two events share."""
    return int(row[_TIMESTAMP]), int(row[_SEQ]), uuid.UUID(row[_ID])


# ``row_key`` for merging rows of one database: the id's text is fixed-width lower-case hex (dashed
# on PostgreSQL, not on SQLite), so it sorts as the UUID's bytes do, as the database orders them;
# no UUID made a row (most of a generation view's merge).
_merge_key: Callable[[Row], tuple[int, int, str]] = operator.itemgetter(_TIMESTAMP, _SEQ, _ID)


def in_event_order(queryset: QuerySet[Any, Any], *, newest_first: bool = True) -> QuerySet[Any, Any]:
    """``queryset`` in the event order, by ``timestamp + 0`` where ``_by_generation`` asked for it."""
    sign = "-" if newest_first else ""
    by = "sort_timestamp" if "sort_timestamp" in queryset.query.annotations else "timestamp"
    return queryset.order_by(f"{sign}{by}", f"{sign}seq", f"{sign}id")


# A page is looked for first in the day past where it starts (see ``rows_merged``): a token partition.
PROBE_MS = DAY_MS


def rows_merged(
    querysets: Sequence[QuerySet[Any, Row]],
    limit: int,
    *,
    newest_first: bool = True,
    near: int | None = None,
) -> list[Row]:
    """The first ``limit`` rows of ``querysets`` together, in the event order (newest first, or
    oldest first): at most ``limit`` from each, merged.

    ``near`` is where the page starts (a cursor's time, or now for the first page). On
    PostgreSQL the rows of the day past it are read first: a bound on ``timestamp`` the planner
    prunes the time partitions with, so each query is planned and run over one or two partitions
    of each table instead of all of them (about 1.5 ms of planning a query over 30 days; 8 ms on
    a connection's first). If they are ``limit`` rows or more, they are the page: every row
    outside the bound comes after all of them. Otherwise everything is read as before. A
    generation's rows (sorted after they are found, ``_by_generation``) are read at once, by
    prepared statements (``rows_together``): nothing prunes their partitions at planning. The
    queries of a page are sent together.
    """
    by_generation = any("sort_timestamp" in q.query.annotations for q in querysets)
    if near is not None and connection.vendor == "postgresql" and not by_generation:
        if newest_first:
            bound = Q(timestamp__gte=max(-INT64_MAX - 1, near - PROBE_MS))
        else:
            bound = Q(timestamp__lte=min(INT64_MAX, near + PROBE_MS))
        rows = _merged([q.filter(bound) for q in querysets], limit, newest_first)
        if len(rows) >= limit:
            return rows
    return _merged(querysets, limit, newest_first, prepared=by_generation)


def _merged(
    querysets: Sequence[QuerySet[Any, Row]], limit: int, newest_first: bool, *, prepared: bool = False
) -> list[Row]:
    pages = rows_together(
        [in_event_order(q, newest_first=newest_first)[:limit] for q in querysets], prepared=prepared
    )
    if len(pages) == 1:
        return pages[0]
    return list(itertools.islice(heapq.merge(*pages, key=_merge_key, reverse=newest_first), limit))


def after(key: tuple[int, int, uuid.UUID], *, newer: bool = False) -> Q:
    """The rows after ``key`` in the list's order (older), or before it (``newer``). The bound on
    ``timestamp`` alone is what an index range uses; the rest settles the ties."""
    timestamp, seq, event_id = key
    op = "gt" if newer else "lt"
    edge = "gte" if newer else "lte"
    return Q(**{f"timestamp__{edge}": timestamp}) & (
        Q(**{f"timestamp__{op}": timestamp})
        | Q(timestamp=timestamp, **{f"seq__{op}": seq})
        | Q(timestamp=timestamp, seq=seq, **{f"id__{op}": event_id})
    )


def events_export(querysets: Sequence[QuerySet[Any, Row]], *, chunk: int = 2000) -> Iterator[bytes]:
    """NDJSON lines of ``querysets`` together, oldest first, read in keyset chunks (no OFFSET,
    no long transaction): memory stays flat whatever the range holds."""
    last: tuple[int, int, uuid.UUID] | None = None
    while True:
        pages = querysets if last is None else [q.filter(after(last, newer=True)) for q in querysets]
        rows = rows_merged(pages, chunk, newest_first=False)
        if not rows:
            return
        yield b"".join(msgspec.json.encode(event_row(e)) + b"\n" for e in rows)
        last = row_key(rows[-1])


def event_get(event_id: uuid.UUID) -> Row | None:
    """One stored event by id (the latest, if a producer reused the id with another timestamp)."""
    rows = [
        row
        for model in (EventRecord, TokenEvent)
        if (row := rows_of(model).filter(pk=event_id).order_by("-timestamp").first())
    ]
    return max(rows, key=_merge_key, default=None)


def generation_events(
    generation_id: uuid.UUID, *, also: Sequence[QuerySet[Any, Row]] = ()
) -> tuple[list[StoredEvent], list[list[Row]]]:
    """A generation's events, oldest first, payloads decoded; and the rows of ``also``, read
    in the same round trip (the generation's own row)."""
    decode = msgspec.json.Decoder(dict[str, Any]).decode
    querysets = [rows_of(model).filter(generation_id=generation_id) for model in (EventRecord, TokenEvent)]
    records, tokens, *others = rows_together(
        [*(q.order_by("timestamp", "seq", "id") for q in querysets), *also], prepared=True
    )
    return [stored_event(row, decode) for row in heapq.merge(records, tokens, key=_merge_key)], others


def rows_together(querysets: Sequence[QuerySet[Any, Row]], *, prepared: bool = False) -> list[list[Row]]:
    """``[list(q) for q in querysets]``; on PostgreSQL sent together, one round trip for all
    (psycopg's pipeline mode), each planned and run as it would be alone.

    ``prepared``: as prepared statements run with generic plans. For a query the time partitions
    cannot be pruned for (a generation's rows: no bound on ``timestamp``), planning it over every
    daily partition took longer than running it (2.5-3 ms and 1.8 ms at 30 days); a generic plan
    is made once a connection. The connection's ``plan_cache_mode`` is ``force_generic_plan``
    (settings): it applies to statements with parameters bound by the server, and the ORM binds
    them itself (client-side binding), so only these run generic plans. Others go through the
    ORM's cursors (its query log and metrics see them).
    """
    if connection.vendor != "postgresql" or (len(querysets) < 2 and not prepared):
        return [list(q) for q in querysets]
    import psycopg  # PostgreSQL's driver: not in a worker's install

    compiled = [q.query.sql_with_params() for q in querysets]
    connection.ensure_connection()
    raw = connection.connection
    with connection.wrap_database_errors:
        cursors: list[Any] = [psycopg.Cursor(raw) if prepared else connection.cursor() for _ in compiled]
        try:
            with raw.pipeline():
                for cursor, (sql, params) in zip(cursors, compiled, strict=True):
                    if prepared:
                        cursor.execute(sql, params, prepare=True)
                    else:
                        cursor.execute(sql, params)
            return [_rows(cursor, q) for cursor, q in zip(cursors, querysets, strict=True)]
        finally:
            for cursor in cursors:
                cursor.close()


def _rows(cursor: Any, queryset: QuerySet[Any, Any]) -> list[Row]:
    """A cursor's rows as ``queryset`` gives them: its ``values_list`` fields, without what was
    annotated after them (a sort key; Django selects those last)."""
    rows: list[Row] = cursor.fetchall()
    width = len(queryset._fields or ())  # type: ignore[attr-defined]  # values_list's fields
    if not width or not rows or len(rows[0]) == width:
        return rows
    return [row[:width] for row in rows]
