"""The worker runtime inside a Celery worker process.

Celery's ``worker_ready`` starts it (``runtimeStatus: ready``), its
``worker_shutdown`` stops it (models unloaded with ``shutdown``, then
``runtimeStatus: shutdown``, then the publisher drained). The worker is one process, no
fork, which mlx on macOS needs once Metal is initialised: Celery's solo pool when it runs one
generation at a time (``MLXSERVE_WORKER_CONCURRENCY=1``), its thread pool otherwise, whose
threads hand their generations to the engine's one generation thread and wait
(``mlxserve.engine.scheduler``). A warm shutdown (SIGTERM) waits for the running tasks, hence
for their generations, before the runtime stops.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown
from django.conf import settings

from mlxserve.contract.serving import model_queue
from mlxserve.engine.runtime import RuntimeSettings, WorkerRuntime, default_source
from mlxserve.host import broker

logger = logging.getLogger(__name__)

_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()
_nodename: str | None = None


def worker_runtime() -> WorkerRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            source = settings.WORKER_SOURCE or default_source(_nodename)
            _runtime = WorkerRuntime(runtime_settings_from_django(source=source)).start()
        return _runtime


@celeryd_after_setup.connect
def _serve_declared_models(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    """With MLXSERVE_WORKER_MODELS, take tasks from those models' queues only (not the default
    queue, which holds tasks for any model)."""
    if not settings.WORKER_MODELS or instance is None:
        return
    queues = instance.app.amqp.queues
    for model in settings.WORKER_MODELS:
        queues.select_add(model_queue(model))
    queues.deselect(instance.app.conf.task_default_queue)
    logger.info(
        "Serving %s from queues %s", ", ".join(settings.WORKER_MODELS), ", ".join(queues.consume_from)
    )


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **kwargs: Any) -> None:
    global _nodename
    _nodename = getattr(sender, "hostname", None)
    worker_runtime()


@worker_shutdown.connect
def _on_worker_shutdown(**kwargs: Any) -> None:
    global _runtime
    with _runtime_lock:
        if _runtime is not None:
            _runtime.shutdown()
            _runtime = None


def runtime_settings_from_django(**overrides: Any) -> RuntimeSettings:
    values: dict[str, Any] = {
        "redis_url": settings.REDIS_URL,
        "stream": settings.EVENTS_STREAM,
        "config_key": settings.TELEMETRY_CONFIG_KEY,
        "control_channel": settings.WORKER_CONTROL_CHANNEL,
        "source": settings.WORKER_SOURCE or default_source(),
        "spool_dir": Path(settings.WORKER_SPOOL_DIR),
        "max_models": settings.WORKER_MAX_MODELS,
        "max_model_bytes": settings.WORKER_MAX_MODEL_BYTES,
        "metrics_host": settings.WORKER_METRICS_HOST,
        "metric_label_limit": settings.METRIC_LABEL_LIMIT,
        "heartbeat_seconds": settings.WORKER_HEARTBEAT_SECONDS,
        "publish_linger_seconds": settings.WORKER_PUBLISH_LINGER_MS / 1000,
        "stream_backlog_limit": settings.STREAM_BACKLOG_LIMIT,
        "stream_backlog_bytes": settings.STREAM_BACKLOG_BYTES,
        "consumer_group": settings.EVENTS_CONSUMER_GROUP,
        "spool_max_bytes": settings.WORKER_SPOOL_MAX_BYTES,
        "metrics_port_offset": settings.WORKER_METRICS_PORT_OFFSET,
        "models": settings.WORKER_MODELS,
        "concurrency": settings.WORKER_CONCURRENCY,
        "kv_bytes": settings.WORKER_KV_BYTES,
    }
    values.update(overrides)
    return RuntimeSettings(**values)


def _count_quarantined(queue: str) -> None:
    if _runtime is not None:
        _runtime.metrics.series(_runtime.metrics.errors, code="PoisonMessage").inc()


broker.on_quarantine.append(_count_quarantined)
