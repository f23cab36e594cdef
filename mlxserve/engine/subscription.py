"""A Redis pub/sub listener for workers: the config channel and the control channel."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

import redis

logger = logging.getLogger(__name__)


class Subscription:
    """A daemon thread listening on a Redis pub/sub channel, surviving Redis restarts.

    ``on_connect`` runs after each (re)subscription, so a caller can re-read
    state it may have missed while disconnected; ``on_message`` gets each payload.
    """

    def __init__(
        self,
        *,
        client: redis.Redis,
        channel: str,
        on_message: Callable[[bytes], None],
        on_connect: Callable[[], None] | None = None,
        retry_seconds: float = 1.0,
        min_interval_s: float = 0.0,
        name: str = "redis-subscription",
    ) -> None:
        self.client = client
        self.channel = channel
        self.on_message = on_message
        self.on_connect = on_connect
        self.retry_seconds = retry_seconds
        # With a minimum interval, messages that arrive together are handled as one (the last
        # one's payload), and the handler runs at most once per interval however many come: a
        # flood on the channel costs the listener a bounded amount of work.
        self.min_interval_s = min_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Subscription:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                if self.on_connect:
                    self.on_connect()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if not (message and message.get("type") == "message"):
                        continue
                    data = message["data"]
                    if self.min_interval_s:
                        for _ in range(100_000):  # what is already here, handled as one
                            more = pubsub.get_message(timeout=0)
                            if more is None:
                                break
                            if more.get("type") == "message":
                                data = more["data"]
                    try:
                        self.on_message(data)
                    except Exception:
                        logger.exception("Handling a message on %s failed", self.channel)
                    if self.min_interval_s:
                        self._stop.wait(self.min_interval_s)
            except redis.RedisError as exc:
                logger.warning("Lost Redis while listening on %s (%s); retrying", self.channel, exc)
                self._stop.wait(self.retry_seconds)
            finally:
                with contextlib.suppress(redis.RedisError):
                    pubsub.close()
