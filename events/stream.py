"""The Redis stream that carries events from producers to the ingester.

Redis alone, no Django: the API and the workers both append through here.
An entry holds either one envelope, JSON-encoded, in the field ``e``, or a
batch of them, a JSON array, in the field ``b``. Workers send batches: one
entry per batch costs Redis and the worker a tenth of one entry per event.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import redis

ENTRY_FIELD = b"e"
BATCH_FIELD = b"b"


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


def batch_body(bodies: Sequence[bytes]) -> bytes:
    """Envelopes already encoded as JSON, joined into one JSON array."""
    return b"[" + b",".join(bodies) + b"]"


def stream_append_batch(client: redis.Redis, stream: str, bodies: Sequence[bytes]) -> str | None:
    """XADD one entry holding all ``bodies``, in order. Raises ``redis.RedisError``."""
    if not bodies:
        return None
    entry_id = client.xadd(stream, {BATCH_FIELD: batch_body(bodies)})
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def entry_envelopes(entry_id: str, fields: dict[bytes, bytes]) -> list[tuple[str, bytes]]:
    """The envelopes an entry holds, each labelled for a dead letter: ``id`` or ``id#index``."""
    body = fields.get(ENTRY_FIELD)
    if body is not None:
        return [(entry_id, body)]
    batch = fields.get(BATCH_FIELD)
    if batch is not None:
        try:
            items = _BATCH_DECODER.decode(batch)
        except msgspec.DecodeError:
            return [(entry_id, batch)]  # stored as a dead letter with the JSON error
        return [(f"{entry_id}#{index}", bytes(item)) for index, item in enumerate(items)]
    # A foreign producer wrote something else: keep all of it for the dead letter.
    return [(entry_id, repr(fields).encode())]


_BATCH_DECODER = msgspec.json.Decoder(list[msgspec.Raw])


def stream_envelope_bodies(client: redis.Redis, stream: str) -> list[bytes]:
    """Every envelope body on the stream, in order (for tools and tests; reads it all)."""
    entries: Any = client.xrange(stream)
    return [
        body
        for entry_id, fields in entries
        for _, body in entry_envelopes(entry_id.decode() if isinstance(entry_id, bytes) else entry_id, fields)
    ]
