from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlxserve.contract.events import envelope_to_wire
from mlxserve.engine.demo_model import create_demo_model
from mlxserve.engine.emitter import CollectingPublisher, EngineEventEmitter
from mlxserve.engine.engine import Engine, ModelCache
from mlxserve.engine.metrics import WorkerMetrics
from tests.conftest import RedisServer, free_port, own_redis  # noqa: F401  (shared fixtures)


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
