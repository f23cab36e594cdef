"""A worker's Prometheus metrics, defined once, and the endpoint that serves them.

The fifteen metrics of mlx-serving keep its ``kr_serve_`` names, in base
units (seconds, not milliseconds), plus time-to-first-token and inter-token
latency histograms with buckets from 1 ms. Each worker process has its own
registry: metrics are recorded whether or not telemetry is enabled (it costs
next to nothing); the config decides whether and on which port they are served.
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

from mlxserve.contract.telemetry import (
    BOUNDED_LABELS,
    DEFAULT_METRIC_LABEL_LIMIT,
    DURATION_BUCKETS,
    LABEL_VALUE_LENGTH,
    LATENCY_BUCKETS,
    OVERFLOW_LABEL_VALUE,
    metric_labels_validate,
)

logger = logging.getLogger(__name__)

LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
IPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)
GENERATION_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
RATIO_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def observe_many(histogram: Any, amounts: list[float]) -> None:
    """``histogram.observe(a)`` for each of ``amounts`` (a labelled child), each bucket and the
    sum incremented once for the lot: what a generation's batch of inter-token latencies
    needs, at a fraction of one lock round per value. A histogram without the attributes this
    reads (another prometheus-client) is observed value by value."""
    if not amounts:
        return
    bounds, buckets, total = (
        getattr(histogram, name, None) for name in ("_upper_bounds", "_buckets", "_sum")
    )
    if bounds is None or buckets is None or total is None or not all(math.isfinite(a) for a in amounts):
        for amount in amounts:
            histogram.observe(amount)
        return
    counts = collections.Counter(bisect.bisect_left(bounds, amount) for amount in amounts)
    total.inc(math.fsum(amounts))
    for index, count in counts.items():
        buckets[index].inc(count)  # the last bound is +Inf: every finite value has a bucket


class LabelBudget:
    """Bounds the values of each label of each metric, as the control plane does.

    A value gets its own series if it has one already, if it is a registered model
    name (the worker knows a name is registered when the task came with the path
    it stands for), or while its label of that metric has fewer than ``limit``
    values; after that it is counted under ``OVERFLOW_LABEL_VALUE``.
    """

    def __init__(self, limit: int = DEFAULT_METRIC_LABEL_LIMIT) -> None:
        self.limit = limit
        self.registered_models: set[str] = set()
        self._admitted: dict[tuple[str, str], set[str]] = {}
        self._lock = threading.Lock()

    def value(self, metric: str, label: str, value: str) -> str:
        value = value[:LABEL_VALUE_LENGTH]
        if label not in BOUNDED_LABELS or value == "":
            return value
        with self._lock:
            admitted = self._admitted.setdefault((metric, label), set())
            if value in admitted:
                return value
            if label == "model" and value in self.registered_models:
                admitted.add(value)
                return value
            if len(admitted - self.registered_models) < self.limit:
                admitted.add(value)
                return value
        return OVERFLOW_LABEL_VALUE


class WorkerMetrics:
    def __init__(self, *, label_limit: int = DEFAULT_METRIC_LABEL_LIMIT) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.label_budget = LabelBudget(label_limit)
        r = self.registry
        # Model lifecycle
        self.models_loaded = Counter(
            "kr_serve_models_loaded",
            "Models loaded from disk (cache misses), by how their weights are stored",
            ["model", "bits", "group_size", "mode"],
            registry=r,
        )
        self.models_unloaded = Counter(
            "kr_serve_models_unloaded",
            "Models dropped from memory, by reason",
            ["model", "reason"],
            registry=r,
        )
        self.model_load_duration = Histogram(
            "kr_serve_model_load_duration_seconds",
            "Time mlx_lm.load took",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        # Generation
        self.tokens_generated = Counter(
            "kr_serve_tokens_generated", "Tokens generated", ["model"], registry=r
        )
        self.generation_duration = Histogram(
            "kr_serve_generation_duration_seconds",
            "Whole generation, prompt processing included",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.generation_errors = Counter(
            "kr_serve_generation_errors",
            "Generations that failed, by error code",
            ["model", "code"],
            registry=r,
        )
        # Continuous batching (engine.scheduler), as vLLM's num_requests_running / _waiting
        self.requests_running = Gauge(
            "kr_serve_requests_running", "Generations this worker is running now", registry=r
        )
        self.requests_waiting = Gauge(
            "kr_serve_requests_waiting",
            "Generations this worker has taken that wait for room (concurrency or memory)",
            registry=r,
        )
        self.generation_batch_size = Histogram(
            "kr_serve_generation_batch_size",
            "Sequences that made a token in one generation step (1: a generation running alone)",
            buckets=GENERATION_BATCH_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "kr_serve_time_to_first_token_seconds",
            "From generation start to the first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "kr_serve_inter_token_latency_seconds",
            "Between consecutive tokens of a generation",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # IPC: here, the worker's requests to Redis (event batches, heartbeats).
        self.ipc_requests = Counter(
            "kr_serve_ipc_requests", "Requests from the worker to Redis", ["operation"], registry=r
        )
        self.ipc_request_duration = Histogram(
            "kr_serve_ipc_request_duration_seconds",
            "Duration of requests to Redis",
            ["operation"],
            buckets=IPC_BUCKETS,
            registry=r,
        )
        self.ipc_requests_in_flight = Gauge(
            "kr_serve_ipc_requests_in_flight", "Requests to Redis under way", registry=r
        )
        # Batching of events on their way to Redis
        self.batch_operations = Counter(
            "kr_serve_batch_operations", "Event batches sent to the Redis stream", registry=r
        )
        self.batch_size = Histogram(
            "kr_serve_batch_size", "Events per batch sent", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_efficiency = Histogram(
            "kr_serve_batch_efficiency",
            "Batch fill: events sent / largest batch allowed",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        # Errors and resilience
        self.errors = Counter("kr_serve_errors", "Errors of every kind, by code", ["code"], registry=r)
        self.retry_attempts = Counter(
            "kr_serve_retry_attempts", "Retries of a failed request to Redis", ["operation"], registry=r
        )
        self.circuit_breaker_state_changes = Counter(
            "kr_serve_circuit_breaker_state_changes",
            "Circuit-breaker transitions, by new state",
            ["state"],
            registry=r,
        )
        # OpenTelemetry's convention for naming the service a target is.
        self.target_info = Gauge(
            "target_info", "The worker behind this endpoint", ["service_name", "source"], registry=r
        )

    def labels(self, **labels: Any) -> dict[str, str]:
        """Label sets go through the contract's metric label validation."""
        return metric_labels_validate(labels)

    def series(self, metric: MetricWrapperBase, **labels: Any) -> Any:
        """``metric``'s child for ``labels``: validated, and each value from a request or an
        event within the label budget (past it, the overflow value)."""
        name = metric._name
        return metric.labels(
            **{k: self.label_budget.value(name, k, v) for k, v in metric_labels_validate(labels).items()}
        )

    def set_identity(self, *, service_name: str, source: str) -> None:
        self.target_info.clear()
        self.target_info.labels(**self.labels(service_name=service_name, source=source)).set(1)


