"""Generations end to end: the API queues on Redis, a real Celery worker runs mlx-lm, the ingester stores."""

from __future__ import annotations

import io
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from rest_framework.test import APIClient

from events.ingest import EventIngester
from events.models import Event, Generation, RegisteredModel
from mlxserve.web.roles import OPERATOR_GROUP
from tests.factories import (
    CONFIG_KEY,
    CONTROL,
    STREAM,
    RedisServer,
    celery_worker_running,
    generation_queue_on,
    ingest_until,
    stream_envelopes,
    token_client,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def operator_client(db: Any) -> APIClient:
    user = User.objects.create_user("operator")
    user.groups.add(Group.objects.get_or_create(name=OPERATOR_GROUP)[0])
    return token_client(user)


@pytest.fixture(autouse=True)
def _names(settings: Any) -> None:
    settings.WORKER_CONTROL_CHANNEL = CONTROL


def generation(client: APIClient, generation_id: str) -> dict[str, Any]:
    response = client.get(f"/api/generations/{generation_id}/")
    assert response.status_code == 200
    return dict(response.json())


def test_a_queued_generation_runs_on_a_worker_and_reads_back_whole(
    celery_worker: Any,
    module_demo_model: Path,
    operator_client: APIClient,
    reader_client: APIClient,
    redis_client: redis.Redis,
) -> None:
    RegisteredModel.objects.create(name="demo", path=str(module_demo_model))
    response = operator_client.post(
        "/api/generations/",
        {"model": "demo", "prompt": "Hello", "maxTokens": 8, "temperature": 0.5, "seed": 1},
        format="json",
    )
    assert response.status_code == 202
    generation_id = response.json()["generationId"]
    assert generation(reader_client, generation_id)["state"] == "queued"

    ingest_until(
        redis_client, lambda: generation(reader_client, generation_id)["state"] in ("completed", "failed")
    )
    detail = generation(reader_client, generation_id)
    assert detail["state"] == "completed"
    assert detail["model"] == "demo" and detail["tokens"] == 8
    tokens = [e for e in detail["events"] if e["type"] == "tokenGenerated"]
    assert [e["seq"] for e in tokens] == list(range(1, 9))
    assert detail["text"] == "".join(e["payload"]["token"] for e in tokens)
    assert detail["timeToFirstTokenMs"] is not None and detail["tokensPerSecond"] > 0
    assert detail["events"][0]["type"] == "generationStarted"
    assert detail["events"][-1]["type"] == "generationCompleted"
    assert detail["events"][-1]["source"] == "test-host/celery-worker"
    assert [a["state"] for a in detail["attempts"]] == ["completed"]
    assert Event.objects.filter(type="modelLoaded", model="demo").count() == 1

    workers = reader_client.get("/api/workers/").json()["results"]
    [worker] = [w for w in workers if w["source"] == "test-host/celery-worker"]
    assert worker["status"] == "ready" and worker["modelsLoaded"] == 1 and worker["stale"] is False

    unload = operator_client.post("/api/workers/unload/", {"model": "demo"}, format="json")
    assert unload.status_code == 202 and unload.json()["listeners"] >= 1
    ingest_until(redis_client, lambda: Event.objects.filter(type="modelUnloaded").exists())
    assert Event.objects.get(type="modelUnloaded").payload == {"model": "demo", "reason": "manual"}


def test_only_registered_models_are_generated(
    operator_client: APIClient, tmp_path: Path, any_model_served: object
) -> None:
    # An operator cannot make a worker load whatever directory its host holds.
    RegisteredModel.objects.create(name="demo", path=str(tmp_path / "demo"))
    for model in ("/root/.ssh", "no-such-model", str(tmp_path), "demo/../../etc"):
        response = operator_client.post("/api/generations/", {"model": model, "prompt": "x"}, format="json")
        assert response.status_code == 400, model
        [issue] = response.json()["details"]["issues"]
        assert (issue["path"], issue["code"]) == (["model"], "unknown_model")
        assert issue["message"].startswith(f"Unknown model '{model}': only registered models are generated")
    assert not Generation.objects.exists()
    # By its name or by the path it was registered with; the worker is told the registered name.
    for model in ("demo", str(tmp_path / "demo")):
        response = operator_client.post("/api/generations/", {"model": model, "prompt": "x"}, format="json")
        assert response.status_code == 202
        assert Generation.objects.get(pk=response.json()["generationId"]).model == "demo"


@pytest.mark.parametrize(
    ("path", "accepted"),
    [
        ("/Users/ml/models/qwen-0.5b", True),
        ("mlx-community/Qwen2.5-0.5B-Instruct-4bit", True),
        ("relative/dir/x", False),
        ("/models/../../root/.ssh", False),
        ("/models/a\nb", False),
        ("~/models/x", False),
        ("", False),
    ],
)
def test_a_registered_path_is_absolute_or_a_repo_id(path: str, accepted: bool) -> None:
    from django.core.management import CommandError, call_command

    if accepted:
        call_command("register_model", "m", path, stdout=io.StringIO())
        assert RegisteredModel.objects.get(name="m").path == path
        return
    refusal = "This field cannot be blank" if not path else "A model path is an absolute directory path"
    with pytest.raises(CommandError, match=f"path: {refusal}"):
        call_command("register_model", "m", path, stdout=io.StringIO())
    assert not RegisteredModel.objects.exists()


def test_a_registered_model_missing_on_the_worker_gives_a_failed_generation(
    celery_worker: Any,
    operator_client: APIClient,
    reader_client: APIClient,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    RegisteredModel.objects.create(name="gone", path=str(tmp_path / "not-there"))
    response = operator_client.post("/api/generations/", {"model": "gone", "prompt": "x"}, format="json")
    generation_id = response.json()["generationId"]
    ingest_until(redis_client, lambda: generation(reader_client, generation_id)["state"] == "failed")
    detail = generation(reader_client, generation_id)
    assert detail["error"]["code"] == "ModelNotFound"
    assert [e["type"] for e in detail["events"]] == ["generationStarted", "error"]


def test_the_generate_command_streams_tokens_and_a_summary(
    celery_worker: Any, module_demo_model: Path, redis_client: redis.Redis
) -> None:
    import threading

    stop = threading.Event()

    def ingest() -> None:
        from django.db import connection

        ingester = EventIngester(
            client=redis_client, stream=STREAM, group="test-ingest", consumer="t", block_ms=100
        )
        while not stop.is_set():
            ingester.step()
        connection.close()

    # Named by the path it was registered with.
    RegisteredModel.objects.create(name="demo", path=str(module_demo_model))
    thread = threading.Thread(target=ingest)
    thread.start()
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command(
            "generate",
            "--model",
            str(module_demo_model),
            "--prompt",
            "Hi",
            "--max-tokens",
            "6",
            "--timeout",
            "60",
            stdout=out,
            stderr=err,
        )
    finally:
        stop.set()
        thread.join()
    tokens = Event.objects.filter(type="tokenGenerated").order_by("seq")
    assert out.getvalue().strip("\n") == "".join(e.payload["token"] for e in tokens).strip("\n")
    assert "completed: 6 tokens" in err.getvalue()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x"}, "model"),
        ({"model": "m", "prompt": "x", "maxTokens": 0}, "maxTokens"),
        ({"model": "m", "prompt": "x", "topP": 2}, "topP"),
        ({"model": "m", "prompt": "x", "stream": True}, "stream"),
        ({"model": "m", "prompt": 5}, "prompt"),
    ],
)
def test_a_bad_generation_request_gets_the_error_object(
    operator_client: APIClient, body: Any, field: str
) -> None:
    response = operator_client.post("/api/generations/", body, format="json")
    assert response.status_code == 400
    assert response.json()["details"]["field"] == field


