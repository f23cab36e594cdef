"""Shared fixtures: a real Redis (database 15 of the local server) and API clients per role."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from django.conf import settings as django_settings
from django.contrib.auth.models import Group, User
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from events.services import EventIngester, stream_lag
from mlxserve.contract.stream import stream_append
from mlxserve.engine.demo_model import create_demo_model
from mlxserve.redis_conn import redis_for_url
from mlxserve.roles import OPERATOR_GROUP, PRODUCER_GROUP, VIEWER_GROUP

TEST_REDIS_URL = "redis://127.0.0.1:6379/15"

# With DEBUG off, web server and ingester refuse keys their host made: those the tests
# start get this process's keys from the environment (so prompt hashes match).
os.environ.setdefault("SECRET_KEY", django_settings.SECRET_KEY)
os.environ.setdefault("MLXSERVE_PROMPT_HASH_KEY", django_settings.PROMPT_HASH_KEY)


@pytest.fixture(autouse=True, scope="session")
def _celery_on_the_test_redis() -> None:
    """Queue tasks where the tests' workers listen (settings were read before the fixtures ran)."""
    from mlxserve.celery import app

    app.conf.broker_url = TEST_REDIS_URL


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings: Any) -> None:
    # Test accounts only: PBKDF2's deliberate slowness would dominate the role tests.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def redis_client(settings: Any) -> Iterator[redis.Redis]:
    """Every test gets an empty Redis database of its own, and the app points at it."""
    settings.REDIS_URL = TEST_REDIS_URL
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": TEST_REDIS_URL}
    }
    settings.EVENTS_STREAM = "test:events"
    settings.EVENTS_CONSUMER_GROUP = "test-ingest"
    settings.TELEMETRY_CONFIG_KEY = "test:telemetry:config"
    client = redis_for_url(TEST_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


def stream_envelopes(client: redis.Redis, stream: str) -> list[dict[str, Any]]:
    """Every envelope on the stream, in order, single entries and batches alike."""
    import json

    from mlxserve.contract.stream import stream_envelope_bodies

    return [json.loads(body) for body in stream_envelope_bodies(client, stream)]


# A fixed moment for events (2025-11-26, epoch ms): timestamps must be epoch milliseconds.
T0 = 1_764_115_200_000


def make_envelope(event_type: str = "tokenGenerated", **overrides: Any) -> dict[str, Any]:
    """A valid envelope of ``event_type``; ``overrides`` replace envelope fields."""
    payloads: dict[str, dict[str, Any]] = {
        "modelLoaded": {
            "model": "llama-3-8b",
            "modelPath": "/models/llama",
            "quantization": "int4",
            "parameters": 8000000000,
            "metadata": {"loadMs": 812},
        },
        "modelUnloaded": {"model": "llama-3-8b", "reason": "cache-eviction"},
        "modelInvalidated": {"model": "llama-3-8b", "reason": "file-changed"},
        "generationStarted": {"model": "llama-3-8b", "prompt": "Hello", "maxTokens": 32},
        "tokenGenerated": {"model": "llama-3-8b", "token": "Hello", "logprob": -0.5},
        "generationCompleted": {
            "model": "llama-3-8b",
            "tokensGenerated": 32,
            "durationMs": 410.5,
            "throughput": 78.0,
        },
        "error": {"error": "Model not found", "code": "ModelNotFound", "model": "nope"},
        "runtimeStatus": {"status": "ready", "modelsLoaded": 1, "activeTasks": 0},
    }
    envelope: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "type": event_type,
        "timestamp": T0,
        "source": "mac-studio-3/worker-1",
        "generationId": str(uuid.uuid4()),
        "seq": 0,
        "payload": payloads[event_type],
    }
    envelope.update(overrides)
    return envelope


@pytest.fixture
def envelope_factory() -> Any:
    return make_envelope


def _token_client(user: User) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def staff_user(db: Any) -> User:
    return User.objects.create_user("staff", password="staff-pass-123", is_staff=True, is_superuser=True)


@pytest.fixture
def staff_client(staff_user: User) -> APIClient:
    return _token_client(staff_user)


@pytest.fixture
def reader_client(db: Any) -> APIClient:
    return _token_client(User.objects.create_user("reader", password="reader-pass-123"))


