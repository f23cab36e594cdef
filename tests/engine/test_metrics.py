from __future__ import annotations

import logging
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from events.ingest import EventIngester
from events.models import Event
from mlxserve.contract.telemetry import OVERFLOW_LABEL_VALUE
from mlxserve.contract.validation import EngineError
from mlxserve.engine.engine import GenerationRequest
from mlxserve.engine.metrics import MetricsExporter, WorkerMetrics
from mlxserve.engine.runtime import RuntimeSettings, WorkerRuntime
from telemetry.services import telemetry_config_replace
from tests.factories import TEST_REDIS_URL, free_port, stream_envelopes

MLX_SERVING_METRICS = [
    "kr_serve_models_loaded",
    "kr_serve_models_unloaded",
    "kr_serve_model_load_duration_seconds",
    "kr_serve_tokens_generated",
    "kr_serve_generation_duration_seconds",
    "kr_serve_generation_errors",
    "kr_serve_ipc_requests",
    "kr_serve_ipc_request_duration_seconds",
    "kr_serve_ipc_requests_in_flight",
    "kr_serve_batch_operations",
    "kr_serve_batch_size",
    "kr_serve_batch_efficiency",
    "kr_serve_errors",
    "kr_serve_retry_attempts",
    "kr_serve_circuit_breaker_state_changes",
]


