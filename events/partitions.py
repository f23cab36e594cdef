"""Time partitions of the event tables on PostgreSQL: made ahead, dropped whole by retention.

Both event tables are partitioned by ``timestamp`` (PostgreSQL's declarative partitioning):
token events a day a partition, JSON events a week a partition, each table with a default
partition for an event whose time has none (one stamped before the oldest partition kept, or
after the newest made). The ingester makes the partitions of the days ahead in its hourly pass
(and when it starts); retention drops a partition once all of it is past its events' policies:
no row deleted, so no dead tuple left and no VACUUM owed. An events table upgraded from before
partitions keeps its rows as one partition of the time before (``events_event_before``), emptied
by retention's deletes and dropped once empty.

SQLite keeps plain tables: this module does nothing there.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from django.db import DatabaseError, connection, transaction

logger = logging.getLogger(__name__)

DAY_MS = 86_400_000
# Table -> the width of its partitions, ms. Epoch-aligned: a partition starts where a multiple
# of the width does (a day at 00:00 UTC; a week on a Thursday, as 1970-01-01 was).
WIDTHS = {"events_token": DAY_MS, "events_event": 7 * DAY_MS}
# How far ahead partitions are made: the ingester's pass runs hourly, so two days is slack.
AHEAD_MS = 2 * DAY_MS
# A partition is dropped with a lock on its table, held for milliseconds; waited for no longer.
LOCK_TIMEOUT = "2s"

_BOUNDS = re.compile(r"FOR VALUES FROM \((MINVALUE|'?-?\d+'?)\) TO \((MAXVALUE|'?-?\d+'?)\)")


@dataclass(frozen=True)
class Partition:
    name: str
    lower: int | None  # None: MINVALUE (the time before partitions), or the default partition
    upper: int | None  # None: MAXVALUE, or the default partition
    default: bool = False

    @property
    def span(self) -> str:
        if self.default:
            return "default"
        return f"{_moment(self.lower)} .. {_moment(self.upper)}"


def _moment(ms: int | None) -> str:
    return "…" if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")


def partitioned() -> bool:
    return connection.vendor == "postgresql"


def partitions_of(table: str) -> list[Partition]:
    """The partitions of ``table``, oldest first, the default last."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass",
            [table],
        )
        rows = cursor.fetchall()
    found = []
    for name, bound in rows:
        if bound == "DEFAULT":
            found.append(Partition(name, None, None, default=True))
            continue
        match = _BOUNDS.search(bound)
        if match is None:  # pragma: no cover - only range partitions are made
            continue
        lower, upper = (None if v.endswith("VALUE") else int(v.strip("'")) for v in match.groups())
        found.append(Partition(name, lower, upper))
    return sorted(found, key=lambda p: (p.default, -(2**63) if p.lower is None else p.lower))


def partition_name(table: str, lower: int) -> str:
    return f"{table}_{datetime.fromtimestamp(lower / 1000, tz=UTC):%Y%m%d}"


def partitions_ensure(*, now_ms: int) -> list[str]:
    """Make the partitions from the one holding ``now_ms`` to ``AHEAD_MS`` past it where
    missing; returns their names. Rows already in the default partition for a new partition's
    time are moved into it. Nothing on SQLite."""
    if not partitioned():
        return []
    made = []
    for table, width in WIDTHS.items():
        existing = partitions_of(table)
        ranges = [(p.lower, p.upper) for p in existing if not p.default]
        start = now_ms - now_ms % width
        for lower in range(start, now_ms + AHEAD_MS + 1, width):
            upper = lower + width
            if any(_overlaps(lower, upper, r) for r in ranges):
                continue
            _partition_make(table, lower, upper, default=next((p for p in existing if p.default), None))
            made.append(partition_name(table, lower))
    return made


def _overlaps(lower: int, upper: int, other: tuple[int | None, int | None]) -> bool:
    low, high = other
    return (low is None or low < upper) and (high is None or lower < high)


def _partition_make(table: str, lower: int, upper: int, *, default: Partition | None) -> None:
    """A new table with the parent's columns, the default partition's rows of its time moved
    into it, attached: ATTACH locks the parent only against other schema changes (reads and
    writes go on), and checks the new partition and the default one."""
    name = partition_name(table, lower)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        cursor.execute(f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS)")
        if default is not None:
            cursor.execute(
                f"WITH moved AS (DELETE FROM {default.name} WHERE timestamp >= %s AND timestamp < %s "
                f"RETURNING *) INSERT INTO {name} SELECT * FROM moved",
                [lower, upper],
            )
            if cursor.rowcount:
                logger.info("Moved %d rows of %s from %s into %s", cursor.rowcount, table, default.name, name)
        cursor.execute(f"ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES FROM ({lower}) TO ({upper})")
    logger.info("Made partition %s", name)


def partition_drop(table: str, partition: Partition) -> bool:
    """Detach and drop ``partition`` (its rows go with it, at once, leaving nothing to vacuum).
    False, and the partition kept for the next pass, if its table stays busy past the lock
    timeout (the lock is held for milliseconds, but waits behind queries already running)."""
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            cursor.execute(f"ALTER TABLE {table} DETACH PARTITION {partition.name}")
            cursor.execute(f"DROP TABLE {partition.name}")
    except DatabaseError as exc:
        logger.warning("Partition %s not dropped this time (%s); tried again next pass", partition.name, exc)
        return False
    logger.info("Dropped partition %s (%s)", partition.name, partition.span)
    return True


def partition_empty(partition: Partition) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {partition.name})")
        row = cursor.fetchone()
    return bool(row and row[0])


def types_in(partition: Partition) -> set[str]:
    """The event types a partition of ``events_event`` holds: one index probe a type."""
    from mlxserve.contract.events import EVENT_TYPES

    with connection.cursor() as cursor:
        found = set()
        for event_type in EVENT_TYPES:
            cursor.execute(f"SELECT EXISTS (SELECT 1 FROM {partition.name} WHERE type = %s)", [event_type])
            row = cursor.fetchone()
            if row and row[0]:
                found.add(event_type)
    return found
