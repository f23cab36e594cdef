"""The control plane's ``/metrics``: django-prometheus's request and database metrics plus
the fleet and ingest metrics, right whether the web server runs as one process or several.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``bin/run`` and the gunicorn config set it),
every process writes its django-prometheus counters and histograms to files there
and a scrape, answered by any one process, adds them up (prometheus_client's
multiprocess mode). The fleet and ingest metrics are read from the database and
Redis at scrape, so they are the same whichever process answers. The apps hand theirs over
when they are ready (``collector_register``): this module imports none of them.
"""

from __future__ import annotations

import os

from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.registry import REGISTRY, Collector

# The apps' collectors read at scrape (the fleet, the ingest), each registered once.
_collectors: list[Collector] = []


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def collector_register(collector: Collector) -> None:
    """Add a collector read at scrape: to the default registry (one process), and to the
    registry each scrape makes in multiprocess mode. Twice the same collector is once."""
    if collector not in _collectors:
        _collectors.append(collector)
        REGISTRY.register(collector)


def metrics(request: HttpRequest) -> HttpResponse:
    if multiprocess_dir():
        registry = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(registry)
        for collector in _collectors:
            registry.register(collector)
    else:
        registry = REGISTRY
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
