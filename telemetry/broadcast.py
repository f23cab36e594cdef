"""The telemetry config in Redis: written by the control plane, read and watched by workers.

Workers have no database: this module needs Redis alone. The current config
lives under one key (so a worker that starts late reads it) and every change
is also published on a channel (so running workers hear of it at once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgspec
import redis

from mlxserve.redis_conn import Subscription
from telemetry.schemas import TelemetryConfigSchema, telemetry_config_validate

logger = logging.getLogger(__name__)


class PublishedConfig(msgspec.Struct, frozen=True):
    version: int
    config: dict[str, Any]


def channel_for(key: str) -> str:
    return f"{key}:changes"


def telemetry_config_publish(
    *, client: redis.Redis, key: str, config: TelemetryConfigSchema, version: int
) -> None:
    message = msgspec.json.encode(PublishedConfig(version=version, config=config.to_wire()))
    pipe = client.pipeline(transaction=True)
    pipe.set(key, message)
    pipe.publish(channel_for(key), message)
    pipe.execute()


def _parse(raw: bytes | None) -> tuple[int, TelemetryConfigSchema] | None:
    if raw is None:
        return None
    try:
        published = msgspec.json.decode(raw, type=PublishedConfig)
        return published.version, telemetry_config_validate(published.config)
    except Exception:  # a foreign or corrupt value must not take a worker down
        logger.exception("Ignoring an invalid telemetry config in Redis: %r", raw[:200])
        return None


def telemetry_config_read(*, client: redis.Redis, key: str) -> tuple[int, TelemetryConfigSchema] | None:
    """The current config and its version, or None if the control plane never published one."""
    raw = client.get(key)
    return _parse(raw)  # type: ignore[arg-type]


class TelemetryConfigWatcher:
    """Calls ``on_change(config, version)`` with the current config, then on every change.

    Runs a daemon thread. It survives Redis going away: it reconnects, re-reads
    the key (a change may have been missed meanwhile) and carries on. Stale or
    repeated versions are not passed on.
    """

    def __init__(
        self,
        *,
        client: redis.Redis,
        key: str,
        on_change: Callable[[TelemetryConfigSchema, int], None],
        retry_seconds: float = 1.0,
    ) -> None:
        self.client = client
        self.key = key
        self.on_change = on_change
        self.version = -1
        # Subscribe first, then read the key: a change made in between is not lost.
        self._subscription = Subscription(
            client=client,
            channel=channel_for(key),
            on_message=lambda data: self._offer(_parse(data)),
            on_connect=lambda: self._offer(telemetry_config_read(client=client, key=key)),
            retry_seconds=retry_seconds,
            name="telemetry-config-watcher",
        )

    def start(self) -> TelemetryConfigWatcher:
        self._subscription.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._subscription.stop(timeout)

    def _offer(self, parsed: tuple[int, TelemetryConfigSchema] | None) -> None:
        if parsed is None or parsed[0] <= self.version:
            return
        self.version = parsed[0]
        try:
            self.on_change(parsed[1], parsed[0])
        except Exception:
            logger.exception("Applying telemetry config version %s failed", parsed[0])