class MetricsExporter:
    """Serves a registry on a port; moves, stops and retries as the config says.

    A port already in use is logged and retried every ``retry_seconds``
    instead of crashing the worker.
    """

    def __init__(
        self, registry: CollectorRegistry, *, host: str = "0.0.0.0", retry_seconds: float = 5.0
    ) -> None:
        self.registry = registry
        self.host = host
        self.retry_seconds = retry_seconds
        self.port: int | None = None  # the port wanted; None when disabled
        self.serving_port: int | None = None
        self._server: Any = None
        self._lock = threading.Lock()
        self._retry = threading.Event()
        self._closed = False
        self._retrier = threading.Thread(target=self._retry_loop, name="metrics-exporter-retry", daemon=True)
        self._retrier.start()

    def apply(self, *, enabled: bool, port: int) -> None:
        with self._lock:
            wanted = port if enabled else None
            self.port = wanted
            if self.serving_port == wanted:
                return
            self._stop_server()
            if wanted is not None:
                self._try_start(wanted)

    def _try_start(self, port: int) -> None:
        try:
            self._server, _thread = start_http_server(port, addr=self.host, registry=self.registry)
            self.serving_port = port
            logger.info("Worker metrics on http://%s:%d/metrics", self.host, port)
        except OSError as exc:
            logger.error(
                "Cannot serve worker metrics on port %d (%s); retrying every %.0fs",
                port,
                exc,
                self.retry_seconds,
            )
            self._retry.set()

    def _stop_server(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            logger.info("Worker metrics endpoint on port %s stopped", self.serving_port)
        self._server = None
        self.serving_port = None

    def _retry_loop(self) -> None:
        while not self._closed:
            self._retry.wait()
            if self._closed:
                return
            time.sleep(self.retry_seconds)
            with self._lock:
                self._retry.clear()
                if self.port is not None and self.serving_port != self.port:
                    self._try_start(self.port)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.port = None
            self._stop_server()
            self._retry.set()
