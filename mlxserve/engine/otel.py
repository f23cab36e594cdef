"""OpenTelemetry export: the process's metrics pushed over OTLP/HTTP every ``exportIntervalMs``,
and each generation as a span following the GenAI semantic conventions.

On when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the standard variable; the exporters read it and its
companions, ``OTEL_EXPORTER_OTLP_HEADERS`` and so on) is set. The metrics are the ones the
Prometheus endpoint serves, read from the same registry at each export (cumulative), so
recording a token costs nothing more with OTLP on; the official SDK's data classes and OTLP
exporters do the rest.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)

ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_ENDPOINT"
# Generations whose end never came (a worker killed mid-way, a lost event) must not hold
# spans for ever: past this many open, the oldest is ended as abandoned.
MAX_OPEN_SPANS = 1000
SCOPE = "mlxserve"


def otlp_endpoint() -> str | None:
    return os.environ.get(ENDPOINT_VARIABLE) or None


def _metrics_data(registry: CollectorRegistry, resource: Any, started_ns: int) -> Any:
    """The registry's samples as OpenTelemetry metrics (cumulative sums, gauges, histograms)."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Gauge,
        Histogram,
        HistogramDataPoint,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
        Sum,
    )
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    now = time.time_ns()
    metrics = []
    for family in registry.collect():
        if family.name == "target_info":
            continue  # the resource says it
        if family.type == "counter":
            points = [
                NumberDataPoint(dict(s.labels), started_ns, now, s.value)
                for s in family.samples
                if s.name.endswith("_total")
            ]
            data: Any = Sum(points, AggregationTemporality.CUMULATIVE, is_monotonic=True)
        elif family.type == "gauge":
            data = Gauge([NumberDataPoint(dict(s.labels), started_ns, now, s.value) for s in family.samples])
        elif family.type == "histogram":
            series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
            for s in family.samples:
                labels = {k: v for k, v in s.labels.items() if k != "le"}
                entry = series.setdefault(tuple(sorted(labels.items())), {"buckets": [], "labels": labels})
                if s.name.endswith("_bucket"):
                    entry["buckets"].append((float(s.labels["le"]), s.value))
                elif s.name.endswith("_count"):
                    entry["count"] = s.value
                elif s.name.endswith("_sum"):
                    entry["sum"] = s.value
            histogram_points = []
            for entry in series.values():
                cumulative = sorted(entry["buckets"])
                bounds = [le for le, _ in cumulative if le != float("inf")]
                counts = [int(c - (cumulative[i - 1][1] if i else 0)) for i, (_, c) in enumerate(cumulative)]
                histogram_points.append(
                    HistogramDataPoint(
                        entry["labels"],
                        started_ns,
                        now,
                        count=int(entry.get("count", 0)),
                        sum=entry.get("sum", 0.0),
                        bucket_counts=counts,
                        explicit_bounds=bounds,
                        min=None,  # type: ignore[arg-type]  # Prometheus keeps neither: left out
                        max=None,  # type: ignore[arg-type]
                    )
                )
            data = Histogram(histogram_points, AggregationTemporality.CUMULATIVE)
        else:
            continue
        metrics.append(
            Metric(family.name, family.documentation, "s" if family.name.endswith("_seconds") else None, data)
        )
    scope = ScopeMetrics(InstrumentationScope(SCOPE), metrics, schema_url="")
    return MetricsData([ResourceMetrics(resource, [scope], schema_url="")])


class OtlpExport:
    """Pushes ``registry`` every ``interval_seconds`` and traces generations, until ``stop()``."""

    def __init__(
        self, registry: CollectorRegistry, *, service_name: str, source: str, interval_seconds: float
    ) -> None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.registry = registry
        self.interval_seconds = interval_seconds
        self.resource = Resource.create({"service.name": service_name, "service.instance.id": source})
        self._metric_exporter = OTLPMetricExporter()
        self._tracer_provider = TracerProvider(resource=self.resource)
        self._tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=int(interval_seconds * 1000))
        )
        self.tracer = self._tracer_provider.get_tracer(SCOPE)
        self._started_ns = time.time_ns()
        self._stop = threading.Event()
        self._spans: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="otlp-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            self.export_metrics()

    def export_metrics(self) -> None:
        try:
            self._metric_exporter.export(_metrics_data(self.registry, self.resource, self._started_ns))
        except Exception:  # an unreachable collector must never reach the host program
            logger.exception("OTLP metrics export failed")

    # -- generations as spans (an emitter listener) ----------------------------------------

    def on_event(self, envelope: Any) -> None:
        """Open a span at ``generationStarted``, note the first token, close it at
        ``generationCompleted`` or ``error`` (GenAI semantic conventions)."""
        from opentelemetry.trace import Status, StatusCode

        key = str(getattr(envelope, "generation_id", None) or "")
        kind, payload, at = envelope.type, envelope.payload, envelope.timestamp * 1_000_000
        if not key:
            return
        with self._lock:
            if kind == "generationStarted":
                attributes: dict[str, Any] = {
                    "gen_ai.operation.name": "text_completion",
                    "gen_ai.provider.name": "mlx",
                    "gen_ai.request.model": payload.model,
                }
                if isinstance(payload.max_tokens, int):
                    attributes["gen_ai.request.max_tokens"] = payload.max_tokens
                metadata = payload.metadata if isinstance(payload.metadata, dict) else {}
                for name, attribute in (
                    ("temperature", "gen_ai.request.temperature"),
                    ("topP", "gen_ai.request.top_p"),
                ):
                    if isinstance(metadata.get(name), int | float):
                        attributes[attribute] = metadata[name]
                if len(self._spans) >= MAX_OPEN_SPANS:
                    oldest = self._spans.pop(next(iter(self._spans)))[0]
                    oldest.set_attribute("error.type", "abandoned")
                    oldest.set_status(Status(StatusCode.ERROR, "No end was heard of"))
                    oldest.end()
                self._spans[key] = [
                    self.tracer.start_span(
                        f"text_completion {payload.model}", start_time=at, attributes=attributes
                    ),
                    at,
                    False,
                ]
                return
            entry = self._spans.get(key)
            if entry is None:
                return
            span, started, first_seen = entry
            if kind == "tokenGenerated" and not first_seen:
                entry[2] = True
                span.set_attribute("gen_ai.response.time_to_first_token", (at - started) / 1e9)
                span.add_event("gen_ai.first_token", timestamp=at)
            elif kind == "generationCompleted":
                span.set_attribute("gen_ai.usage.output_tokens", payload.tokens_generated)
                span.set_attribute("gen_ai.response.model", payload.model)
                reason = (
                    (payload.metadata or {}).get("finishReason")
                    if isinstance(payload.metadata, dict)
                    else None
                )
                span.set_attribute("gen_ai.response.finish_reasons", [reason or "stop"])
                span.end(end_time=at)
                del self._spans[key]
            elif kind == "error":
                span.set_attribute("error.type", payload.code or "error")
                span.set_status(Status(StatusCode.ERROR, payload.error))
                span.end(end_time=at)
                del self._spans[key]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.export_metrics()  # what was recorded since the last push
        self._metric_exporter.shutdown()
        self._tracer_provider.shutdown()  # flushes the spans
