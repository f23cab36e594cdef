"""Generation requests: validated, recorded, queued for a worker."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import msgspec

from events.models import (
    Generation,
    RegisteredModel,
)
from events.privacy import prompt_policy_get, prompt_redact
from events.storage import storable_body
from mlxserve.contract.events import (
    GenerationOrder,
)
from mlxserve.contract.validation import Issue, ValidationFailed, validate

logger = logging.getLogger(__name__)


def generation_queue(*, data: Any, user: Any = None) -> Generation:
    """Validate a generation request, record it and queue it for a worker.

    ``model`` may name a registry entry; the worker gets the path it stands for.
    Raises ``ValidationFailed``, or ``kombu``/``redis`` errors if the broker is down
    (then nothing is recorded).
    """
    from events.tasks import generation_run

    order = validate(data, GenerationOrder)
    if "\x00" in order.model:
        raise ValidationFailed([Issue(["model"], "Cannot contain NUL characters", "invalid")])
    registered = RegisteredModel.objects.filter(name=order.model).first()
    generation = Generation.objects.create(
        id=uuid.uuid4(),
        model=order.model,
        model_path=registered.path if registered else "",
        # Stored as the events are: an escaped NUL (PostgreSQL cannot hold one) becomes U+FFFD.
        prompt=msgspec.json.decode(
            storable_body(msgspec.json.encode(prompt_redact(order.prompt, prompt_policy_get())))
        ),
        max_tokens=order.max_tokens,
        options={"temperature": order.temperature, "topP": order.top_p, "seed": order.seed},
        requested_by=user if user is not None and user.is_authenticated else None,
    )
    try:
        generation_run.apply_async(
            kwargs={
                "generation_id": str(generation.id),
                "model": order.model,
                "model_path": registered.path if registered else None,
                "prompt": order.prompt,
                "max_tokens": order.max_tokens,
                "temperature": order.temperature,
                "top_p": order.top_p,
                "seed": order.seed,
            },
            retry=False,
        )
    except Exception:
        generation.delete()
        raise
    return generation
