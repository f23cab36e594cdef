"""The worker runtime inside a Celery worker process.

Celery's ``worker_ready`` starts it (``runtimeStatus: ready``), its
``worker_shutdown`` stops it (models unloaded with ``shutdown``, then
``runtimeStatus: shutdown``, then the publisher drained). Run the worker with
``--pool=solo``: one process, no fork, which mlx on macOS needs once Metal is
initialised (see README).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from mlxserve.engine.runtime import WorkerRuntime, default_source, runtime_settings_from_django

logger = logging.getLogger(__name__)

_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()
_nodename: str | None = None


def worker_runtime() -> WorkerRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            from django.conf import settings

            source = settings.WORKER_SOURCE or default_source(_nodename)
            _runtime = WorkerRuntime(runtime_settings_from_django(source=source)).start()
        return _runtime


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
