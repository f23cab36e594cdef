"""The package boundaries: the contract and the engine load neither Django nor Celery (the contract
no Redis client either), and lint-imports holds every package to its place."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

from django.conf import settings

ROOT = Path(settings.BASE_DIR)
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def packages_loaded(*modules: str) -> set[str]:
    """The top-level packages a fresh interpreter has loaded once it has imported ``modules``."""
    code = (
        f"import sys\nimport {', '.join(modules)}\nprint(sorted({{m.split('.')[0] for m in sys.modules}}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(ast.literal_eval(result.stdout))


def test_importing_the_contract_and_the_engine_loads_neither_django_nor_celery() -> None:
    loaded = packages_loaded(
        "mlxserve.contract",
        "mlxserve.engine",
        "mlxserve.contract.control",
        "mlxserve.contract.events",
        "mlxserve.contract.stream",
        "mlxserve.contract.telemetry",
        "mlxserve.contract.validation",
        "mlxserve.engine.runtime",
        "mlxserve.engine.demo_model",
    )
    assert "mlxserve" in loaded and "msgspec" in loaded
    assert not loaded & {"django", "celery", "kombu", "rest_framework", "events", "telemetry"}


def test_the_contract_alone_loads_no_redis_client() -> None:
    """The contract says what goes over Redis; reading and writing it is ``mlxserve.bus``'s."""
    loaded = packages_loaded(
        "mlxserve.contract",
        "mlxserve.contract.control",
        "mlxserve.contract.stream",
        "mlxserve.contract.telemetry",
        "mlxserve.contract.serving",
        "mlxserve.contract.generations",
    )
    assert "msgspec" in loaded and "redis" not in loaded


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True)


def project_copy(tmp_path: Path) -> Path:
    for package in ("mlxserve", "events", "telemetry", "serving"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_lint_imports_passes_here_and_fails_on_a_wrong_import(tmp_path: Path) -> None:
    root = project_copy(tmp_path)
    kept = lint_imports(root)
    assert kept.returncode == 0, kept.stdout
    assert "0 broken" in kept.stdout

    # An engine module reaching for Django, as a hurried fix might.
    (root / "mlxserve" / "engine" / "shortcut.py").write_text("from django.conf import settings\n")
    broken = lint_imports(root)
    assert broken.returncode == 1
    assert "The engine and the bus import none of the apps, nor Django or Celery BROKEN" in broken.stdout
    assert "mlxserve.engine.shortcut -> django" in broken.stdout


def test_a_new_module_is_held_to_its_packages_place_without_editing_a_list(tmp_path: Path) -> None:
    root = project_copy(tmp_path)
    # A new module of the web side that reads the events app, as the /metrics view once did.
    (root / "mlxserve" / "web" / "fleet_page.py").write_text("from events.models import Worker\n")
    # A new module of the worker host reaching into the web side.
    (root / "mlxserve" / "host" / "status.py").write_text("from mlxserve.web.api import CanRead\n")
    # A new module at the top of the project package, in no layer yet.
    (root / "mlxserve" / "helpers.py").write_text("X = 1\n")
    broken = lint_imports(root)
    assert broken.returncode == 1
    assert "mlxserve.web.fleet_page -> events.models" in broken.stdout
    assert "mlxserve.host.status -> mlxserve.web.api" in broken.stdout
    assert "mlxserve.helpers" in broken.stdout and "exhaustive" in broken.stdout
