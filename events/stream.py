"""The Redis stream that carries events from producers to the ingester.

Redis alone, no Django: the API and the workers both append through here.
Each entry holds one envelope, JSON-encoded, in the field ``e``.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

ENTRY_FIELD = b"e"


def stream_append(client: redis.Redis, stream: str, bodies: Sequence[bytes]) -> list[str]:
    """XADD each body in one round trip; returns the entry ids. Raises ``redis.RedisError``.

    No MAXLEN here: trimming by length would drop entries the ingester has
    not stored yet.
    """
    if not bodies:
        return []
    pipe = client.pipeline(transaction=False)
    for body in bodies:
        pipe.xadd(stream, {ENTRY_FIELD: body})
    return [i.decode() if isinstance(i, bytes) else str(i) for i in pipe.execute()]


def stream_ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) if missing; from the start of the stream."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
