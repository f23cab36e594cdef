"""A worker runtime with telemetry on, as the generation benchmarks measure it: events to a real
Redis stream (emptied first), Prometheus metrics served on ``prometheus_port``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis

from mlxserve.contract.telemetry import TelemetryConfigSchema
from mlxserve.engine.runtime import RuntimeSettings, WorkerRuntime


def runtime_with_telemetry(
    client: redis.Redis, redis_url: str, stream: str, workdir: Path, prometheus_port: int, **settings: Any
) -> WorkerRuntime:
    client.delete(stream)
    runtime = WorkerRuntime(
        RuntimeSettings(
            redis_url=redis_url,
            stream=stream,
            config_key="bench:config",
            control_channel="bench:control",
            source="bench/worker",
            spool_dir=workdir / "spool",
            metrics_host="127.0.0.1",
            **settings,
        ),
        client=client,
    ).start()
    runtime.apply_config(TelemetryConfigSchema(enabled=True, prometheus_port=prometheus_port), version=1)
    return runtime
