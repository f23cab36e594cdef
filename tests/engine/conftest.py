from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from events.emitter import CollectingPublisher, EngineEventEmitter
from events.schemas import envelope_to_wire
from mlxserve.engine.demo_model import create_demo_model
from mlxserve.engine.engine import Engine, ModelCache
from mlxserve.engine.metrics import WorkerMetrics


@pytest.fixture(scope="session")
def demo_model_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture
def demo_model(demo_model_template: Path, tmp_path: Path) -> Path:
    """A private copy: tests may rewrite its files."""
    return Path(shutil.copytree(demo_model_template, tmp_path / "demo"))


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


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder(cache=ModelCache(max_models=2))
    yield rec
    rec.engine.shutdown()


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
