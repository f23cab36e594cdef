"""The Redis stream that carries events from producers to the ingester.

What an entry holds, written and read here without a client (``mlxserve.bus`` does the I/O).
An entry holds either one envelope, JSON-encoded, in the field ``e``, or a
batch of them, a JSON array, in the field ``b``. Workers send batches: one
entry per batch costs Redis and the worker a tenth of one entry per event.
Other programs may write the stream too, so reading an entry trusts nothing:
whatever else an entry holds comes back as a refused item with its error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from mlxserve.contract.validation import Issue, ValidationFailed

ENTRY_FIELD = b"e"
BATCH_FIELD = b"b"


# What one stream entry may hold, all its fields together. Producers keep under it (an API post is
# at most 1 MiB; a worker's batch stops short of it); the ingester keeps a larger entry as a dead
# letter without decoding it (its first 64 KiB shown).
ENTRY_MAX_BYTES = 4 * 1024 * 1024


def batch_body(bodies: Sequence[bytes]) -> bytes:
    """Envelopes already encoded as JSON, joined into one JSON array."""
    return b"[" + b",".join(bodies) + b"]"


@dataclass
class EntryContents:
    """What stream entries hold: envelope bodies to validate, each labelled ``id`` or
    ``id#index`` (for its dead letter), and what is not an envelope at all, with why."""

    bodies: list[tuple[str, bytes]] = field(default_factory=list)
    refused: list[tuple[str, bytes, dict[str, Any]]] = field(default_factory=list)

    def refuse(self, label: str, body: bytes, message: str, code: str) -> None:
        self.refused.append((label, body, ValidationFailed([Issue([], message, code)]).as_error()))


ENTRY_FORMAT = "an entry holds one envelope in field 'e' or a JSON array of envelopes in field 'b'"


EntryFields = dict[bytes, bytes] | Sequence[tuple[bytes, bytes]]


def entry_envelopes(entry_id: str, fields: EntryFields, into: EntryContents | None = None) -> EntryContents:
    """Sort what one entry holds into envelope bodies and refused items (never raises).

    ``fields`` as Redis holds them, in order: pairs, where a field name may repeat (a dict, as
    redis-py makes by default, has already kept only the last value of a repeated name). Each
    item is labelled uniquely within the entry (its dead letter's key): the entry id for its
    ``e`` envelope, ``id#n`` for the n-th envelope of its ``b`` batch, ``id@i`` for the i-th
    field when it is refused beside others. A name given twice is not the format: every value
    under it is refused (kept as a dead letter), none silently dropped.
    """
    contents = into if into is not None else EntryContents()
    pairs = list(fields.items()) if isinstance(fields, dict) else list(fields)
    names = [name for name, _ in pairs]
    for position, (name, value) in enumerate(pairs):
        label = entry_id if len(pairs) == 1 else f"{entry_id}@{position}"
        shown = name.decode("utf-8", errors="replace")[:100]
        if names.count(name) > 1:
            contents.refuse(
                label, value, f"Repeated stream entry field '{shown}': {ENTRY_FORMAT}", "repeated_field"
            )
        elif name == ENTRY_FIELD:
            contents.bodies.append((entry_id, value))
        elif name == BATCH_FIELD:
            _batch_items(entry_id, value, contents)
        else:
            contents.refuse(
                label, value, f"Unknown stream entry field '{shown}': {ENTRY_FORMAT}", "unknown_field"
            )
    if not pairs:
        contents.refuse(entry_id, b"", f"Empty stream entry: {ENTRY_FORMAT}", "required")
    return contents


def entry_pairs(fields: Any) -> list[tuple[bytes, bytes]] | None:
    """An entry's fields as Redis sent them (a flat list: name, value, name, value...) as pairs,
    or None for an entry deleted while pending. A response callback for XREADGROUP and
    XAUTOCLAIM in place of redis-py's, which makes a dict and keeps only the last value of a
    repeated name."""
    if fields is None:
        return None
    return [(fields[i], fields[i + 1]) for i in range(0, len(fields) - 1, 2)]


def xreadgroup_pairs(response: Any, **options: Any) -> Any:
    """XREADGROUP's reply (a map in RESP3, a list of pairs in RESP2) as a list of
    ``[stream, entries]``, each entry's fields as pairs (``entry_pairs``)."""
    if response is None:
        return None
    streams = response.items() if isinstance(response, dict) else response
    return [
        [stream, [[entry_id, entry_pairs(fields)] for entry_id, fields in entries]]
        for stream, entries in streams
    ]


def xautoclaim_pairs(response: Any, **options: Any) -> Any:
    """XAUTOCLAIM's reply: next id, the claimed entries with their fields as pairs, and
    (Redis 7) the ids of pending entries that had been deleted, which Redis drops from the
    group as it reports them."""
    deleted = list(response[2]) if len(response) > 2 else []
    return [response[0], [[entry_id, entry_pairs(fields)] for entry_id, fields in response[1]], deleted]


def _batch_items(entry_id: str, batch: bytes, contents: EntryContents) -> None:
    try:
        items = [bytes(item) for item in _BATCH_DECODER.decode(batch)]
    except Exception:
        # Not a JSON array as a whole (an item nested too deep, bytes that are not UTF-8,
        # not an array at all): split it at its top-level commas, so the good items of a
        # batch are stored whatever one of them holds.
        split = batch_split(batch)
        if split is None:
            contents.refuse(
                entry_id,
                batch,
                f"Field 'b' must hold a JSON array of envelopes: {ENTRY_FORMAT}",
                "invalid_batch",
            )
            return
        items = split
    contents.bodies.extend((f"{entry_id}#{index}", item) for index, item in enumerate(items))


_BATCH_DECODER = msgspec.json.Decoder(list[msgspec.Raw])
_JSON_TOKENS = re.compile(rb'["\\\[\]{},]')


def batch_split(batch: bytes) -> list[bytes] | None:
    """The items of a JSON array as bytes, found without parsing them (no recursion, so
    any depth); ``None`` when ``batch`` is not an array. Items are not checked here."""
    text = batch.strip()
    if not (text.startswith(b"[") and text.endswith(b"]")):
        return None
    items: list[bytes] = []
    depth, in_string, escaped_at, start = 0, False, -1, 1
    for match in _JSON_TOKENS.finditer(text):
        position, token = match.start(), match.group()
        if in_string:
            if position == escaped_at:
                continue
            if token == b"\\":
                escaped_at = position + 1
            elif token == b'"':
                in_string = False
        elif token == b'"':
            in_string = True
        elif token in (b"[", b"{"):
            depth += 1
        elif token in (b"]", b"}"):
            depth -= 1
            if depth == 0 and position == len(text) - 1:
                break
            if depth <= 0:
                return None
        elif depth == 1:  # a comma between two items
            items.append(text[start:position].strip())
            start = position + 1
    else:
        return None
    last = text[start:-1].strip()
    if last or items:
        items.append(last)
    return items
