"""How far ingestion is behind a stream, and how far the stream may be trimmed: read from the
consumer group's own bookkeeping (XPENDING, XINFO GROUPS), never by reading the entries."""

from __future__ import annotations

import time
from typing import Any

import redis


def _id_ms(entry_id: Any) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-", 1)[0])


def id_tuple(entry_id: Any) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


ID_PART_MAX = 2**64 - 1  # a stream id is two unsigned 64-bit integers


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
    # Nothing pending: everything up to the last delivered entry is acknowledged. (The id after it,
    # unless it is the last of the id space, as a producer may make it: then up to it.)
    ms, seq = id_tuple(info["last-delivered-id"])
    if seq < ID_PART_MAX:
        return f"{ms}-{seq + 1}"
    return f"{ms + 1}-0" if ms < ID_PART_MAX else f"{ms}-{seq}"


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
        length = client.xlen(stream)
        info = next((g for g in client.xinfo_groups(stream) if text_of(g.get("name")) == group), None)
        pending: Any = client.xpending(stream, group) if info is not None else {"pending": 0}
    except redis.ResponseError:  # no stream yet
        return lag
    now_ms = time.time_ns() // 1_000_000
    lag["length"], lag["pending"] = int(length), int(pending["pending"])
    if pending["pending"]:
        lag["oldest_pending_ms"] = max(0, now_ms - _id_ms(pending["min"]))
    # No group yet (no ingester has read this stream): every entry is undelivered.
    after = (text_of(info.get("last-delivered-id")) or "0-0") if info is not None else "0-0"
    first = client.xrange(stream, min=f"({after}", max="+", count=1)
    if first:
        lag["oldest_undelivered_ms"] = max(0, now_ms - _id_ms(first[0][0]))
        undelivered = info.get("lag") if info is not None else None
        lag["undelivered"] = int(undelivered) if undelivered is not None else int(length)
    lag["lag_ms"] = max(lag["oldest_pending_ms"], lag["oldest_undelivered_ms"])
    return lag


def streams_lag(*, client: redis.Redis, streams: list[str], group: str) -> dict[str, int]:
    """``stream_lag`` over several streams: counts added up, ages the oldest of them."""
    total = dict.fromkeys(
        ("length", "pending", "oldest_pending_ms", "undelivered", "oldest_undelivered_ms", "lag_ms"), 0
    )
    for stream in streams:
        lag = stream_lag(client=client, stream=stream, group=group)
        for key in ("length", "pending", "undelivered"):
            total[key] += lag[key]
        for key in ("oldest_pending_ms", "oldest_undelivered_ms", "lag_ms"):
            total[key] = max(total[key], lag[key])
    return total


def text_of(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
