"""A batch of stream entries as read, before anything is stored: each body decoded to a typed
envelope (or a dead letter with its reason), prompts kept as the prompt policy keeps them, one
envelope an id. Nothing here touches the database: what goes wrong here is the entries', never
the database's, and a batch decoded once is stored as many times as a conflict makes it tried.

(Decoding the next batch on a thread while one is stored was tried: under the GIL the thread's
decoding slowed the store's own Python by as much as it saved, 6.03 s against 6.19 s a 300,000
events; docs/figures.md.)
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from django.utils import timezone

from events.models import DeadLetter, PromptPolicy
from events.privacy import prompt_redact
from mlxserve.contract.events import (
    TIMESTAMP_FUTURE_MESSAGE,
    TIMESTAMP_MAX_AHEAD_MS,
    Envelope,
    GenerationStartedEnvelope,
    envelope_decode,
)
from mlxserve.contract.validation import Issue, ValidationFailed, error_object, json_parse


@dataclass
class DecodedBatch:
    """What ``events_decode`` made of a batch: the envelopes to store (the first of each id, with
    the entry and body it came in), the dead letters so far, and the moment it was read (each
    row's ``ingested_at``)."""

    pending: list[tuple[Envelope, str, bytes]]
    dead: list[DeadLetter]
    entries: int  # bodies read
    refused: int  # dead letters of what the entries held besides envelopes
    now: datetime
    policy: PromptPolicy


def events_decode(
    entries: Sequence[tuple[str, bytes]],
    *,
    refused: Sequence[tuple[str, bytes, dict[str, Any]]] = (),
    policy: PromptPolicy,
) -> DecodedBatch:
    """Stream entries ``(entry_id, body)`` decoded: valid envelopes to store, invalid ones (and
    ``refused`` items, what an entry held besides envelopes) as dead letters with their error."""
    now = timezone.now()
    now_ms = int(now.timestamp() * 1000)
    pending: dict[int, tuple[Envelope, str, bytes]] = {}  # by id (its integer: hashed in C)
    dead: list[DeadLetter] = [dead_letter(label, body, error, policy) for label, body, error in refused]
    # Decoded against the latest "now" an entry can have (this host's clock plus ten minutes); only
    # an event past this host's own rule is checked again against when Redis received its entry.
    latest = now_ms + TIMESTAMP_MAX_AHEAD_MS
    for entry_id, body in entries:
        try:
            envelope = envelope_decode(storable_body(body), now_ms=latest)
            if envelope.timestamp > now_ms + TIMESTAMP_MAX_AHEAD_MS and envelope.timestamp > (
                receiving_clock_ms(entry_id, now_ms) + TIMESTAMP_MAX_AHEAD_MS
            ):
                raise ValidationFailed([Issue(["timestamp"], TIMESTAMP_FUTURE_MESSAGE, "in_future")])
        except ValidationFailed as exc:
            dead.append(dead_letter(entry_id, body, exc.as_error(), policy))
            continue
        host = entry_id.partition("/")[0] if "/" in entry_id else None
        if host is not None and not (envelope.source == host or envelope.source.startswith(host + "/")):
            # On a host's own stream only that host's events: its credentials cannot speak for another.
            message = (
                f"Events on worker host '{host}''s stream must have source '{host}' or '{host}/...'; "
                f"this one's is '{envelope.source[:200]}'"
            )
            dead.append(
                dead_letter(entry_id, body, error_object("Forbidden", message, "foreign_source"), policy)
            )
            continue
        if isinstance(envelope, GenerationStartedEnvelope):
            envelope = _prompt_redacted(envelope, policy)
        pending.setdefault(envelope.id.int, (envelope, entry_id, body))
    return DecodedBatch(list(pending.values()), dead, len(entries), len(refused), now, policy)


def receiving_clock_ms(entry_id: str, now_ms: int) -> int:
    """What "now" is for an entry's "not in the future" check: when Redis received it (its id's
    time, the clock the API checked against), or this host's clock if later. An entry id set by
    hand in the future counts as at most ten minutes ahead of this host's clock."""
    received = entry_id.rpartition("/")[2].split("-", 1)[0]
    if not (received.isascii() and received.isdigit() and len(received) <= 19):
        return now_ms
    return max(now_ms, min(int(received), now_ms + TIMESTAMP_MAX_AHEAD_MS))


# PostgreSQL cannot hold U+0000 in text or jsonb. An escaped NUL in the JSON
# (never a raw one: JSON forbids it) is stored as U+FFFD, on SQLite too, so
# both databases keep the same thing. An escaped backslash before "u0000"
# is literal text and is left alone.
_ESCAPED_NUL = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")


def _prompt_redacted(envelope: GenerationStartedEnvelope, policy: PromptPolicy) -> GenerationStartedEnvelope:
    if policy.mode == PromptPolicy.KEEP:
        return envelope
    payload = msgspec.structs.replace(envelope.payload, prompt=prompt_redact(envelope.payload.prompt, policy))
    return msgspec.structs.replace(envelope, payload=payload)


def storable_body(body: bytes) -> bytes:
    if b"\\u0000" not in body:
        return body
    return _ESCAPED_NUL.sub(rb"\1\\ufffd", body)


def dead_letter(entry_id: str, body: bytes, error: dict[str, Any], policy: PromptPolicy) -> DeadLetter:
    event_id = dead_letter_event_id(body)
    body = prompts_redacted_in(body, policy)
    text = body.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    # The error quotes what was sent (an unknown field's name, the database's message):
    # stored as the body is, with NUL (which PostgreSQL cannot hold) made U+FFFD.
    storable_error = msgspec.json.decode(storable_body(msgspec.json.encode(error)))
    return DeadLetter(stream_id=entry_id, event_id=event_id, body=text, error=storable_error)


def prompts_redacted_in(body: bytes, policy: PromptPolicy) -> bytes:
    """A dead letter's body with its prompts kept as the prompt policy keeps stored ones.

    Whatever else is wrong with it, the value of every ``prompt`` key in the JSON is redacted
    (a string or an object, as in a stored event; anything else under that name is dropped).
    A body that cannot be read as JSON but mentions a prompt is not kept at all: only its
    length and a keyed hash, so it still tells one letter from another.
    """
    if policy.mode == PromptPolicy.KEEP or b"prompt" not in body:
        return body
    try:
        return msgspec.json.encode(_prompts_redacted(json_parse(storable_body(body)), policy))
    except (ValidationFailed, RecursionError):
        withheld = prompt_redact(body.decode("utf-8", errors="replace"), _HASHING)
        return msgspec.json.encode(
            {"withheld": f"not JSON, {len(body)} bytes, a prompt perhaps among them", "hash": withheld}
        )


_HASHING = PromptPolicy(mode=PromptPolicy.HASH)


def _prompts_redacted(value: Any, policy: PromptPolicy) -> Any:
    if isinstance(value, dict):
        return {
            key: (
                prompt_redact(item if isinstance(item, str | dict) else "", policy)
                if key == "prompt"
                else _prompts_redacted(item, policy)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_prompts_redacted(item, policy) for item in value]
    return value


class _EnvelopeId(msgspec.Struct):
    id: uuid.UUID | None = None


def dead_letter_event_id(body: bytes) -> uuid.UUID | None:
    """The id of the envelope in ``body`` if one can be read, whatever else is wrong with it."""
    try:
        return msgspec.json.decode(body, type=_EnvelopeId).id
    except Exception:
        return None
