from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlxserve.engine.demo_model import create_demo_model
from mlxserve.engine.models import ModelCache
from tests.factories import Recorder


@pytest.fixture(scope="session")
def demo_model_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture
def demo_model(demo_model_template: Path, tmp_path: Path) -> Path:
    """A private copy: tests may rewrite its files."""
    return Path(shutil.copytree(demo_model_template, tmp_path / "demo"))


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder(cache=ModelCache(max_models=2))
    yield rec
    rec.engine.shutdown()
