"""TelemetryBridge, as a program embedding the engine uses it (no Django, no Redis)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings

from mlxserve.contract import EngineError
from mlxserve.engine import TelemetryBridge
from tests.factories import free_port


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def serves(port: int) -> bool:
    try:
        scrape(port)
    except (urllib.error.URLError, ConnectionError):
        return False
    return True


def test_start_serves_stop_frees_the_port_and_both_may_repeat() -> None:
    port = free_port()
    bridge = TelemetryBridge(
        {"enabled": True, "prometheusPort": port, "serviceName": "app-1"}, host="127.0.0.1"
    )
    assert not serves(port)
    bridge.start()
    bridge.start()
    assert bridge.serving_port == port
    assert 'target_info{service_name="app-1"' in scrape(port)
    bridge.stop()
    bridge.stop()
    assert bridge.serving_port is None and not serves(port)
    bridge.start()  # again, on the same port
    assert serves(port)
    bridge.stop()


def test_a_disabled_config_serves_nothing_until_reconfigured() -> None:
    first, second = free_port(), free_port()
    bridge = TelemetryBridge({"enabled": False, "prometheusPort": first}, host="127.0.0.1").start()
    assert bridge.serving_port is None and not serves(first)
    bridge.reconfigure({"enabled": True, "prometheusPort": first})
    assert serves(first)
    bridge.reconfigure({"enabled": True, "prometheusPort": second, "serviceName": "moved"})
    assert serves(second) and not serves(first)
    assert 'service_name="moved"' in scrape(second)
    bridge.stop()


def test_a_bad_config_is_refused_with_the_error_object_and_changes_nothing() -> None:
    with pytest.raises(EngineError) as caught:
        TelemetryBridge({"enabled": True, "prometheusPort": 80})
    assert caught.value.code == "InvalidParams"
    assert caught.value.message == (
        "Validation error on field 'prometheusPort': Port must be at least 1024 (non-privileged)"
    )
    port = free_port()
    bridge = TelemetryBridge({"enabled": True, "prometheusPort": port}, host="127.0.0.1").start()
    with pytest.raises(EngineError, match="Service name must be alphanumeric"):
        bridge.reconfigure({"enabled": True, "prometheusPort": port, "serviceName": "bad name"})
    assert bridge.config.service_name == "kr-serve-mlx" and serves(port)
    bridge.stop()


def test_what_a_host_program_records_is_on_its_metrics() -> None:
    port = free_port()
    bridge = TelemetryBridge({"enabled": True, "prometheusPort": port}, host="127.0.0.1").start()
    bridge.record_model_loaded("demo", seconds=0.8)
    for gap in (None, 0.004, 0.006):
        bridge.record_token("demo", since_previous=gap)
    bridge.record_generation("demo", seconds=0.05, time_to_first_token=0.012)
    bridge.record_error("ModelNotFound", model="typo")
    bridge.record_model_unloaded("demo", reason="manual")
    text = scrape(port)
    bridge.stop()
    for line in (
        'kr_serve_models_loaded_total{bits="",group_size="",mode="",model="demo"} 1.0',
        'kr_serve_tokens_generated_total{model="demo"} 3.0',
        'kr_serve_inter_token_latency_seconds_count{model="demo"} 2.0',
        'kr_serve_generation_duration_seconds_count{model="demo"} 1.0',
        'kr_serve_time_to_first_token_seconds_bucket{le="0.025",model="demo"} 1.0',
        'kr_serve_generation_errors_total{code="ModelNotFound",model="typo"} 1.0',
        'kr_serve_errors_total{code="ModelNotFound"} 1.0',
        'kr_serve_models_unloaded_total{model="demo",reason="manual"} 1.0',
    ):
        assert line in text, line


def test_the_readme_embedding_example_runs_as_written_in_a_bare_python() -> None:
    readme = (Path(settings.BASE_DIR) / "README.md").read_text()
    example = readme.split("## Embedding", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO", "DATABASE", "REDIS"))}
    frameworks = "{'django', 'celery'}"
    check = f"\nimport sys\nprint('loaded:', sorted({{m.split('.')[0] for m in sys.modules}} & {frameworks}))"
    result = subprocess.run(
        [sys.executable, "-c", example + check],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "generationStarted 0\ntokenGenerated 1\n" in out
    assert "InvalidParams Validation error on field 'payload.model': Cannot be empty" in out
    assert re.search(r"kr_serve_tokens_generated_total\{model=\\?\"demo\\?\"\} 1\.0", out), out
    assert "Port must be at least 1024 (non-privileged)" in out
    assert "{'model': 'demo', 'port': '9464', 'warm': 'true'}" in out
    assert "loaded: []" in out
    assert "Invalid tokenGenerated payload" in result.stderr  # the refusal is logged as well


def test_a_port_offset_gives_each_worker_of_a_host_its_own_port() -> None:
    base = free_port()
    second = TelemetryBridge({"enabled": True, "prometheusPort": base - 1}, host="127.0.0.1", port_offset=1)
    second.start()
    try:
        assert second.serving_port == base and serves(base)
        second.reconfigure({"enabled": True, "prometheusPort": 65535})  # 65536: past the last port
        assert second.serving_port is None  # said in the log, never raised
    finally:
        second.stop()
