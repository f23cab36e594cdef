from __future__ import annotations

from typing import Any

from celery import shared_task

from mlxserve.contract.events import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from mlxserve.contract.validation import EngineError
from mlxserve.engine.engine import GenerationRequest
from mlxserve.worker import worker_runtime

ATTEMPTS_TTL_SECONDS = 7 * 24 * 3600


@shared_task(name="mlxserve.generation_run", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def generation_run(
    *,
    generation_id: str,
    model: str,
    model_path: str | None,
    prompt: Any,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
    seed: int | None = None,
) -> dict[str, Any]:
    """Run one generation attempt on this worker. A redelivery (its worker died) is a new attempt."""
    runtime = worker_runtime()
    key = f"mlxserve:generation:{generation_id}:attempts"
    attempt = int(runtime.client.incr(key))  # type: ignore[arg-type]
    runtime.client.expire(key, ATTEMPTS_TTL_SECONDS)
    request = GenerationRequest(
        generation_id=generation_id,
        model=model,
        model_path=model_path,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        attempt=attempt,
    )
    try:
        result = runtime.engine.generate(request)
    except EngineError as exc:
        # Already told through an ``error`` event; a failed generation is not retried.
        return {"generationId": generation_id, "state": "failed", "code": exc.code, "attempt": attempt}
    return {"generationId": generation_id, "state": "completed", "tokens": result.tokens, "attempt": attempt}
