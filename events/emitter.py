"""The worker-side emitter: one method per event type, as mlx-serving's EngineEventEmitter.

Each method builds the envelope, validates it on the hot path (raising the
SPEC 3.3 error object, ``ValidationFailed``, on bad input) and hands it to a
publisher. No Django, no database: this runs inside workers.
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import redis
from msgspec import UNSET

from events.schemas import Envelope, envelope_encode, envelope_validate
from events.stream import stream_append
from mlxserve.validation import Issue, ValidationFailed

logger = logging.getLogger(__name__)


class EventPublisher(Protocol):
    def publish(self, envelope: Envelope, body: bytes) -> None:
        """Take ``envelope`` (validated), whose JSON encoding is ``body``."""


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


class CollectingPublisher:
    """Keeps envelopes in a list: for callers that publish them later themselves."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    def publish(self, envelope: Envelope, body: bytes) -> None:
        self.envelopes.append(envelope)


def _given(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not UNSET}


class EngineEventEmitter:
    """``on_refused`` is told of every event this emitter refuses (a worker counts them):
    a refusal is also logged, so a worker whose clock is off says so in its log."""

    def __init__(
        self,
        *,
        source: str,
        publisher: EventPublisher,
        on_refused: Callable[[ValidationFailed], None] | None = None,
    ) -> None:
        self.source = source
        self.publisher = publisher
        self.on_refused = on_refused
        # Random UUIDs (version 4) from a CSPRNG-seeded generator: no system call
        # per token, and ids stay unique across processes and hosts.
        self._random = random.Random(os.urandom(32))

    def _new_id(self) -> uuid.UUID:
        return uuid.UUID(int=self._random.getrandbits(128), version=4)

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
            logger.error("%s event refused: %s", event_type, exc.message)
            if self.on_refused is not None:
                self.on_refused(exc)
            raise
        self.publisher.publish(envelope, body)
        return envelope

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
        return self.emit(
            "tokenGenerated",
            _given(model=model, token=token, logprob=logprob, metadata=metadata),
            generation_id=generation_id,
            seq=seq,
        )

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
