"""Generation requests: validated, recorded, queued for a worker."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import msgspec
from django.conf import settings
from kombu import Exchange, Queue

from events.decoding import storable_body
from events.models import (
    Generation,
    RegisteredModel,
)
from events.privacy import prompt_policy_get, prompt_redact
from events.signing import task_sign
from mlxserve.contract.generations import GenerationFields, GenerationOrder, generation_fields
from mlxserve.contract.serving import model_queue, serving_key
from mlxserve.contract.validation import Issue, ValidationFailed, validate
from mlxserve.redis_conn import redis_client, redis_clock

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


class ModelNotServed(Exception):
    """No live worker serves the model: a request for it is refused at once, never queued."""

    def __init__(self, model: str) -> None:
        super().__init__(
            f"No live worker serves model '{model[:200]}' (a worker declares its models with "
            "MLXSERVE_WORKER_MODELS)"
        )


def generation_route(model: str) -> str | None:
    """The Celery queue of a task for ``model``: its own queue when a live worker declared it, else
    the default queue (``None``) when a live worker takes every model. Raises ``ModelNotServed``.
    Claims are read by Redis's clock, the one workers renew them by."""
    client = redis_client()
    now_ms = redis_clock.now_ms(client)
    pipe = client.pipeline(transaction=False)
    pipe.zcount(serving_key(model), now_ms, "+inf")
    pipe.zcount(serving_key(None), now_ms, "+inf")
    own, anyone = pipe.execute()
    if own:
        return model_queue(model)
    if anyone:
        return None
    raise ModelNotServed(model)


def _direct(name: str | None) -> Queue:
    """The queue, reached through the nameless exchange: the message goes straight to the queue's
    list, whatever bindings Redis holds. (Through a named exchange, a Redis that lost its
    ``_kombu.binding.*`` keys, restarted without persistence say, would route every task to
    kombu's dead-letter list until each worker restarted.)"""
    from mlxserve.celery import app

    name = name or app.conf.task_default_queue
    return Queue(name, Exchange(""), routing_key=name)


def generation_queue(*, data: Any, user: Any = None) -> Generation:
    """Validate a generation request (``POST /api/generations/``), record it and queue it for a
    worker that serves its model.

    ``model`` may name a registry entry; the worker gets the path it stands for.
    Raises ``ValidationFailed``, ``ModelNotServed``, or ``kombu``/``redis`` errors if the broker
    is down (then nothing is recorded).
    """
    order = validate(data, GenerationOrder)
    return generation_submit(order, user=user)


def generation_submit(
    order: GenerationFields,
    *,
    user: Any = None,
    serving: dict[str, Any] | None = None,
    generation_id: uuid.UUID | None = None,
) -> Generation:
    """Record a validated order and queue it (``serving``: the task's serving fields, for /v1/,
    whose requests name the generation's id before it is queued)."""
    from events.tasks import generation_run

    if "\x00" in order.model:
        raise ValidationFailed([Issue(["model"], "Cannot contain NUL characters", "invalid")])
    # The command line (no user) runs on the control plane, where registering is at hand anyway.
    may_register = user is None or bool(getattr(user, "is_staff", False))
    registered = registered_model(order.model, may_register=may_register)
    queue = generation_route(registered.name)
    client = redis_client()
    generation = Generation.objects.create(
        id=generation_id or uuid.uuid4(),
        model=registered.name,
        model_path=registered.path,
        # Stored as the events are: an escaped NUL (PostgreSQL cannot hold one) becomes U+FFFD.
        prompt=msgspec.json.decode(
            storable_body(msgspec.json.encode(prompt_redact(order.prompt, prompt_policy_get())))
        ),
        max_tokens=order.max_tokens,
        options={"temperature": order.temperature, "topP": order.top_p, "seed": order.seed},
        requested_by=user if user is not None and getattr(user, "is_authenticated", False) else None,
    )
    task = {
        **generation_fields(order),
        "model": registered.name,
        "generation_id": str(generation.id),
        "model_path": registered.path or None,
        "queued_at_ms": redis_clock.now_ms(client),
        "queue_timeout_ms": settings.QUEUE_TIMEOUT_S * 1000,
        **(serving or {}),
    }
    try:
        generation_run.apply_async(kwargs=task_sign(task), retry=False, queue=_direct(queue))
    except Exception:
        generation.delete()
        raise
    return generation