@pytest.fixture
def producer_client(db: Any) -> APIClient:
    # Named after the host its events come from: make_envelope's source is mac-studio-3/worker-1.
    user = User.objects.create_user("mac-studio-3")
    user.groups.add(Group.objects.get_or_create(name=PRODUCER_GROUP)[0])
    return _token_client(user)


def role_user(username: str, group: str, *, is_staff: bool = False) -> User:
    user = User.objects.create_user(username, password=f"{username}-pass-123", is_staff=is_staff)
    user.groups.add(Group.objects.get_or_create(name=group)[0])
    return user


@pytest.fixture
def viewer_client(db: Any) -> APIClient:
    return _token_client(role_user("viewer", VIEWER_GROUP))


@pytest.fixture
def operator_client(db: Any) -> APIClient:
    return _token_client(role_user("operator", OPERATOR_GROUP))


@pytest.fixture
def anon_client() -> APIClient:
    return APIClient()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A Redis of the test's own on a loopback port, which the test may stop and start."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


# -- a real worker (celery, solo pool) on the test Redis ----------------------------------

STREAM, CONFIG_KEY, CONTROL = "test:events", "test:telemetry:config", "test:control"


@pytest.fixture(scope="module")
def module_demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_demo_model(tmp_path_factory.mktemp("models") / "demo")


@contextlib.contextmanager
def celery_worker_running(log_dir: Path, source: str, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A mlxserve worker --pool=solo``, as the README runs it, on the test Redis
    (``env`` adds to or overrides the worker's environment)."""
    log = log_dir / "worker.log"
    worker_env = {
        **os.environ,
        "REDIS_URL": TEST_REDIS_URL,
        "MLXSERVE_EVENTS_STREAM": STREAM,
        "MLXSERVE_CONFIG_KEY": CONFIG_KEY,
        "MLXSERVE_CONTROL_CHANNEL": CONTROL,
        "MLXSERVE_WORKER_SOURCE": source,
        "MLXSERVE_SPOOL_DIR": str(log_dir / "spool"),
        "MLXSERVE_METRICS_HOST": "127.0.0.1",
        **env,
    }
    for needless in ("DATABASE_URL", "SECRET_KEY", "MLXSERVE_PROMPT_HASH_KEY"):
        worker_env.pop(needless, None)  # a worker needs only REDIS_URL (and its models)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "mlxserve",
                "worker",
                "--pool=solo",
                "--concurrency=1",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            env=worker_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(django_settings.BASE_DIR),
        )
        deadline = time.monotonic() + 60
        while b"ready." not in log.read_bytes():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield process
        process.terminate()
        process.wait(30)
    assert f"Worker runtime {source} stopped".encode() in log.read_bytes()


@pytest.fixture(scope="module")
def celery_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    with celery_worker_running(tmp_path_factory.mktemp("worker"), "test-host/celery-worker") as process:
        yield process


# -- the ingester, on the test stream --------------------------------------------


def ingester(redis_client: redis.Redis, settings: Any, consumer: str = "c1", **kwargs: Any) -> EventIngester:
    return EventIngester(
        client=redis_client,
        stream=settings.EVENTS_STREAM,
        group=settings.EVENTS_CONSUMER_GROUP,
        consumer=consumer,
        block_ms=10,
        **kwargs,
    )


def append(redis_client: redis.Redis, settings: Any, *envelopes: dict[str, Any]) -> None:
    stream_append(redis_client, settings.EVENTS_STREAM, [msgspec.json.encode(e) for e in envelopes])


def pending(redis_client: redis.Redis, settings: Any) -> int:
    return stream_lag(
        client=redis_client, stream=settings.EVENTS_STREAM, group=settings.EVENTS_CONSUMER_GROUP
    )["pending"]


def generation_queue_on(broker_url: str, model: Path, *, max_tokens: int = 4) -> str:
    """Queue a generation task straight on the broker at ``broker_url``, as the control plane
    does (with no Generation row); returns its id."""
    from kombu import Connection

    from events.tasks import generation_run

    generation_id = str(uuid.uuid4())
    with Connection(broker_url) as broker:
        generation_run.apply_async(
            kwargs={
                "generation_id": generation_id,
                "model": str(model),
                "model_path": None,
                "prompt": "Hi",
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "top_p": 0.0,
                "seed": None,
            },
            connection=broker,
        )
    return generation_id
