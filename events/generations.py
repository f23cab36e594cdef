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
from events.signing import task_sign
from events.storage import storable_body
from mlxserve.contract.events import (
    GenerationOrder,
)
from mlxserve.contract.validation import Issue, ValidationFailed, validate

logger = logging.getLogger(__name__)


def registered_model(model: str, *, may_register: bool = False) -> RegisteredModel:
    """The registry entry a request names: by its name, or by its path (a directory or a cached
    repo id, as staff registered it). An operator cannot make a worker load whatever directory its
    host holds: nothing else is generated for them. Those who may register models (staff, and the
    ``generate`` command on the control plane) may also name a directory or a cached repo id
    directly, as if registered under that name (kept unsaved; the worker checks it as any other)."""
    found = (
        RegisteredModel.objects.filter(name=model).first()
        or RegisteredModel.objects.filter(path=model).first()
    )
    if found is None and may_register:
        return RegisteredModel(name=model, path="")
    if found is None:
        shown = model[:200]
        raise ValidationFailed(
            [
                Issue(
                    ["model"],
                    f"Unknown model '{shown}': only registered models are generated for operators (staff "
                    "register them in the admin, Registered models, or with manage.py register_model)",
                    "unknown_model",
                )
            ]
        )
    return found


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
    # The command line (no user) runs on the control plane, where registering is at hand anyway.
    may_register = user is None or bool(getattr(user, "is_staff", False))
    registered = registered_model(order.model, may_register=may_register)
    generation = Generation.objects.create(
        id=uuid.uuid4(),
        model=registered.name,
        model_path=registered.path,
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
            kwargs=task_sign(
                {
                    "generation_id": str(generation.id),
                    "model": registered.name,
                    "model_path": registered.path or None,
                    "prompt": order.prompt,
                    "max_tokens": order.max_tokens,
                    "temperature": order.temperature,
                    "top_p": order.top_p,
                    "seed": order.seed,
                }
            ),
            retry=False,
        )
    except Exception:
        generation.delete()
        raise
    return generation
