"""What the tests share besides fixtures: envelopes, accounts, a Redis of one's own, a real
Celery worker, the ingester on the test stream. Fixtures live in conftest.py files; no test
module imports another."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import redis
from django.conf import settings as django_settings
from django.contrib.auth.models import Group, User
from django.db import connection
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from events.backlog import stream_lag
from events.ingest import EventIngester
from mlxserve.bus import stream_append, stream_envelope_bodies
from mlxserve.contract.events import Envelope, envelope_to_wire, token_envelopes_decode
from mlxserve.engine.emitter import EngineEventEmitter
from mlxserve.engine.engine import Engine
from mlxserve.engine.metrics import WorkerMetrics
from mlxserve.host.service_files import CELERY_WORKER_ARGS, WEB_SERVER_ARGS

# Another database (MLXSERVE_TEST_REDIS_URL) lets two checkouts' suites run side by side.
TEST_REDIS_URL = os.environ.get("MLXSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def stream_envelopes(client: redis.Redis, stream: str) -> list[dict[str, Any]]:
    """Every envelope on the stream, in order, single entries and batches alike."""

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


def token_client(user: User) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def role_user(username: str, group: str, *, is_staff: bool = False) -> User:
    user = User.objects.create_user(username, password=f"{username}-pass-123", is_staff=is_staff)
    user.groups.add(Group.objects.get_or_create(name=group)[0])
    return user


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


STREAM, CONFIG_KEY, CONTROL = "test:events", "test:telemetry:config", "test:control"


@contextlib.contextmanager
def celery_worker_running(log_dir: Path, source: str, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A mlxserve worker``, as the README runs it, on the test Redis
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
                *CELERY_WORKER_ARGS,
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            env=worker_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(django_settings.BASE_DIR),
        )
        try:
            deadline = time.monotonic() + 60
            while b"ready." not in log.read_bytes():
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            yield process
        finally:  # a failing test must not leave its worker writing into the next one's Redis
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
    assert f"Worker runtime {source} stopped".encode() in log.read_bytes()


def ingester(
    redis_client: redis.Redis,
    settings: Any,
    consumer: str = "c1",
    kind: type[EventIngester] = EventIngester,
    **kwargs: Any,
) -> EventIngester:
    return kind(
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


def generation(
    *, start: int, ttft: int, tokens: int, model: str = "llama-3-8b", throughput: float | None = None
) -> list[dict[str, Any]]:
    """A generation's events: started, ``tokens`` tokens 10 ms apart after ``ttft``, completed."""
    gid = str(uuid.uuid4())
    started = make_envelope(
        "generationStarted",
        generationId=gid,
        timestamp=start,
        seq=0,
        payload={"model": model, "prompt": "Hi", "maxTokens": tokens},
    )
    token_events = [
        make_envelope(
            "tokenGenerated",
            generationId=gid,
            timestamp=start + ttft + i * 10,
            seq=i + 1,
            payload={"model": model, "token": f"t{i}"},
        )
        for i in range(tokens)
    ]
    completed_payload: dict[str, Any] = {
        "model": model,
        "tokensGenerated": tokens,
        "durationMs": float(ttft + tokens * 10),
    }
    if throughput is not None:
        completed_payload["throughput"] = throughput
    completed = make_envelope(
        "generationCompleted",
        generationId=gid,
        timestamp=start + ttft + tokens * 10,
        seq=tokens + 1,
        payload=completed_payload,
    )
    return [started, *token_events, completed]


@contextlib.contextmanager
def writers_locked_out(table: str) -> Iterator[None]:
    """Another session holding ``table`` against writers, as a long write would; readers go on
    (PostgreSQL: the table locked EXCLUSIVE; SQLite: the file's write lock, WAL readers go on)."""
    if connection.vendor == "postgresql":
        import psycopg

        holder: Any = psycopg.connect(database_url())
        holder.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
    else:
        import sqlite3

        holder = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.rollback()
        holder.close()


