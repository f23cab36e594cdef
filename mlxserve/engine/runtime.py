"""One worker process's telemetry runtime: engine, publisher, metrics endpoint, live config, control.

Plain Python (no Celery, no Django): built from a Redis URL and a few names,
so the same runtime runs under Celery, in ``generate --local`` style scripts,
in the benchmark and in tests.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import redis

from mlxserve.bus import redis_from_url
from mlxserve.contract.control import COMMAND_FIELD, ControlCommand, control_log_key
from mlxserve.contract.telemetry import DEFAULT_METRIC_LABEL_LIMIT, TelemetryConfigSchema
from mlxserve.engine.bridge import TelemetryBridge
from mlxserve.engine.config_watcher import TelemetryConfigWatcher
from mlxserve.engine.emitter import EngineEventEmitter
from mlxserve.engine.engine import Engine
from mlxserve.engine.metrics import WorkerMetrics
from mlxserve.engine.models import ModelCache
from mlxserve.engine.publisher import DEFAULT_LINGER_S, BufferedPublisher
from mlxserve.engine.reply import ServingClaim
from mlxserve.engine.subscription import Subscription

logger = logging.getLogger(__name__)


def default_source(nodename: str | None = None) -> str:
    host = socket.gethostname()
    return f"{host}/{nodename}" if nodename else f"{host}/worker"


@dataclass
class RuntimeSettings:
    redis_url: str
    stream: str
    config_key: str
    control_channel: str
    source: str
    spool_dir: Path
    max_models: int = 2
    max_model_bytes: int = 0
    metrics_host: str = "0.0.0.0"
    heartbeat_seconds: float = 0  # 0: the config's exportIntervalMs
    metric_label_limit: int = DEFAULT_METRIC_LABEL_LIMIT
    publish_linger_seconds: float = DEFAULT_LINGER_S
    # Hold events back past this many stream entries not yet stored by the group (0: never).
    stream_backlog_limit: int = 0
    stream_backlog_bytes: int = 0
    consumer_group: str = ""
    spool_max_bytes: int = 0
    metrics_port_offset: int = 0  # added to prometheusPort: several workers on one host
    models: tuple[str, ...] = ()  # the models this worker serves (empty: every model, the default queue)
    concurrency: int = 1  # generations at once (engine.scheduler)
    kv_bytes: int = 0  # key-value cache memory for them; 0: from the machine


class ControlLog:
    """The control plane's commands, read from its log (a stream workers may only read) from
    where this worker started: each command once, in order, whatever the channel said."""

    def __init__(self, *, client: redis.Redis, key: str, handle: Callable[[ControlCommand], None]) -> None:
        self.client, self.key, self.handle = client, key, handle
        self.position: str | None = None

    def read(self) -> None:
        if self.position is None:  # started: only commands sent from now on
            last: Any = self.client.xrevrange(self.key, count=1)
            self.position = _text(last[0][0]) if last else "0-0"
            return
        while True:
            entries: Any = self.client.xrange(self.key, min=f"({self.position}", count=100)
            if not entries:
                return
            for entry_id, fields in entries:
                self.position = _text(entry_id)
                try:
                    command = msgspec.json.decode(fields.get(COMMAND_FIELD, b""), type=ControlCommand)
                except msgspec.DecodeError:
                    logger.warning("Ignoring a malformed control command %s", self.position)
                    continue
                self.handle(command)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class WorkerRuntime:
    def __init__(self, settings: RuntimeSettings, *, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.client = client or redis_from_url(settings.redis_url)
        self.metrics = WorkerMetrics(label_limit=settings.metric_label_limit)
        # Serves the metrics as the live config says (off until the first config arrives).
        self.bridge = TelemetryBridge(
            TelemetryConfigSchema(enabled=False),
            source=settings.source,
            host=settings.metrics_host,
            metrics=self.metrics,
            port_offset=settings.metrics_port_offset,
        )
        self.publisher = BufferedPublisher(
            client=self.client,
            stream=settings.stream,
            spool_dir=settings.spool_dir,
            metrics=self.metrics,
            linger=settings.publish_linger_seconds,
            backlog_limit=settings.stream_backlog_limit,
            backlog_bytes=settings.stream_backlog_bytes,
            group=settings.consumer_group,
            spool_max_bytes=settings.spool_max_bytes,
        )
        self.emitter = EngineEventEmitter(
            source=settings.source,
            publisher=self.publisher,
            # Counted as errors of their own code: a clock far off, a bug in what we emit.
            on_refused=lambda exc: self.metrics.errors.labels(code="EventRefused").inc(),
        )
        self.bridge.observe(self.emitter)  # generations as spans, when OTLP export is on
        self.engine = Engine(
            heartbeat_seconds=settings.heartbeat_seconds
            or TelemetryConfigSchema(enabled=False).export_interval_ms / 1000,
            emitter=self.emitter,
            metrics=self.metrics,
            cache=ModelCache(max_models=settings.max_models, max_bytes=settings.max_model_bytes),
            concurrency=settings.concurrency,
            kv_bytes=settings.kv_bytes,
            token_linger_s=settings.publish_linger_seconds,
        )
        self.config: TelemetryConfigSchema | None = None
        self.serving = ServingClaim(self.client, settings.source, list(settings.models) or None)
        self._watcher = TelemetryConfigWatcher(
            client=self.client, key=settings.config_key, on_change=self.apply_config
        )
        self._control_log = ControlLog(
            client=self.client, key=control_log_key(settings.control_channel), handle=self._on_control
        )
        self._control = Subscription(
            client=self.client,
            channel=settings.control_channel,
            on_message=lambda _nudge: self._control_log.read(),
            on_connect=self._control_log.read,
            min_interval_s=0.2,
            name="worker-control",
        )

    def start(self) -> WorkerRuntime:
        self.bridge.start()
        self.engine.start()
        self.serving.start()
        self._watcher.start()
        self._control.start()
        logger.info("Worker runtime %s started", self.settings.source)
        return self

    def apply_config(self, config: TelemetryConfigSchema, version: int) -> None:
        """A config change, live: exporter on/off/port, service name, OTLP interval, and the heartbeat
        interval unless MLXSERVE_HEARTBEAT_SECONDS sets its own."""
        self.config = config
        self.engine.set_heartbeat_interval(
            self.settings.heartbeat_seconds or config.export_interval_ms / 1000
        )
        self.bridge.reconfigure(config)
        self.engine.set_config_version(version)
        logger.info("Telemetry config version %d applied: %s", version, config.to_wire())

    def _on_control(self, command: ControlCommand) -> None:
        if command.source not in (None, self.settings.source):
            return
        if command.command == "unload":
            unloaded = self.engine.unload(command.model, "manual")
            logger.info("Unload %s: %s", command.model, "done" if unloaded else "was not loaded")
        else:
            logger.warning("Unknown control command %r", command.command)

    def shutdown(self, timeout: float = 10.0) -> None:
        self.serving.stop()  # first: no request is routed here any more
        self._control.stop()
        self._watcher.stop()
        self.engine.shutdown()
        self.bridge.stop()
        self.publisher.close(timeout)
        logger.info("Worker runtime %s stopped", self.settings.source)
