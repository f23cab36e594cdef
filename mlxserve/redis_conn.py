"""One Redis connection pool per process and URL (the web server, the ingester, workers)."""

from __future__ import annotations

import functools
import threading
import time

import redis

from mlxserve.bus import redis_from_url


@functools.cache
def redis_for_url(url: str) -> redis.Redis:
    return redis_from_url(url)


def redis_client() -> redis.Redis:
    from django.conf import settings

    return redis_for_url(settings.REDIS_URL)


class RedisClock:
    """Redis's clock, read through this host's: the offset between the two is measured with
    ``TIME`` every ``refresh_s`` seconds (one round trip, half of it taken off) and added to
    the local clock in between.

    The API checks "not in the future" against the clock of the Redis that receives the
    event, the one whose entry id the ingester checks it against again: so an event the API
    accepted is never refused by the ingester because the web host's clock runs ahead.
    """

    def __init__(self, refresh_s: float = 10.0) -> None:
        self.refresh_s = refresh_s
        self._offset_ms = 0
        self._measured_at = float("-inf")
        self._lock = threading.Lock()

    def now_ms(self, client: redis.Redis) -> int:
        local = time.time_ns() // 1_000_000
        if time.monotonic() - self._measured_at >= self.refresh_s:
            with self._lock:
                if time.monotonic() - self._measured_at >= self.refresh_s:
                    self._measure(client)
        return local + self._offset_ms

    def _measure(self, client: redis.Redis) -> None:
        before = time.time_ns()
        seconds, micros = client.time()
        after = time.time_ns()
        redis_ms = int(seconds) * 1000 + int(micros) // 1000
        self._offset_ms = redis_ms - (before + after) // 2_000_000
        self._measured_at = time.monotonic()


redis_clock = RedisClock()
