"""The real stack the OpenAI-compatible endpoint's tests run against, started once for the
package: the ASGI application under uvicorn in this process (so it shares the test database),
Redis, and two Celery workers generating with demo models (one serving ``demo``, one ``other``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis
import uvicorn

from events.models import RegisteredModel
from mlxserve.engine.demo_model import create_demo_model
from mlxserve.engine.reply import ServingClaim
from tests.factories import celery_worker_running, free_port
from tests.serving.stack import DEMO_WORKER, OTHER_WORKER, api_key


@pytest.fixture(scope="package")
def asgi_server() -> Iterator[str]:
    """The ASGI application under uvicorn, in this process (so it shares the test database)."""
    port = free_port()
    config = uvicorn.Config(
        "mlxserve.asgi:application", host="127.0.0.1", port=port, lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="package")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_demo_model(tmp_path_factory.mktemp("models") / "other", seed=1)


@pytest.fixture(scope="package")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Two workers: one serves ``demo``, one ``other`` (each takes its model's queue only)."""
    with (
        celery_worker_running(
            tmp_path_factory.mktemp("demo-worker"),
            DEMO_WORKER,
            MLXSERVE_WORKER_MODELS="demo",
            MLXSERVE_WORKER_CONCURRENCY="2",
        ),
        celery_worker_running(
            tmp_path_factory.mktemp("other-worker"), OTHER_WORKER, MLXSERVE_WORKER_MODELS="other"
        ),
    ):
        yield


@pytest.fixture
def stack(
    workers: None, asgi_server: str, module_demo_model: Path, other_model: Path, redis_client: redis.Redis
) -> str:
    """Both models registered, and the workers' claims as they renew them (each test starts on an
    emptied Redis; the workers renew every 5 s)."""
    RegisteredModel.objects.create(name="demo", path=str(module_demo_model))
    RegisteredModel.objects.create(name="other", path=str(other_model))
    ServingClaim(redis_client, DEMO_WORKER, ["demo"]).renew()
    ServingClaim(redis_client, OTHER_WORKER, ["other"]).renew()
    return asgi_server


@pytest.fixture
def client(stack: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack, api_key=api_key(), max_retries=0, timeout=60)
