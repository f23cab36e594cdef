"""The worker-side emitter: one method per event type, as mlx-serving's EngineEventEmitter.

Each method builds the envelope, validates it on the hot path (raising the
error object, ``ValidationFailed``, on bad input) and hands it to a
publisher. No Django, no database: this runs inside workers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import isfinite
from typing import Any, Protocol

import msgspec
import redis
from msgspec import UNSET

from mlxserve.bus import stream_append
from mlxserve.contract.events import (
    EVENT_TYPES,
    Envelope,
    TokenGenerated,
    TokenGeneratedEnvelope,
    envelope_decode,
    envelope_encode,
    envelope_validate,
    token_envelopes_decode,
    token_rules,
)
from mlxserve.contract.validation import Issue, ValidationFailed

logger = logging.getLogger(__name__)


class EventPublisher(Protocol):
    """Takes validated events as JSON (the emitter encoded them already): one, or a batch."""

    def publish(self, envelope: Envelope, body: bytes) -> None:
        """Take ``envelope`` (validated), whose JSON encoding is ``body``."""

    def publish_many(self, bodies: Sequence[bytes]) -> None:
        """Take a batch of checked events' JSON, in order (a generation's tokens)."""


class RedisStreamPublisher:
    """Appends each event to the stream as it comes (one round trip each).

    Simple and synchronous: fine for the API and tests. Workers use a
    batching, buffering publisher so generation never waits on Redis.
    """

    def __init__(self, client: redis.Redis, stream: str) -> None:
        self.client = client
        self.stream = stream

    def publish(self, envelope: Envelope, body: bytes) -> None:
        stream_append(self.client, self.stream, [body])

    def publish_many(self, bodies: Sequence[bytes]) -> None:
        stream_append(self.client, self.stream, bodies)  # one round trip


def _random_uuids() -> Callable[[], uuid.UUID]:
    """Random (version 4) UUIDs straight from the operating system's CSPRNG.

    Event ids are idempotency keys: an id that could be predicted from earlier ones
    (a seeded PRNG's can, after a few hundred) would let anyone who reads the stream
    store a fake event under the id of a real one to come, which is then dropped as
    a duplicate. ``os.urandom`` is read 4 KiB at a time (one system call per 256 ids)
    and the UUID is built as ``UUID.__init__`` builds it, minus its argument checks:
    cheaper than the seeded generator it replaces (bench/validation.py). Thread-safe;
    a forked child starts from a fresh pool, never its parent's.
    """
    pool_size = 4096
    lock = threading.Lock()
    pool, at = b"", pool_size  # the bytes, and where the next id starts in them
    clear, version_4 = ~((0xF000 << 64) | (0xC000 << 48)), (4 << 76) | (0x8000 << 48)
    urandom, from_bytes, new, set_slot = os.urandom, int.from_bytes, object.__new__, object.__setattr__
    UUID, unknown = uuid.UUID, uuid.SafeUUID.unknown

    def random_uuid() -> uuid.UUID:
        nonlocal pool, at
        with lock:
            if at >= pool_size:
                pool, at = urandom(pool_size), 0
            n = from_bytes(pool[at : at + 16])
            at += 16
        made = new(UUID)
        set_slot(made, "int", (n & clear) | version_4)
        set_slot(made, "is_safe", unknown)
        return made

    def after_fork() -> None:
        nonlocal pool, at
        pool, at = b"", pool_size

    os.register_at_fork(after_in_child=after_fork)
    return random_uuid


random_uuid = _random_uuids()


_encode = msgspec.json.Encoder().encode
_TOKEN_RULES = token_rules()
# A batch of token events decoded in one C call; the same declaration envelope_decode uses.
# The hex digit of a UUID's variant nibble (10xx) for each random one.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def random_uuid_strings(count: int) -> list[str]:
    """``count`` random (version 4) UUIDs as their canonical text, from one read of the
    operating system's CSPRNG: what a batch of events needs for ids, without making a UUID
    object each (the encoder would turn them into this text)."""
    digits = os.urandom(16 * count).hex()
    return [
        f"{digits[i : i + 8]}-{digits[i + 8 : i + 12]}-4{digits[i + 13 : i + 16]}-"
        f"{_VARIANT[digits[i + 16]]}{digits[i + 17 : i + 20]}-{digits[i + 20 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]


def _given(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not UNSET}


Listener = Callable[[Envelope], None]
ANY_TYPE = "*"


TypedBatch = Callable[[], list[Envelope]]


@dataclass(frozen=True)
class _Subscriber:
    """Who hears events, as the emitter delivers them: one event with its JSON, or a batch of
    JSON (a generation's tokens) with a way to the typed envelopes, made once for all who need
    them. Every event leaves the emitter through ``deliver`` or ``deliver_many``."""

    listener: Listener | None = None
    publisher: EventPublisher | None = None

    def deliver(self, envelope: Envelope, body: bytes) -> None:
        if self.publisher is not None:
            self.publisher.publish(envelope, body)
        else:
            self.listener(envelope)  # type: ignore[misc]

    def deliver_many(self, bodies: Sequence[bytes], typed: TypedBatch) -> None:
        if self.publisher is not None:
            self.publisher.publish_many(bodies)  # the JSON alone: no envelope made for it
        else:
            for envelope in typed():
                try:  # a listener that fails on one event still hears the others
                    self.listener(envelope)  # type: ignore[misc]
                except Exception:
                    logger.exception("A listener of %s events failed", envelope.type)


class EngineEventEmitter:
    """Builds, validates and hands out lifecycle events: one method per event type (as
    mlx-serving's emitter) and a generic ``emit``.

    A valid event goes to every listener of its type and of ``"*"``, in the order they were
    added; a ``publisher`` given here (the worker's stream publisher) is the first ``"*"``
    listener, and gets the event's JSON with it. An invalid one is logged (``Invalid <type>
    payload: ...``) and raised as ``ValidationFailed`` (an ``EngineError``, code
    ``InvalidParams``); it reaches no listener. A listener that raises is logged and the
    others still run.
    ``on_refused`` is told of every refusal (a worker counts them).
    """

    def __init__(
        self,
        *,
        source: str,
        publisher: EventPublisher | None = None,
        on_refused: Callable[[ValidationFailed], None] | None = None,
    ) -> None:
        self.source = source
        self.publisher = publisher
        self.on_refused = on_refused
        self._listeners: dict[str, list[_Subscriber]] = {}
        # Who hears each type, "*" included, worked out when listeners change, not per event.
        self._routes: dict[str, tuple[_Subscriber, ...]] = {}
        if publisher is not None:
            self._listeners[ANY_TYPE] = [_Subscriber(publisher=publisher)]
            self._route()

    def on(self, event_type: str, listener: Listener) -> None:
        """Call ``listener(envelope)`` with every valid event of ``event_type`` (``"*"``: all)."""
        if event_type != ANY_TYPE and event_type not in EVENT_TYPES:
            raise ValueError(f"No event type {event_type!r}: one of {', '.join(EVENT_TYPES)}, or '*'")
        self._listeners.setdefault(event_type, []).append(_Subscriber(listener=listener))
        self._route()

    def off(self, event_type: str, listener: Listener) -> None:
        """Stop calling ``listener`` for ``event_type`` (nothing if it was not listening)."""
        listeners = self._listeners.get(event_type, [])
        if (subscriber := _Subscriber(listener=listener)) in listeners:
            listeners.remove(subscriber)
            self._route()

    def _route(self) -> None:
        every = self._listeners.get(ANY_TYPE, [])
        self._routes = {t: (*self._listeners.get(t, ()), *every) for t in EVENT_TYPES}

    def _new_id(self) -> uuid.UUID:
        return random_uuid()

    def emit(
        self,
        event_type: str,
        payload: dict[str, Any],
        *,
        generation_id: uuid.UUID | str | None = None,
        seq: int = 0,
    ) -> Envelope:
        now_ms = time.time_ns() // 1_000_000
        try:
            envelope = envelope_validate(
                {
                    "id": self._new_id(),
                    "type": event_type,
                    "timestamp": now_ms,
                    "source": self.source,
                    "generationId": generation_id,
                    "seq": seq,
                    "payload": payload,
                },
                now_ms=now_ms,
            )
            # Encode here, not in the publisher's thread: a string that cannot be
            # UTF-8 (a lone surrogate) is refused to the caller like any bad input.
            try:
                body = envelope_encode(envelope)
            except UnicodeEncodeError:
                raise ValidationFailed(
                    [
                        Issue(
                            [], "Strings must be valid Unicode (a lone surrogate was found)", "invalid_string"
                        )
                    ]
                ) from None
        except ValidationFailed as exc:
            logger.error(
                "Invalid %s payload: %s (issues: %s)",
                event_type,
                exc.message,
                "; ".join(f"{'.'.join(map(str, i.path)) or 'root'}: {i.message}" for i in exc.issues),
            )
            if self.on_refused is not None:
                self.on_refused(exc)
            raise
        listeners = self._routes.get(event_type)
        if listeners:
            self._deliver(event_type, listeners, envelope, body)
        return envelope

    @staticmethod
    def _deliver(
        event_type: str, listeners: tuple[_Subscriber, ...], envelope: Envelope, body: bytes
    ) -> None:
        for listener in listeners:
            try:
                listener.deliver(envelope, body)
            except Exception:
                logger.exception("A listener of %s events failed", event_type)

    def model_loaded(
        self,
        *,
        model: str,
        model_path: str,
        quantization: Any = UNSET,
        parameters: Any = UNSET,
        metadata: Any = UNSET,
    ) -> Envelope:
        return self.emit(
            "modelLoaded",
            _given(
                model=model,
                modelPath=model_path,
                quantization=quantization,
                parameters=parameters,
                metadata=metadata,
            ),
        )

    def model_unloaded(self, *, model: str, reason: Any = UNSET) -> Envelope:
        return self.emit("modelUnloaded", _given(model=model, reason=reason))

    def model_invalidated(self, *, model: str, reason: str) -> Envelope:
        return self.emit("modelInvalidated", {"model": model, "reason": reason})

    def generation_started(
        self,
        *,
        generation_id: uuid.UUID | str,
        model: str,
        prompt: Any,
        max_tokens: Any = UNSET,
        metadata: Any = UNSET,
        seq: int = 0,
    ) -> Envelope:
        return self.emit(
            "generationStarted",
            _given(model=model, prompt=prompt, maxTokens=max_tokens, metadata=metadata),
            generation_id=generation_id,
            seq=seq,
        )

    def token_generated(
        self,
        *,
        generation_id: uuid.UUID | str,
        seq: int,
        model: str,
        token: str,
        logprob: Any = UNSET,
        metadata: Any = UNSET,
    ) -> Envelope:
        if metadata is UNSET and ((type(logprob) is float and isfinite(logprob)) or logprob is UNSET):
            # Once per token, so the common case takes the short way: the structs built as
            # they are, encoded, and the JSON decoded back by the contract's typed decoder,
            # which checks every rule the generic path does (C code, no dict, no convert).
            now_ms = time.time_ns() // 1_000_000
            try:
                body = envelope_encode(
                    TokenGeneratedEnvelope(
                        id=self._new_id(),
                        timestamp=now_ms,
                        source=self.source,
                        generation_id=generation_id,  # type: ignore[arg-type] # a str is checked by the decode
                        seq=seq,
                        payload=TokenGenerated(model=model, token=token, logprob=logprob),
                    )
                )
                envelope = envelope_decode(body, now_ms=now_ms)
            except (ValidationFailed, TypeError, ValueError):
                pass  # the generic path says what is wrong, as it does for any event
            else:
                listeners = self._routes.get("tokenGenerated")
                if listeners:
                    self._deliver("tokenGenerated", listeners, envelope, body)
                return envelope
        return self.emit(
            "tokenGenerated",
            _given(model=model, token=token, logprob=logprob, metadata=metadata),
            generation_id=generation_id,
            seq=seq,
        )

    def tokens_generated(
        self,
        *,
        generation_id: uuid.UUID | str,
        model: str,
        tokens: Sequence[tuple[int, int, str, float]],
    ) -> None:
        """Many ``tokenGenerated`` events of one generation at once: ``(seq, timestamp_ms, token,
        logprob)`` each, as the engine records them. Each event is encoded; the first is decoded
        by the contract's decoder (the checks of everything the batch shares), all are checked
        by the contract's per-token rules (``token_rules``), which say what the decoder would;
        without them, every event is decoded. A batch that does not pass goes through
        ``token_generated`` token by token: those before the bad one are delivered, the bad one
        is refused as any event is (logged, ``on_refused``, ``ValidationFailed`` raised). Typed
        envelopes are made (one decode of the batch) only for listeners that take them: a
        publisher takes the JSON alone (``publish_many``)."""
        if not tokens:
            return
        source, ids, gid = self.source, random_uuid_strings(len(tokens)), str(generation_id)
        now_ms = time.time_ns() // 1_000_000
        typed: list[Envelope] | None = None
        try:
            bodies = [
                _encode(
                    TokenGeneratedEnvelope(
                        id=event_id,  # type: ignore[arg-type] # its text: what the encoder makes of a UUID
                        timestamp=timestamp_ms,
                        source=source,
                        generation_id=gid,  # type: ignore[arg-type] # checked by the first event's decode
                        seq=seq,
                        payload=TokenGenerated(model=model, token=token, logprob=logprob),
                    )
                )
                for event_id, (seq, timestamp_ms, token, logprob) in zip(ids, tokens, strict=True)
            ]
            envelope_decode(bodies[0], now_ms=now_ms)
            if _TOKEN_RULES is not None:
                seqs, timestamps, texts, logprobs = zip(*tokens, strict=True)
                passed = _TOKEN_RULES.passes(seqs, timestamps, texts, logprobs, now_ms)
            else:
                typed = token_envelopes_decode(bodies, now_ms=now_ms)
                passed = True
        except (ValidationFailed, msgspec.ValidationError, TypeError, ValueError):
            passed = False  # a string that cannot be UTF-8 is a ValueError of the encoder
        if not passed:
            for seq, _, token, logprob in tokens:
                self.token_generated(
                    generation_id=generation_id, seq=seq, model=model, token=token, logprob=logprob
                )
            return
        made = typed

        def envelopes() -> list[Envelope]:  # made once, for the listeners that take envelopes
            nonlocal made
            if made is None:
                made = token_envelopes_decode(bodies, now_ms=now_ms)
            return made

        for listener in self._routes.get("tokenGenerated") or ():
            try:
                listener.deliver_many(bodies, envelopes)
            except Exception:
                logger.exception("A listener of tokenGenerated events failed")

    def generation_completed(
        self,
        *,
        generation_id: uuid.UUID | str,
        seq: int,
        model: str,
        tokens_generated: int,
        duration_ms: float,
        throughput: Any = UNSET,
        metadata: Any = UNSET,
    ) -> Envelope:
        return self.emit(
            "generationCompleted",
            _given(
                model=model,
                tokensGenerated=tokens_generated,
                durationMs=duration_ms,
                throughput=throughput,
                metadata=metadata,
            ),
            generation_id=generation_id,
            seq=seq,
        )

    def error(
        self,
        *,
        error: str,
        code: Any = UNSET,
        model: Any = UNSET,
        metadata: Any = UNSET,
        generation_id: uuid.UUID | str | None = None,
        seq: int = 0,
    ) -> Envelope:
        return self.emit(
            "error",
            _given(error=error, code=code, model=model, metadata=metadata),
            generation_id=generation_id,
            seq=seq,
        )

    def runtime_status(
        self,
        *,
        status: str,
        models_loaded: int,
        active_tasks: Any = UNSET,
        metadata: Any = UNSET,
    ) -> Envelope:
        return self.emit(
            "runtimeStatus",
            _given(status=status, modelsLoaded=models_loaded, activeTasks=active_tasks, metadata=metadata),
        )