def test_who_may_queue_and_read_generations(
    anon_client: APIClient, reader_client: APIClient, producer_client: APIClient
) -> None:
    body = {"model": "m", "prompt": "x"}
    assert anon_client.post("/api/generations/", body, format="json").status_code == 401
    assert reader_client.post("/api/generations/", body, format="json").status_code == 403
    assert producer_client.post("/api/generations/", body, format="json").status_code == 403
    assert reader_client.post("/api/workers/unload/", {"model": "m"}, format="json").status_code == 403
    assert reader_client.get("/api/generations/00000000-0000-4000-8000-000000000000/").status_code == 404
    assert producer_client.get("/api/workers/").status_code == 403
    assert anon_client.get("/api/workers/").status_code == 401


def test_a_rerun_is_a_new_attempt_told_apart_in_the_history(
    module_demo_model: Path,
    reader_client: APIClient,
    redis_client: redis.Redis,
    settings: Any,
    tmp_path: Path,
) -> None:
    """The task body as a worker runs it on a redelivery: the attempt counter lives in Redis."""
    from events.tasks import generation_run
    from mlxserve.host import worker

    settings.EVENTS_STREAM, settings.TELEMETRY_CONFIG_KEY = STREAM, CONFIG_KEY
    settings.WORKER_SPOOL_DIR, settings.WORKER_SOURCE = str(tmp_path), "test-host/in-process"
    generation_id = "6f1c7c1e-0b7a-4a8e-9a57-1b0f0e2c9d11"
    kwargs = {
        "generation_id": generation_id,
        "model": str(module_demo_model),
        "model_path": None,
        "prompt": "x",
        "max_tokens": 3,
    }
    try:
        assert generation_run.run(**kwargs)["attempt"] == 1
        assert generation_run.run(**kwargs)["attempt"] == 2
        assert worker.worker_runtime().publisher.flush(10)
    finally:
        worker._on_worker_shutdown()
    ingest_until(
        redis_client,
        lambda: Event.objects.filter(generation_id=generation_id, type="generationCompleted").count() == 2,
    )
    detail = generation(reader_client, generation_id)
    assert [(a["attempt"], a["state"], a["tokens"]) for a in detail["attempts"]] == [
        (1, "completed", 3),
        (2, "completed", 3),
    ]
    assert detail["attempt"] == 2 and detail["tokens"] == 3


