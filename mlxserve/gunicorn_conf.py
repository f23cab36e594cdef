"""gunicorn settings for the control plane:
``gunicorn mlxserve.asgi:application -c python:mlxserve.gunicorn_conf``.

With ``PROMETHEUS_MULTIPROC_DIR`` set, every web process writes its metrics to
files there and ``/metrics`` adds them up (prometheus_client's multiprocess
mode). The directory is emptied when gunicorn starts (files of an earlier run
would be added in), and a worker that exits is marked dead so its live gauges
leave the sum; its counters stay in it, as counters must.

Each worker, once the application is loaded, freezes what it holds (``gc.freeze``): Django,
DRF, the URLconf and every view (some 130,000 objects) are moved where the collector never
walks them again. Until then a full collection walked all of them (30-80 ms on this project's
host), and the request it fell in was the slowest of its hundreds.
"""

from __future__ import annotations

import gc
import os
import shutil
from typing import Any

from prometheus_client import multiprocess

# uvicorn's ASGI workers (``gunicorn mlxserve.asgi:application -c python:mlxserve.gunicorn_conf``):
# an open stream (a /v1/ request generating) holds a coroutine, not a process.
worker_class = "uvicorn_worker.UvicornWorker"
graceful_timeout = 5


def on_starting(server: Any) -> None:
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker: Any) -> None:
    from django.urls import get_resolver

    get_resolver().check()  # every view imported now (the URLconf read), so it is frozen too
    gc.freeze()
    worker.log.info("Froze %d objects of the loaded application (gc.freeze)", gc.get_freeze_count())
