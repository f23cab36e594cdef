"""The telemetry config applied to one process: ``TelemetryBridge``.

For a program that embeds the engine (no Django, no Redis) as much as for the worker
runtime: the bridge validates a telemetry config (refusing a bad one with the error
object, ``EngineError``), serves the process's metrics in the Prometheus text format on
``prometheusPort`` while ``enabled``, follows a new config live, and records the
metrics through methods a host program calls.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from typing import Any

from mlxserve.contract.telemetry import TelemetryConfigSchema, telemetry_config_validate
from mlxserve.engine.emitter import EngineEventEmitter
from mlxserve.engine.metrics import MetricsExporter, WorkerMetrics
from mlxserve.engine.otel import OtlpExport, otlp_endpoint


def _validated(config: Mapping[str, Any] | TelemetryConfigSchema) -> TelemetryConfigSchema:
    if isinstance(config, TelemetryConfigSchema):
        return config
    return telemetry_config_validate(config)  # raises ValidationFailed, an EngineError


logger = logging.getLogger(__name__)


class TelemetryBridge:
    """``TelemetryBridge({"enabled": True, "prometheusPort": 9464})``: a config in its wire
    form (camelCase) or a ``TelemetryConfig``; a bad one raises ``EngineError`` (code
    ``InvalidParams``, the contract's messages). ``start()`` serves ``/metrics`` when the
    config is enabled, ``stop()`` frees the port; both may be called again. A port in use
    is logged and retried, never raised.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | TelemetryConfigSchema,
        *,
        source: str | None = None,
        host: str = "0.0.0.0",
        metrics: WorkerMetrics | None = None,
        retry_seconds: float = 5.0,
        port_offset: int = 0,
    ) -> None:
        self.config = _validated(config)
        # Several workers on one host: worker n serves on prometheusPort + its offset.
        self.port_offset = port_offset
        self.source = source or socket.gethostname()
        self.host = host
        self.retry_seconds = retry_seconds
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self.metrics.set_identity(service_name=self.config.service_name, source=self.source)
        self._exporter: MetricsExporter | None = None
        self._otlp: OtlpExport | None = None
        self._observed: list[EngineEventEmitter] = []

    @property
    def serving_port(self) -> int | None:
        """The port ``/metrics`` is served on now (None: not serving)."""
        return self._exporter.serving_port if self._exporter is not None else None

    def start(self) -> TelemetryBridge:
        if self._exporter is None:
            self._exporter = MetricsExporter(
                self.metrics.registry, host=self.host, retry_seconds=self.retry_seconds
            )
        self._exporter_apply()
        self._otlp_apply()
        return self

    def _exporter_apply(self) -> None:
        assert self._exporter is not None
        port = self.config.prometheus_port + self.port_offset
        if port > 65535:
            logger.error("No metrics endpoint: port %d (prometheusPort + offset) is past 65535", port)
        self._exporter.apply(enabled=self.config.enabled and port <= 65535, port=min(port, 65535))

    def stop(self) -> None:
        if self._exporter is not None:
            self._exporter.close()
            self._exporter = None
        self._otlp_stop()

    def observe(self, emitter: EngineEventEmitter) -> None:
        """Trace the generations ``emitter`` tells of, as spans, while OTLP export is on (it
        listens only then: with OTLP off, emitting costs what it did)."""
        self._observed.append(emitter)
        if self._otlp is not None:
            emitter.on("*", self._otlp.on_event)

    def _otlp_apply(self) -> None:
        """OTLP export on while started, enabled and ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; a new
        interval or service name restarts it."""
        wanted = self._exporter is not None and self.config.enabled and otlp_endpoint() is not None
        current = self._otlp
        if current is not None and (
            not wanted
            or current.interval_seconds != self.config.export_interval_ms / 1000
            or current.resource.attributes.get("service.name") != self.config.service_name
        ):
            self._otlp_stop()
        if wanted and self._otlp is None:
            self._otlp = OtlpExport(
                self.metrics.registry,
                service_name=self.config.service_name,
                source=self.source,
                interval_seconds=self.config.export_interval_ms / 1000,
            )
            for emitter in self._observed:
                emitter.on("*", self._otlp.on_event)

    def _otlp_stop(self) -> None:
        if self._otlp is not None:
            for emitter in self._observed:
                emitter.off("*", self._otlp.on_event)
            self._otlp.stop()
            self._otlp = None

    def reconfigure(self, config: Mapping[str, Any] | TelemetryConfigSchema) -> None:
        """Apply a new config live (validated first: a bad one changes nothing)."""
        self.config = _validated(config)
        self.metrics.set_identity(service_name=self.config.service_name, source=self.source)
        if self._exporter is not None:
            self._exporter_apply()
            self._otlp_apply()

    # -- what a host program records (the worker's engine records the same metrics itself) ----

    def record_model_loaded(
        self,
        model: str,
        *,
        seconds: float,
        bits: int | None = None,
        group_size: int | None = None,
        mode: str = "",
    ) -> None:
        """A model loaded in ``seconds``; ``bits``, ``group_size``, ``mode``: how it is quantized."""
        m = self.metrics
        labels = {"bits": str(bits or ""), "group_size": str(group_size or ""), "mode": mode if bits else ""}
        m.series(m.models_loaded, model=model, **labels).inc()
        m.series(m.model_load_duration, model=model).observe(seconds)

    def record_model_unloaded(self, model: str, *, reason: str) -> None:
        self.metrics.series(self.metrics.models_unloaded, model=model, reason=reason).inc()

    def record_token(self, model: str, *, since_previous: float | None = None) -> None:
        """One token generated; ``since_previous``: seconds since the one before (none for the first)."""
        m = self.metrics
        m.series(m.tokens_generated, model=model).inc()
        if since_previous is not None:
            m.series(m.inter_token_latency, model=model).observe(since_previous)

    def record_generation(
        self, model: str, *, seconds: float, time_to_first_token: float | None = None
    ) -> None:
        """A generation completed in ``seconds``, its first token after ``time_to_first_token``."""
        m = self.metrics
        m.series(m.generation_duration, model=model).observe(seconds)
        if time_to_first_token is not None:
            m.series(m.time_to_first_token, model=model).observe(time_to_first_token)

    def record_error(self, code: str, *, model: str | None = None) -> None:
        """A failure with its error code; with ``model``, a failed generation of that model."""
        m = self.metrics
        if model is not None:
            m.series(m.generation_errors, model=model, code=code).inc()
        m.series(m.errors, code=code).inc()
