"""Generation tasks signed by the control plane: a worker with the verify key runs what the
control plane queued and nothing a worker host forges on the shared queue."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.core.management import call_command
from rest_framework.test import APIClient

from events.models import Event, RegisteredModel
from events.signing import task_sign, task_signature_refusal
from mlxserve.engine.reply import ServingClaim
from tests.factories import celery_worker_running, ingest_until

pytestmark = pytest.mark.django_db(transaction=True)


def keys() -> tuple[str, str]:
    out = io.StringIO()
    call_command("create_task_keys", stdout=out)
    signing, verify = (line.split("=", 1)[1] for line in out.getvalue().splitlines())
    return signing, verify


SIGNING, VERIFY = keys()


def arguments(**changes: Any) -> dict[str, Any]:
    return {
        "generation_id": str(uuid.uuid4()),
        "model": "demo",
        "model_path": "/models/demo",
        "prompt": {"messages": [{"role": "user", "content": "Hi"}]},
        "max_tokens": 8,
        "temperature": 0.7,
        "top_p": 0.0,
        "seed": 3,
        **changes,
    }


def test_a_signed_task_verifies_and_any_change_to_it_does_not(settings: Any) -> None:
    settings.TASK_SIGNING_KEY, settings.TASK_VERIFY_KEY = SIGNING, VERIFY
    signed = task_sign(arguments())
    assert task_signature_refusal(signed) is None
    for name, value in [("model_path", "/Users/victim/models/x"), ("max_tokens", 9), ("prompt", "other")]:
        assert task_signature_refusal({**signed, name: value}) == (
            "its signature does not verify with the control plane's key"
        ), name
    assert task_signature_refusal(arguments()) == "not signed by the control plane"
    assert task_signature_refusal({**signed, "signature": "!!"}) is not None
    _, other_verify = keys()
    settings.TASK_VERIFY_KEY = other_verify
    assert task_signature_refusal(signed) is not None  # another deployment's key
    settings.TASK_VERIFY_KEY = ""
    assert task_signature_refusal(arguments()) is None  # workers without a key run every task, as before


@pytest.fixture(scope="module")
def verifying_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    log_dir = tmp_path_factory.mktemp("verifying-worker")
    with celery_worker_running(log_dir, "signed-host/w1", MLXSERVE_TASK_VERIFY_KEY=VERIFY):
        yield log_dir / "worker.log"


def test_a_worker_with_the_verify_key_runs_only_what_the_control_plane_signed(
    verifying_worker: Path,
    operator_client: APIClient,
    redis_client: redis.Redis,
    module_demo_model: Path,
    settings: Any,
) -> None:
    from kombu import Connection

    from events.tasks import generation_run
    from tests.factories import TEST_REDIS_URL

    settings.TASK_SIGNING_KEY = SIGNING
    RegisteredModel.objects.create(name="demo", path=str(module_demo_model))
    ServingClaim(redis_client, "signed-host/w1", None).renew()  # the module's worker, on the emptied Redis
    # A worker host queues tasks itself: unsigned, and a signed one it copied and changed.
    forged, tampered = arguments(model_path=str(module_demo_model)), task_sign(arguments())
    tampered["model_path"] = str(module_demo_model)
    with Connection(TEST_REDIS_URL) as broker:
        for kwargs in (forged, tampered):
            generation_run.apply_async(kwargs=kwargs, connection=broker)
    # The control plane's own request runs.
    response = operator_client.post(
        "/api/generations/", {"model": "demo", "prompt": "Hi", "maxTokens": 4}, format="json"
    )
    assert response.status_code == 202
    generation_id = response.json()["generationId"]
    ingest_until(
        redis_client,
        lambda: Event.objects.filter(generation_id=generation_id, type="generationCompleted").exists(),
    )
    time.sleep(0.5)
    ingest_until(redis_client, lambda: True)
    for kwargs in (forged, tampered):
        assert not Event.objects.filter(generation_id=kwargs["generation_id"]).exists()
    log = verifying_worker.read_text()
    assert log.count("Generation task refused: ") == 2
    assert "not signed by the control plane" in log
    assert "its signature does not verify with the control plane's key" in log
