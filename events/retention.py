"""Retention: events past their type's kept-for period are deleted, a time window at a time."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from django.db import connection, transaction
from django.db.models import Max

from events.models import MAX_KEEP_DAYS, EventRecord, TokenEvent
from events.partitions import (
    DAY_MS,
    Partition,
    partition_drop,
    partition_empty,
    partitioned,
    partitions_ensure,
    partitions_of,
    types_in,
)
from events.rollups import activity_prune, rollups_prune

logger = logging.getLogger(__name__)


def events_retention_apply(
    *,
    now_ms: int | None = None,
    chunk: int = 10_000,
    on_chunk: Callable[[str, int, float], None] | None = None,
    on_drop: Callable[[Partition], None] | None = None,
) -> dict[str, int]:
    """Apply the retention policies; returns the rows deleted, by type.

    On PostgreSQL the partitions of the days ahead are made first, then every partition whose
    time is all past the policies of the events it holds is dropped whole (``on_drop`` told of
    each): token events leave a day at a time, kept up to a day past their policy, and none is
    ever deleted from a day's partition. What is left is deleted: events in the default
    partition, in the partition of the time before partitions, and JSON events of a type whose
    policy is shorter than those it shares its week with. SQLite deletes all of it.

    Deletes go one time window a transaction, a range scan of the (type, timestamp) index; the
    window widens or narrows to hold about ``chunk`` rows, and empty stretches are skipped with
    one index lookup. So no transaction runs long (no long locks, no replica lag spike) and a
    run costs what it deletes, not the size of the table.
    """
    from events.models import RetentionPolicy

    now_ms = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    # A row written past the model's bound (by hand in SQL) is applied at the bound.
    cutoffs = {
        p.event_type: now_ms - min(p.keep_days, MAX_KEEP_DAYS) * DAY_MS for p in RetentionPolicy.objects.all()
    }
    if "tokenGenerated" in cutoffs:
        # Token events leave a whole day at a time (a partition on PostgreSQL; SQLite the same).
        cutoffs["tokenGenerated"] -= cutoffs["tokenGenerated"] % DAY_MS
    token_tables = [TokenEvent._meta.db_table]
    if partitioned():
        partitions_ensure(now_ms=now_ms)
        _partitions_retire(cutoffs, on_drop)
        # In the token table, only the default partition is deleted from.
        token_tables = [p.name for p in partitions_of(TokenEvent._meta.db_table) if p.default]
    deleted: dict[str, int] = {}
    for event_type, cutoff in cutoffs.items():
        report = None if on_chunk is None else functools.partial(on_chunk, event_type)
        deleted[event_type] = _delete_before(
            EventRecord._meta.db_table, "type = %s AND ", [event_type], cutoff, chunk, report
        )
        if event_type == "tokenGenerated":
            for table in token_tables:
                deleted[event_type] += _delete_before(table, "", [], cutoff, chunk, report)
    longest = RetentionPolicy.objects.aggregate(days=Max("keep_days"))["days"]
    if longest is not None:
        # Stats rollups are kept as long as the longest-kept events: hours with no event
        # left to show are counted no more.
        rollups_prune(now_ms - min(longest, MAX_KEEP_DAYS) * DAY_MS)
    activity_prune(now_ms)
    workers_forget(now_ms)
    return deleted


def _partitions_retire(cutoffs: dict[str, int], on_drop: Callable[[Partition], None] | None) -> None:
    """Drop the partitions all past their events' policies (a type without a policy is kept for
    good, so is a partition holding it); the partition of the time before partitions once empty."""

    def past(partition: Partition, types: set[str]) -> bool:
        upper = partition.upper
        return upper is not None and all(t in cutoffs and upper <= cutoffs[t] for t in types)

    for table in (TokenEvent._meta.db_table, EventRecord._meta.db_table):
        for partition in partitions_of(table):
            if partition.default or partition.upper is None:
                continue
            if partition.lower is None:
                droppable = partition_empty(partition)
            elif table == TokenEvent._meta.db_table:
                droppable = past(partition, {"tokenGenerated"})
            else:
                droppable = past(partition, types_in(partition))
            if droppable and partition_drop(table, partition) and on_drop is not None:
                on_drop(partition)


def _delete_before(
    table: str,
    where: str,
    params: list[Any],
    cutoff: int,
    chunk: int,
    on_chunk: Callable[[int, float], None] | None,
) -> int:
    """Delete the rows of ``table`` (matching ``where``) stamped before ``cutoff``, one time
    window a transaction."""
    deleted = 0

    def oldest_from(since: int) -> int | None:
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT MIN(timestamp) FROM {table} WHERE {where}timestamp >= %s", [*params, since]
            )
            row = cursor.fetchone()
        return None if row is None or row[0] is None else int(row[0])

    window = 60_000  # ms; adjusted to the data's rate below
    start = oldest_from(0)
    while start is not None and start < cutoff:
        end = min(start + window, cutoff)
        started = time.perf_counter()
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                f"DELETE FROM {table} WHERE {where}timestamp >= %s AND timestamp < %s", [*params, start, end]
            )
            count = max(cursor.rowcount, 0)
        deleted += count
        if on_chunk is not None:
            on_chunk(count, time.perf_counter() - started)
        if count:
            window = max(1, min(window * 8, int(window * chunk / count)))
            start = end
        else:
            window *= 8
            start = oldest_from(end)
    return deleted


def workers_forget(now_ms: int) -> int:
    """Delete the workers not heard from for ``MLXSERVE_WORKER_FORGET_AFTER`` (a worker comes back
    with its next event): the fleet's pages and series hold the live fleet, not every source
    ever seen."""
    from django.conf import settings

    from events.models import Worker

    cutoff = now_ms - settings.WORKER_FORGET_AFTER_S * 1000
    forgotten, _ = Worker.objects.filter(last_heard_at__lt=cutoff).delete()
    if forgotten:
        logger.info("Forgot %d workers not heard from since %d", forgotten, cutoff)
    return forgotten
