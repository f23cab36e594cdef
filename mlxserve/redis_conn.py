"""One Redis connection pool per process and URL (the web server, the ingester, workers)."""

from __future__ import annotations

import functools

import redis


@functools.cache
def redis_for_url(url: str) -> redis.Redis:
    # A short connect timeout: a request must fail fast (503) when Redis is
    # down, not hang the web worker.
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30)


def redis_client() -> redis.Redis:
    from django.conf import settings

    return redis_for_url(settings.REDIS_URL)
