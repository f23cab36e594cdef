"""A worker's view of the telemetry config: read from Redis at start, then every change.

Workers have no database: this needs Redis alone (the key and channel are the
contract's, ``mlxserve.contract.telemetry``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from mlxserve.bus import telemetry_config_read
from mlxserve.contract.telemetry import TelemetryConfigSchema, channel_for
from mlxserve.engine.subscription import Subscription

logger = logging.getLogger(__name__)


class TelemetryConfigWatcher:
    """Calls ``on_change(config, version)`` with the current config, then on every change.

    Runs a daemon thread. It survives Redis going away: it reconnects, re-reads
    the key (a change may have been missed meanwhile) and carries on. A version
    already applied is not passed on again.

    The channel only says "read the key again": what a message holds is never applied.
    Workers may publish on the channel (Redis cannot give a user the right to subscribe
    without the right to publish), but only the control plane may write the key; so a
    worker host can at most make every worker read the key again, at most
    ``1 / min_interval_s`` times a second, never set another worker's config.
    """

    def __init__(
        self,
        *,
        client: redis.Redis,
        key: str,
        on_change: Callable[[TelemetryConfigSchema, int], None],
        retry_seconds: float = 1.0,
        min_interval_s: float = 0.2,
    ) -> None:
        self.client = client
        self.key = key
        self.on_change = on_change
        self.version = -1
        # Subscribe first, then read the key: a change made in between is not lost.
        self._subscription = Subscription(
            client=client,
            channel=channel_for(key),
            on_message=lambda _nudge: self._read(),
            on_connect=self._read,
            retry_seconds=retry_seconds,
            min_interval_s=min_interval_s,
            name="telemetry-config-watcher",
        )

    def start(self) -> TelemetryConfigWatcher:
        self._subscription.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._subscription.stop(timeout)

    def _read(self) -> None:
        self._offer(telemetry_config_read(client=self.client, key=self.key))

    def _offer(self, parsed: tuple[int, TelemetryConfigSchema] | None) -> None:
        if parsed is None or parsed[0] <= self.version:
            return
        self.version = parsed[0]
        try:
            self.on_change(parsed[1], parsed[0])
        except Exception:
            logger.exception("Applying telemetry config version %s failed", parsed[0])