def test_the_celery_broker_may_be_another_redis_than_the_event_stream(
    own_redis: RedisServer, module_demo_model: Path, redis_client: redis.Redis, tmp_path: Path
) -> None:
    # CELERY_BROKER_URL apart from REDIS_URL: tasks come through one Redis, events go out through the other.
    with celery_worker_running(tmp_path, "test-host/broker-apart", CELERY_BROKER_URL=own_redis.url):
        generation_id = generation_queue_on(own_redis.url, module_demo_model)
        ingest_until(
            redis_client,
            lambda: Event.objects.filter(generation_id=generation_id, type="generationCompleted").exists(),
        )
    assert Event.objects.filter(generation_id=generation_id, type="tokenGenerated").count() == 4
    assert Event.objects.filter(source="test-host/broker-apart").exists()
    # Celery's bindings live on the broker's Redis only.
    assert redis.Redis.from_url(own_redis.url).keys("_kombu.binding.*")
    assert not redis_client.keys("_kombu.binding.*")


def test_staff_may_name_an_unregistered_directory_as_the_contract_allows(
    staff_client: APIClient, tmp_path: Path, any_model_served: object
) -> None:
    # `model` is a registry name, a local directory or a cached repo id: staff, who may register
    # models anyway, may name one directly; the worker checks it as any other.
    response = staff_client.post("/api/generations/", {"model": str(tmp_path), "prompt": "x"}, format="json")
    assert response.status_code == 202
    recorded = Generation.objects.get(pk=response.json()["generationId"])
    assert (recorded.model, recorded.model_path) == (str(tmp_path), "")
    assert not RegisteredModel.objects.exists()


def test_a_worker_takes_as_many_tasks_as_it_runs_and_a_sigterm_finishes_them_losing_nothing(
    own_redis: RedisServer, module_demo_model: Path, redis_client: redis.Redis, tmp_path: Path
) -> None:
    queued: list[str] = []  # the test's generations (the module's worker may emit events of others)

    def ends() -> dict[str, dict[str, Any]]:
        return {
            e["generationId"]: e
            for e in stream_envelopes(redis_client, STREAM)
            if e["type"] == "generationCompleted" and e["generationId"] in queued
        }

    def started() -> set[str]:
        return {
            e["generationId"]
            for e in stream_envelopes(redis_client, STREAM)
            if e["type"] == "generationStarted" and e["generationId"] in queued
        }

    env = {"CELERY_BROKER_URL": own_redis.url, "MLXSERVE_WORKER_CONCURRENCY": "4"}
    with celery_worker_running(tmp_path, "test-host/batching", **env) as process:
        queued.extend(
            generation_queue_on(own_redis.url, module_demo_model, max_tokens=2000) for _ in range(8)
        )
        deadline = time.monotonic() + 60
        while len(started()) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # long enough for a fifth to start, were the worker to take one
        running = started()
        assert len(running) == 4 and not ends()  # four at once, in one batch; the other four wait in Redis
        process.send_signal(signal.SIGTERM)  # a warm shutdown, as systemctl stop / launchctl bootout do
        process.wait(120)
    finished = ends()
    assert set(finished) == running  # the running four finished, whole, before the worker stopped
    assert all(e["payload"]["tokensGenerated"] == 2000 for e in finished.values())
    assert started() == running  # none of the waiting four was begun
    with celery_worker_running(tmp_path, "test-host/batching-2", **env):
        deadline = time.monotonic() + 120
        while len(ends()) < 8:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert set(ends()) == set(queued)
    tokens = [e for e in stream_envelopes(redis_client, STREAM) if e["type"] == "tokenGenerated"]
    for generation_id in queued:
        seqs = [e["seq"] for e in tokens if e["generationId"] == generation_id]
        assert seqs == list(range(1, 2001))  # every token of every generation, once, in order