def web_server_command(port: int, *, workers: int = 1) -> list[str]:
    """The web server as deployed (docs/operations.md): gunicorn managing uvicorn's workers on
    ``mlxserve.asgi``, on a loopback port."""
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    return [gunicorn, *WEB_SERVER_ARGS, "--bind", f"127.0.0.1:{port}", "--workers", str(workers)]


def database_url() -> str:
    db = connection.settings_dict
    if connection.vendor == "postgresql":
        return f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    return f"sqlite:///{db['NAME']}"


def token_bodies(count: int) -> list[bytes]:
    """``count`` valid token events of one generation, JSON-encoded, in order."""
    generation = str(uuid.uuid4())
    return [
        msgspec.json.encode(
            {
                "id": str(uuid.uuid4()),
                "type": "tokenGenerated",
                "timestamp": 1764115200000 + i,
                "source": "ingest-test/w1",
                "generationId": generation,
                "seq": i,
                "payload": {"model": "m", "token": "t", "logprob": -1.0},
            }
        )
        for i in range(count)
    ]


class CollectingPublisher:
    """A publisher that keeps the envelopes it is given, in order (one or a batch)."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    def publish(self, envelope: Envelope, body: bytes) -> None:
        self.envelopes.append(envelope)

    def publish_many(self, bodies: Sequence[bytes]) -> None:
        self.envelopes.extend(token_envelopes_decode(list(bodies)))


class Recorder:
    """An engine whose events are kept in a list, to assert on what a user would see."""

    def __init__(self, **engine_kwargs: Any) -> None:
        self.publisher = CollectingPublisher()
        self.metrics = WorkerMetrics()
        self.engine = Engine(
            emitter=EngineEventEmitter(source="test-host/worker-1", publisher=self.publisher),
            metrics=self.metrics,
            **engine_kwargs,
        )

    def events(self, *types: str) -> list[dict[str, Any]]:
        wires = [envelope_to_wire(e) for e in self.publisher.envelopes]
        return [w for w in wires if not types or w["type"] in types]

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


# -- the payload rules' test plan: shared by the contract, the emitter and the API tests --------

DROP = object()


def with_payload(event_type: str, **changes: Any) -> dict[str, Any]:
    envelope = make_envelope(event_type)
    payload = dict(envelope["payload"])
    for key, value in changes.items():
        if value is DROP:
            payload.pop(key, None)
        else:
            payload[key] = value
    envelope["payload"] = payload
    return envelope


# (type, field, bad value, message) at and across each boundary of the payload rules.
REJECTED = [
    ("modelLoaded", "model", "", "Cannot be empty"),
    ("modelLoaded", "model", DROP, "Required"),
    ("modelLoaded", "modelPath", "", "Cannot be empty"),
    ("modelLoaded", "quantization", "int3", "Must be one of: int4, int8, none"),
    ("modelLoaded", "quantization", None, "Must be one of: int4, int8, none"),
    ("modelLoaded", "parameters", 0, "Must be a positive integer"),
    ("modelLoaded", "parameters", -5, "Must be a positive integer"),
    ("modelLoaded", "parameters", 1.5, "Must be an integer"),
    ("modelLoaded", "parameters", "8", "Must be an integer"),
    ("modelLoaded", "parameters", None, "Must be an integer"),
    ("modelLoaded", "metadata", [1], "Must be an object"),
    ("modelLoaded", "metadata", None, "Must be an object"),
    ("modelUnloaded", "reason", 3, "Must be a string"),
    ("modelUnloaded", "reason", None, "Must be a string"),
    ("modelInvalidated", "reason", "", "Cannot be empty"),
    ("modelInvalidated", "reason", DROP, "Required"),
    ("generationStarted", "prompt", 5, "Must be a string"),
    ("generationStarted", "prompt", None, "Must be a string"),
    ("generationStarted", "prompt", DROP, "Required"),
    ("generationStarted", "maxTokens", 0, "Must be a positive integer"),
    ("generationStarted", "maxTokens", 2.0, "Must be an integer"),
    ("generationStarted", "maxTokens", True, "Must be an integer"),
    ("tokenGenerated", "token", None, "Must be a string"),
    ("tokenGenerated", "token", DROP, "Required"),
    ("tokenGenerated", "logprob", float("nan"), "Must be a finite number"),
    ("tokenGenerated", "logprob", float("inf"), "Must be a finite number"),
    ("tokenGenerated", "logprob", float("-inf"), "Must be a finite number"),
    ("tokenGenerated", "logprob", "-0.5", "Must be a number"),
    ("tokenGenerated", "logprob", None, "Must be a number"),
    ("generationCompleted", "tokensGenerated", -1, "Cannot be negative"),
    ("generationCompleted", "tokensGenerated", 1.5, "Must be an integer"),
    ("generationCompleted", "durationMs", -0.001, "Duration cannot be negative"),
    ("generationCompleted", "durationMs", float("inf"), "Must be a finite number"),
    ("generationCompleted", "durationMs", DROP, "Required"),
    ("generationCompleted", "throughput", -1, "Throughput cannot be negative"),
    ("generationCompleted", "throughput", float("nan"), "Must be a finite number"),
    ("error", "error", "", "Cannot be empty"),
    ("error", "code", 500, "Must be a string"),
    ("error", "model", None, "Must be a string"),
    ("runtimeStatus", "status", "idle", "Status must be one of: ready, busy, error, shutdown"),
    ("runtimeStatus", "status", None, "Status must be one of: ready, busy, error, shutdown"),
    ("runtimeStatus", "modelsLoaded", -1, "Cannot be negative"),
    ("runtimeStatus", "modelsLoaded", "1", "Must be an integer"),
    ("runtimeStatus", "activeTasks", -1, "Cannot be negative"),
]

ACCEPTED = [
    ("modelLoaded", "parameters", 1),
    ("modelLoaded", "parameters", 8000000000),
    ("modelLoaded", "parameters", DROP),
    ("modelLoaded", "quantization", "none"),
    ("modelLoaded", "quantization", "int8"),
    ("modelLoaded", "metadata", DROP),
    ("modelLoaded", "metadata", {"nested": {"list": [1, 2.5, None, "x", True]}}),
    ("modelUnloaded", "reason", DROP),
    ("modelUnloaded", "reason", ""),
    ("generationStarted", "prompt", {"messages": [{"role": "user", "content": "hi"}]}),
    ("generationStarted", "prompt", ""),
    ("generationStarted", "maxTokens", 1),
    ("generationStarted", "maxTokens", DROP),
    ("tokenGenerated", "token", ""),
    ("tokenGenerated", "logprob", 0),
    ("tokenGenerated", "logprob", -1e300),
    ("tokenGenerated", "logprob", DROP),
    ("generationCompleted", "tokensGenerated", 0),
    ("generationCompleted", "durationMs", 0),
    ("generationCompleted", "durationMs", 0.0),
    ("generationCompleted", "throughput", 0),
    ("generationCompleted", "throughput", DROP),
    ("error", "code", DROP),
    ("error", "model", DROP),
    ("runtimeStatus", "status", "busy"),
    ("runtimeStatus", "status", "error"),
    ("runtimeStatus", "status", "shutdown"),
    ("runtimeStatus", "modelsLoaded", 0),
    ("runtimeStatus", "activeTasks", 0),
    ("runtimeStatus", "activeTasks", DROP),
]


def ingest_until(redis_client: redis.Redis, condition: Any, timeout: float = 60.0) -> None:
    """Run an ingester on the test stream (group ``test-ingest``) until ``condition()`` holds."""
    ingester = EventIngester(
        client=redis_client, stream=STREAM, group="test-ingest", consumer="t", block_ms=100
    )
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the worker's events"
        ingester.step()
