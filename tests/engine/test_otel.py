"""OTLP export against a real OTLP/HTTP receiver that decodes the protobuf requests."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from mlxserve.engine import EngineEventEmitter, TelemetryBridge
from tests.factories import free_port


class Receiver:
    def __init__(self) -> None:
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.traces: list[ExportTraceServiceRequest] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/metrics":
                    receiver.metrics.append(ExportMetricsServiceRequest.FromString(body))
                elif self.path == "/v1/traces":
                    receiver.traces.append(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def metric(self, name: str) -> Any:
        """The latest export's metric called ``name``."""
        for request in reversed(self.metrics):
            for resource in request.resource_metrics:
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        if metric.name == name:
                            return metric
        return None


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    found = Receiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", found.url)
    yield found
    found.server.shutdown()


def attributes(items: Any) -> dict[str, Any]:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in items}


def test_metrics_are_pushed_every_export_interval_with_the_service_as_resource(receiver: Receiver) -> None:
    config = {
        "enabled": True,
        "prometheusPort": free_port(),
        "exportIntervalMs": 1000,
        "serviceName": "otel-app",
    }
    bridge = TelemetryBridge(config, source="host-1/app", host="127.0.0.1").start()
    for gap in (None, 0.004, 0.003):
        bridge.record_token("demo", since_previous=gap)
    bridge.record_generation("demo", seconds=0.2, time_to_first_token=0.02)
    deadline = time.monotonic() + 10
    while len(receiver.metrics) < 2 and time.monotonic() < deadline:  # two pushes: a period, not a one-off
        time.sleep(0.1)
    bridge.stop()
    assert len(receiver.metrics) >= 2
    resource = attributes(receiver.metrics[-1].resource_metrics[0].resource.attributes)
    assert resource["service.name"] == "otel-app" and resource["service.instance.id"] == "host-1/app"
    tokens = receiver.metric("kr_serve_tokens_generated")
    assert tokens.sum.is_monotonic and tokens.sum.aggregation_temporality == 2  # cumulative
    [point] = tokens.sum.data_points
    assert point.as_double == 3 and attributes(point.attributes) == {"model": "demo"}
    ttft = receiver.metric("kr_serve_time_to_first_token_seconds")
    [histogram] = ttft.histogram.data_points
    assert histogram.count == 1 and histogram.sum == pytest.approx(0.02)
    assert list(histogram.explicit_bounds)[:3] == [0.001, 0.0025, 0.005]
    assert sum(histogram.bucket_counts) == 1 and ttft.unit == "s"


def test_each_generation_is_a_genai_span(receiver: Receiver) -> None:
    bridge = TelemetryBridge(
        {"enabled": True, "prometheusPort": free_port(), "exportIntervalMs": 1000}, host="127.0.0.1"
    )
    bridge.start()
    emitter = EngineEventEmitter(source="host-1/app")
    bridge.observe(emitter)
    good, bad = uuid.uuid4(), uuid.uuid4()
    emitter.generation_started(
        generation_id=good,
        model="demo",
        prompt="Hi",
        max_tokens=3,
        metadata={"temperature": 0.7, "topP": 0.9},
    )
    time.sleep(0.02)
    for seq in (1, 2, 3):
        emitter.token_generated(generation_id=good, seq=seq, model="demo", token=f"t{seq}")
    emitter.generation_completed(
        generation_id=good,
        seq=4,
        model="demo",
        tokens_generated=3,
        duration_ms=30.0,
        metadata={"finishReason": "length"},
    )
    emitter.generation_started(generation_id=bad, model="nope", prompt="Hi")
    emitter.error(
        error="Model 'nope' not found", code="ModelNotFound", model="nope", generation_id=bad, seq=1
    )
    bridge.stop()  # flushes the spans
    spans = [
        span
        for request in receiver.traces
        for r in request.resource_spans
        for s in r.scope_spans
        for span in s.spans
    ]
    by_name = {span.name: span for span in spans}
    assert set(by_name) == {"text_completion demo", "text_completion nope"}
    done = by_name["text_completion demo"]
    done_attributes = attributes(done.attributes)
    assert done_attributes["gen_ai.request.model"] == "demo"
    assert done_attributes["gen_ai.operation.name"] == "text_completion"
    assert done_attributes["gen_ai.request.max_tokens"] == 3
    assert done_attributes["gen_ai.request.temperature"] == pytest.approx(0.7)
    assert done_attributes["gen_ai.usage.output_tokens"] == 3
    assert done_attributes["gen_ai.response.time_to_first_token"] >= 0.02
    assert [e.name for e in done.events] == ["gen_ai.first_token"]
    assert done.status.code != 2  # not an error
    failed = by_name["text_completion nope"]
    assert failed.status.code == 2 and failed.status.message == "Model 'nope' not found"  # STATUS_CODE_ERROR
    assert attributes(failed.attributes)["error.type"] == "ModelNotFound"


def test_without_the_endpoint_variable_nothing_is_pushed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    bridge = TelemetryBridge({"enabled": True, "prometheusPort": free_port()}, host="127.0.0.1").start()
    assert bridge._otlp is None
    bridge.stop()


def test_generations_that_never_end_do_not_hold_spans_for_ever(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlxserve.engine import otel

    monkeypatch.setattr(otel, "MAX_OPEN_SPANS", 3)
    bridge = TelemetryBridge({"enabled": True, "prometheusPort": free_port()}, host="127.0.0.1").start()
    emitter = EngineEventEmitter(source="host-1/app")
    bridge.observe(emitter)
    for _ in range(5):  # started, then nothing: a worker killed mid-way
        emitter.generation_started(generation_id=uuid.uuid4(), model="demo", prompt="Hi")
    assert bridge._otlp is not None and len(bridge._otlp._spans) == 3
    bridge.stop()
    spans = [
        span
        for request in receiver.traces
        for r in request.resource_spans
        for s in r.scope_spans
        for span in s.spans
    ]
    assert len(spans) == 2
    assert all(attributes(s.attributes)["error.type"] == "abandoned" and s.status.code == 2 for s in spans)