def scrape(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def serves(port: int) -> bool:
    try:
        scrape(port)
        return True
    except (urllib.error.URLError, ConnectionError):
        return False


def wait_until(condition: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    """The sum of the samples named ``sample`` whose labels include ``labels``."""
    return sum(
        s.value
        for family in families.values()
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def identity(port: int) -> dict[str, str]:
    [info] = [s for f in scrape(port).values() for s in f.samples if s.name == "target_info"]
    return dict(info.labels)


def test_the_exporter_starts_moves_and_stops() -> None:
    metrics = WorkerMetrics()
    exporter = MetricsExporter(metrics.registry, host="127.0.0.1")
    first, second = free_port(), free_port()
    try:
        exporter.apply(enabled=True, port=first)
        families = scrape(first)
        assert set(MLX_SERVING_METRICS) <= set(families)
        assert families["kr_serve_ipc_requests_in_flight"].type == "gauge"
        exporter.apply(enabled=True, port=second)
        assert serves(second) and not serves(first)
        exporter.apply(enabled=False, port=second)
        assert not serves(second)
    finally:
        exporter.close()


def test_a_port_in_use_is_logged_and_retried_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    exporter = MetricsExporter(WorkerMetrics().registry, host="127.0.0.1", retry_seconds=0.2)
    try:
        with caplog.at_level(logging.ERROR):
            exporter.apply(enabled=True, port=port)
        assert f"Cannot serve worker metrics on port {port}" in caplog.text
        assert exporter.serving_port is None
        squatter.close()
        assert wait_until(lambda: exporter.serving_port == port)
        assert serves(port)
    finally:
        squatter.close()
        exporter.close()


def test_latency_histograms_have_buckets_from_one_millisecond() -> None:
    metrics = WorkerMetrics()
    metrics.time_to_first_token.labels(model="m").observe(0.0005)
    metrics.inter_token_latency.labels(model="m").observe(0.0015)
    registry = metrics.registry
    assert (
        registry.get_sample_value(
            "kr_serve_time_to_first_token_seconds_bucket", {"model": "m", "le": "0.001"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "kr_serve_inter_token_latency_seconds_bucket", {"model": "m", "le": "0.001"}
        )
        == 0
    )
    assert (
        registry.get_sample_value(
            "kr_serve_inter_token_latency_seconds_bucket", {"model": "m", "le": "0.0025"}
        )
        == 1
    )


def runtime_settings_for_tests(settings: Any, tmp_path: Path, **overrides: Any) -> RuntimeSettings:
    """A worker runtime's settings on the test Redis keys (``overrides`` replace any)."""
    values: dict[str, Any] = {
        "redis_url": TEST_REDIS_URL,
        "stream": settings.EVENTS_STREAM,
        "config_key": settings.TELEMETRY_CONFIG_KEY,
        "control_channel": "test:control",
        "source": "test-host/worker-1",
        "spool_dir": tmp_path / "spool",
        "metrics_host": "127.0.0.1",
    }
    return RuntimeSettings(**{**values, **overrides})


@pytest.fixture
def runtime(redis_client: redis.Redis, settings: Any, tmp_path: Path) -> Any:
    rt = WorkerRuntime(runtime_settings_for_tests(settings, tmp_path), client=redis_client).start()
    yield rt
    rt.shutdown()


@pytest.mark.django_db
def test_a_config_saved_reaches_the_running_worker_within_a_second(runtime: WorkerRuntime) -> None:
    port, other = free_port(), free_port()
    telemetry_config_replace(
        data={"enabled": True, "prometheusPort": port, "serviceName": "fleet-a", "exportIntervalMs": 1000},
        user=None,
        via="api",
    )
    assert wait_until(lambda: serves(port), timeout=1.0)
    assert identity(port) == {"service_name": "fleet-a", "source": "test-host/worker-1"}
    assert runtime.engine.heartbeat_seconds == 1.0

    telemetry_config_replace(
        data={"enabled": True, "prometheusPort": other, "serviceName": "fleet-b"}, user=None, via="api"
    )
    assert wait_until(lambda: serves(other), timeout=1.0)
    assert not serves(port)
    assert identity(other)["service_name"] == "fleet-b"

    telemetry_config_replace(data={"enabled": False, "prometheusPort": other}, user=None, via="api")
    assert wait_until(lambda: not serves(other), timeout=1.0)


@pytest.mark.django_db
def test_exported_counters_agree_with_the_events_stored(
    runtime: WorkerRuntime, demo_model: Path, redis_client: redis.Redis, settings: Any
) -> None:
    port = free_port()
    telemetry_config_replace(data={"enabled": True, "prometheusPort": port}, user=None, via="api")
    assert wait_until(lambda: serves(port), timeout=1.0)
    for tokens in (5, 9):
        runtime.engine.generate(GenerationRequest(model=str(demo_model), prompt="a", max_tokens=tokens))
    with pytest.raises(EngineError):
        runtime.engine.generate(GenerationRequest(model="no-such-model", prompt="a", max_tokens=3))
    runtime.engine.unload(str(demo_model))
    assert runtime.publisher.flush(timeout=10)
    families = scrape(port)
    ingester = EventIngester(
        client=redis_client,
        stream=settings.EVENTS_STREAM,
        group=settings.EVENTS_CONSUMER_GROUP,
        consumer="c",
        block_ms=10,
    )
    while ingester.step().stored:
        pass
    stored = Event.objects
    assert (
        value(families, "kr_serve_tokens_generated_total")
        == stored.filter(type="tokenGenerated").count()
        == 14
    )
    assert value(families, "kr_serve_models_loaded_total") == stored.filter(type="modelLoaded").count() == 1
    assert (
        value(families, "kr_serve_models_unloaded_total") == stored.filter(type="modelUnloaded").count() == 1
    )
    assert (
        value(families, "kr_serve_generation_errors_total", code="ModelNotFound")
        == stored.filter(type="error", payload__code="ModelNotFound").count()
        == 1
    )
    assert (
        value(families, "kr_serve_generation_duration_seconds_count")
        == stored.filter(type="generationCompleted").count()
        == 2
    )
    assert value(families, "kr_serve_time_to_first_token_seconds_count") == 2
    assert value(families, "kr_serve_inter_token_latency_seconds_count") == 14 - 2
    assert value(families, "kr_serve_batch_operations_total") >= 1
    assert value(families, "kr_serve_ipc_requests_total", operation="xadd") == value(
        families, "kr_serve_batch_operations_total"
    )
    # Every event went out in some batch: the batch sizes add up to what reached the stream.
    assert value(families, "kr_serve_batch_size_sum") == len(
        stream_envelopes(redis_client, settings.EVENTS_STREAM)
    )
    assert value(families, "kr_serve_batch_operations_total") == redis_client.xlen(settings.EVENTS_STREAM)


def samples_by_model(metrics: WorkerMetrics, name: str) -> dict[str, float]:
    return {
        s.labels["model"]: s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == name
    }


def test_a_worker_bounds_model_labels_and_keeps_every_count(demo_model: Path, tmp_path: Path) -> None:
    """Past the label limit a worker counts new model names under the overflow series;
    a registered name (the task came with its path) always has its own."""
    from tests.factories import Recorder

    rec = Recorder()
    rec.metrics.label_budget.limit = 1
    copy = Path(shutil.copytree(demo_model, tmp_path / "copy"))
    for request in (
        GenerationRequest(model=str(demo_model), prompt="a", max_tokens=3),
        GenerationRequest(model=str(copy), prompt="a", max_tokens=4),
        GenerationRequest(model="demo", model_path=str(demo_model), prompt="a", max_tokens=5),
    ):
        rec.engine.generate(request)
    for i in range(4):
        with pytest.raises(EngineError):
            rec.engine.generate(GenerationRequest(model=f"typo-{i}", prompt="a", max_tokens=3))
    rec.engine.shutdown()
    assert samples_by_model(rec.metrics, "kr_serve_tokens_generated_total") == {
        str(demo_model): 3,
        OVERFLOW_LABEL_VALUE: 4,
        "demo": 5,
    }
    assert sum(samples_by_model(rec.metrics, "kr_serve_tokens_generated_total").values()) == len(
        rec.events("tokenGenerated")
    )
    # Another metric, its own budget: the first failing name has a place, the rest share one.
    assert samples_by_model(rec.metrics, "kr_serve_generation_errors_total") == {
        "typo-0": 1,
        OVERFLOW_LABEL_VALUE: 3,
    }
    assert samples_by_model(rec.metrics, "kr_serve_models_loaded_total") == {
        str(demo_model): 1,
        OVERFLOW_LABEL_VALUE: 1,
        "demo": 1,
    }


def test_the_worker_label_limit_comes_from_the_setting(settings: Any) -> None:
    from mlxserve.host.worker import runtime_settings_from_django

    settings.METRIC_LABEL_LIMIT = 7
    assert runtime_settings_from_django(source="s").metric_label_limit == 7


@pytest.mark.django_db
def test_a_heartbeat_setting_of_its_own_outlasts_config_changes(
    redis_client: redis.Redis, settings: Any, tmp_path: Path
) -> None:
    rt = WorkerRuntime(
        runtime_settings_for_tests(settings, tmp_path, source="test-host/worker-2", heartbeat_seconds=7),
        client=redis_client,
    ).start()
    try:
        assert rt.engine.heartbeat_seconds == 7
        telemetry_config_replace(data={"enabled": False, "exportIntervalMs": 1000}, user=None, via="api")
        assert wait_until(lambda: rt.config is not None and rt.config.export_interval_ms == 1000, timeout=2.0)
        assert rt.engine.heartbeat_seconds == 7
    finally:
        rt.shutdown()


def test_observing_many_latencies_at_once_exposes_what_one_at_a_time_does() -> None:
    """A generation's inter-token latencies are observed a batch at a time (``observe_many``):
    the scrape shows the same buckets, count and sum as observing each, edges included."""
    from prometheus_client import generate_latest

    from mlxserve.engine.metrics import observe_many

    amounts = [0.0, 0.001, 0.0010000001, 0.0025, 0.004, 0.5, 1e-9, 3.0, 59.0, 1e12, 0.001, 0.25]
    one, many = WorkerMetrics(), WorkerMetrics()
    for amount in amounts:
        one.inter_token_latency.labels(model="m").observe(amount)
    observe_many(many.inter_token_latency.labels(model="m"), amounts[:5])
    observe_many(many.inter_token_latency.labels(model="m"), amounts[5:])
    observe_many(many.inter_token_latency.labels(model="m"), [])

    def scraped(metrics: WorkerMetrics) -> dict[str, float]:
        text = generate_latest(metrics.registry).decode()
        return {
            f"{s.name}{sorted(s.labels.items())}": s.value
            for family in text_string_to_metric_families(text)
            if family.name == "kr_serve_inter_token_latency_seconds"
            for s in family.samples
            if not s.name.endswith("_created")
        }

    expected, got = scraped(one), scraped(many)
    assert got.keys() == expected.keys() and len(got) > 10
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    # A value no bucket bound holds (NaN) takes the one-at-a-time way: counted as observe counts it.
    observe_many(many.inter_token_latency.labels(model="n"), [0.1, float("nan")])
    assert many.registry.get_sample_value("kr_serve_inter_token_latency_seconds_count", {"model": "n"}) == 1
