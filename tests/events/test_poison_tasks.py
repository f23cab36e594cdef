"""What a worker host's broker credentials can push onto Celery's queue: garbage, messages that
are not kombu's, tasks with bad arguments, a generation whose attempts keep dying. The worker
that takes them carries on with the next generation; every generation that cannot run ends
``failed`` with an ``error`` event."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection

from events.models import Event
from mlxserve.host.broker import QUARANTINE
from tests.factories import TEST_REDIS_URL, celery_worker_running, generation_queue_on, ingest_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    log_dir = tmp_path_factory.mktemp("poisoned-worker")
    with celery_worker_running(log_dir, "poison-host/w1", MLXSERVE_MAX_ATTEMPTS="2") as process:
        yield process, log_dir / "worker.log"


def completed(generation_id: str) -> bool:
    return Event.objects.filter(generation_id=generation_id, type="generationCompleted").exists()


def queue_task(*args: Any, **kwargs: Any) -> None:
    from events.tasks import generation_run

    with Connection(TEST_REDIS_URL) as broker:
        generation_run.apply_async(args=args, kwargs=kwargs, connection=broker)


def test_garbage_on_the_queue_is_quarantined_and_the_worker_carries_on(
    worker: tuple[Any, Path], redis_client: redis.Redis, module_demo_model: Path
) -> None:
    process, log = worker
    garbage = [
        b"not json at all",
        b"{}",
        b"[1, 2, 3]",
        json.dumps({"body": "x", "properties": "nope"}).encode(),
        b"\xff\xfe\x00",
    ]
    for item in garbage:
        redis_client.lpush("celery", item)
    # A message kombu can deliver whose body is not JSON, and one for a task nobody has: Celery's own.
    envelope: dict[str, Any] = {
        "body": "bm90IGpzb24=",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"task": "mlxserve.generation_run", "id": str(uuid.uuid4())},
        "properties": {
            "delivery_info": {"exchange": "", "routing_key": "celery"},
            "delivery_tag": "t1",
            "body_encoding": "base64",
            "delivery_mode": 2,
            "priority": 0,
        },
    }
    redis_client.lpush("celery", json.dumps(envelope))
    unknown = {
        **envelope,
        "headers": {"task": "no.such.task", "id": str(uuid.uuid4())},
        "properties": {**envelope["properties"], "delivery_tag": "t2"},
    }
    redis_client.lpush("celery", json.dumps(unknown))
    after = generation_queue_on(TEST_REDIS_URL, module_demo_model)
    ingest_until(redis_client, lambda: completed(after))
    assert process.poll() is None, log.read_text()[-3000:]
    quarantined = redis_client.lrange(QUARANTINE, 0, -1)
    assert sorted(quarantined) == sorted(garbage)
    assert log.read_text().count("Quarantined an item of queue celery") == len(garbage)


def test_a_task_with_bad_arguments_ends_its_generation_failed(
    worker: tuple[Any, Path], redis_client: redis.Redis, module_demo_model: Path
) -> None:
    process, _ = worker
    cases: dict[str, dict[str, Any]] = {
        "wrong type": {"generation_id": str(uuid.uuid4()), "model": 5, "prompt": "x"},
        "missing prompt": {"generation_id": str(uuid.uuid4()), "model": str(module_demo_model)},
        "unknown argument": {"generation_id": str(uuid.uuid4()), "model": "m", "prompt": "x", "evil": 1},
        "out of range": {
            "generation_id": str(uuid.uuid4()),
            "model": "m",
            "prompt": "x",
            "max_tokens": 10**9,
        },
    }
    for kwargs in cases.values():
        queue_task(**kwargs)
    queue_task("positional", generation_id=str(uuid.uuid4()))  # no readable id in the event: logged
    after = generation_queue_on(TEST_REDIS_URL, module_demo_model)
    ingest_until(
        redis_client,
        lambda: (
            completed(after)
            and Event.objects.filter(type="error", payload__code="InvalidTask").count() >= len(cases)
        ),
    )
    assert process.poll() is None
    for name, kwargs in cases.items():
        [error] = Event.objects.filter(generation_id=kwargs["generation_id"])
        assert error.type == "error", name
        assert error.payload["code"] == "InvalidTask" and error.payload["error"].startswith(
            "Invalid generation task:"
        ), name


def test_a_generation_whose_attempts_keep_dying_is_not_handed_on_without_end(
    worker: tuple[Any, Path], redis_client: redis.Redis, module_demo_model: Path
) -> None:
    # Two attempts already began and their workers died (MLXSERVE_MAX_ATTEMPTS=2): the third
    # delivery ends the generation instead of running it again.
    generation_id = str(uuid.uuid4())
    redis_client.set(f"mlxserve:generation:{generation_id}:attempts", 2)
    redis_client.set(f"mlxserve:generation:{generation_id}:attempts:poison-host", 2)
    queue_task(generation_id=generation_id, model=str(module_demo_model), prompt="Hi", max_tokens=4)
    ingest_until(redis_client, lambda: Event.objects.filter(generation_id=generation_id).exists())
    [error] = Event.objects.filter(generation_id=generation_id)
    assert (error.type, error.payload["code"]) == ("error", "TooManyAttempts")
    assert error.payload["metadata"] == {"attempt": 3}
    assert "at most 2 attempts a host" in error.payload["error"]


def test_another_host_adding_to_the_fleet_count_does_not_end_a_generation(
    worker: tuple[Any, Path], redis_client: redis.Redis, module_demo_model: Path
) -> None:
    # The fleet-wide count is writable by every worker host; only this host's own count bounds it.
    generation_id = str(uuid.uuid4())
    redis_client.set(f"mlxserve:generation:{generation_id}:attempts", 1000)
    queue_task(generation_id=generation_id, model=str(module_demo_model), prompt="Hi", max_tokens=4)
    ingest_until(
        redis_client,
        lambda: Event.objects.filter(generation_id=generation_id, type="generationCompleted").exists(),
    )
    started = Event.objects.get(generation_id=generation_id, type="generationStarted")
    assert started.payload["metadata"]["attempt"] == 1001  # only the number is odd
