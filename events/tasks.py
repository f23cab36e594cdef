"""The Celery task: the only bridge from Django to the engine.

A worker trusts nothing its queue holds: Celery's queue is written by anyone with the broker's
credentials, every worker host included. Arguments are decoded by a strict declaration before
anything runs; a task that cannot run ends its generation ``failed`` with an ``error`` event (when
a generation id can be read at all), and a generation whose attempts keep dying with their worker
is not handed on without end (``MLXSERVE_MAX_ATTEMPTS``).
"""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any

import msgspec
from celery import shared_task
from django.conf import settings

from events.signing import task_signature_refusal
from mlxserve.contract.generations import GenerationFields, generation_fields
from mlxserve.contract.serving import EpochMs, QueueTimeoutMs, StopSequences, TopLogprobs
from mlxserve.contract.validation import EngineError
from mlxserve.engine.engine import GenerationRequest
from mlxserve.engine.reply import GenerationReply
from mlxserve.host.worker import worker_runtime

logger = logging.getLogger(__name__)

ATTEMPTS_TTL_SECONDS = 7 * 24 * 3600


class GenerationTask(GenerationFields, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The task's keyword arguments, as ``events.generations.generation_submit`` sends them: the
    request's fields (declared once, in the contract), snake_case, with the generation's id."""

    generation_id: uuid.UUID
    model_path: Annotated[str, msgspec.Meta(max_length=1000)] | None = None
    # Serving (the /v1/ endpoints): cut at these, answer on the reply channel, drop if taken late.
    stop: StopSequences = []
    logprobs: bool = False
    top_logprobs: TopLogprobs = 0
    reply: bool = False
    queued_at_ms: EpochMs | None = None  # Redis's clock when queued
    queue_timeout_ms: QueueTimeoutMs | None = None
    signature: str | None = None  # events.signing


@shared_task(name="mlxserve.generation_run", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def generation_run(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run one generation attempt on this worker. A redelivery (its worker died) is a new attempt."""
    runtime = worker_runtime()
    if (refusal := task_signature_refusal(kwargs)) is not None:
        # Not the control plane's: nothing is run and nothing is said for the generation it names
        # (a forged task must not fail someone else's generation either). Logged and counted.
        logger.error(
            "Generation task refused: %s (it names generation %r)", refusal, kwargs.get("generation_id")
        )
        runtime.metrics.series(runtime.metrics.errors, code="UnsignedTask").inc()
        return {"generationId": None, "state": "refused", "code": "UnsignedTask"}
    try:
        if args:
            raise msgspec.ValidationError("Positional arguments are not accepted")
        task = msgspec.convert(kwargs, GenerationTask, strict=True)
    except msgspec.ValidationError as exc:
        return _refused(runtime, kwargs, f"Invalid generation task: {exc}")
    generation_id = str(task.generation_id)
    # Two counts: the generation's attempts across the fleet (the number events carry), and this
    # host's own, which bounds the retries. A worker host may add to the first (the Celery rights
    # workers share), never to another host's own count: so it can make another's attempt numbers
    # odd, not end its generation.
    key = f"mlxserve:generation:{generation_id}:attempts"
    own_key = f"{key}:{runtime.settings.source.split('/', 1)[0]}"
    pipe = runtime.client.pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, ATTEMPTS_TTL_SECONDS)
    pipe.incr(own_key)
    pipe.expire(own_key, ATTEMPTS_TTL_SECONDS)
    attempt, _, own_attempts, _ = pipe.execute()
    attempt, own_attempts = int(attempt), int(own_attempts)
    if own_attempts > settings.MAX_ATTEMPTS:
        message = (
            f"Not run again: attempt {own_attempts} on this host of a generation whose earlier attempts "
            f"never finished (their worker died each time; at most {settings.MAX_ATTEMPTS} attempts a host)"
        )
        return _refused(runtime, kwargs, message, code="TooManyAttempts", attempt=attempt)
    request = GenerationRequest(
        **generation_fields(task),
        generation_id=generation_id,
        model_path=task.model_path,
        attempt=attempt,
        stop=tuple(task.stop),
    )
    if task.queued_at_ms is not None and task.queue_timeout_ms is not None:
        seconds, micros = runtime.client.time()
        if seconds * 1000 + micros // 1000 > task.queued_at_ms + task.queue_timeout_ms:
            runtime.engine.dropped(request, "queue-timeout")
            return {"generationId": generation_id, "state": "dropped", "attempt": attempt}
    reply = None
    if task.reply:
        reply = GenerationReply(
            runtime.client,
            generation_id,
            worker=runtime.settings.source,
            stop=task.stop,
            logprobs=task.logprobs,
            top_logprobs=task.top_logprobs,
        )
        if not reply.start():
            runtime.engine.dropped(request, "client-gone")
            return {"generationId": generation_id, "state": "dropped", "attempt": attempt}
    try:
        result = runtime.engine.generate(request, reply=reply)
    except EngineError as exc:
        # Already told through an ``error`` event; a failed generation is not retried.
        return {"generationId": generation_id, "state": "failed", "code": exc.code, "attempt": attempt}
    return {"generationId": generation_id, "state": "completed", "tokens": result.tokens, "attempt": attempt}


def _refused(
    runtime: Any,
    kwargs: dict[str, Any],
    message: str,
    *,
    code: str = "InvalidTask",
    attempt: int | None = None,
) -> dict[str, Any]:
    """End the generation ``failed`` with an ``error`` event (when its id can be read), counted and
    logged, instead of raising before the engine (the generation stayed ``queued`` for ever)."""
    generation_id = _readable_id(kwargs.get("generation_id"))
    model = kwargs.get("model")
    logger.error("Generation task refused (%s, generation %s): %s", code, generation_id, message)
    runtime.metrics.series(runtime.metrics.errors, code=code).inc()
    runtime.emitter.error(
        error=message[:2000],
        code=code,
        model=model[:1000] if isinstance(model, str) and model else msgspec.UNSET,
        generation_id=generation_id,
        seq=0,
        metadata={"attempt": attempt} if attempt is not None else msgspec.UNSET,
    )
    return {"generationId": generation_id, "state": "failed", "code": code}


def _readable_id(value: Any) -> str | None:
    try:
        return str(uuid.UUID(str(value)))
    except (ValueError, TypeError, AttributeError):
        return None
