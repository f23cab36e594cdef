from __future__ import annotations

import queue
import time
from typing import Any

import pytest
import redis

from mlxserve.bus import telemetry_config_publish
from mlxserve.contract.telemetry import TelemetryConfigSchema, channel_for
from mlxserve.engine.config_watcher import TelemetryConfigWatcher
from telemetry.services import telemetry_config_replace, telemetry_config_sync


def test_a_worker_hears_of_a_saved_change_when_it_is_published(
    db: Any, redis_client: redis.Redis, settings: Any
) -> None:
    """Pushed: the watcher reads the key when it connects and when the channel tells it to, never
    on a timer, so the change can only have come through the channel."""
    heard: queue.Queue[tuple[TelemetryConfigSchema, int]] = queue.Queue()
    watcher = TelemetryConfigWatcher(
        client=redis_client, key=settings.TELEMETRY_CONFIG_KEY, on_change=lambda c, v: heard.put((c, v))
    ).start()
    try:
        channel = channel_for(settings.TELEMETRY_CONFIG_KEY)
        deadline = time.monotonic() + 10
        while dict(redis_client.pubsub_numsub(channel)).get(channel.encode(), 0) < 1:  # it has subscribed
            assert time.monotonic() < deadline, "the watcher never subscribed"
            time.sleep(0.02)
        telemetry_config_replace(data={"enabled": True, "prometheusPort": 9600}, user=None, via="api")
        config, version = heard.get(timeout=10)
        assert (config.enabled, config.prometheus_port, version) == (True, 9600, 1)
    finally:
        watcher.stop()


def test_a_late_worker_reads_the_current_config_and_ignores_stale_versions(
    redis_client: redis.Redis, settings: Any
) -> None:
    key = settings.TELEMETRY_CONFIG_KEY
    telemetry_config_publish(
        client=redis_client, key=key, config=TelemetryConfigSchema(enabled=True), version=5
    )
    heard: queue.Queue[int] = queue.Queue()
    watcher = TelemetryConfigWatcher(
        client=redis_client, key=key, on_change=lambda c, v: heard.put(v)
    ).start()
    try:
        assert heard.get(timeout=1.0) == 5
        telemetry_config_publish(
            client=redis_client, key=key, config=TelemetryConfigSchema(enabled=False), version=4
        )
        telemetry_config_publish(
            client=redis_client, key=key, config=TelemetryConfigSchema(enabled=False), version=6
        )
        assert heard.get(timeout=1.0) == 6
        assert heard.empty()
    finally:
        watcher.stop()


def test_a_corrupt_value_in_redis_is_ignored(redis_client: redis.Redis, settings: Any) -> None:
    redis_client.set(settings.TELEMETRY_CONFIG_KEY, b'{"version": 1, "config": {"enabled": "yes"}}')
    heard: queue.Queue[int] = queue.Queue()
    watcher = TelemetryConfigWatcher(
        client=redis_client, key=settings.TELEMETRY_CONFIG_KEY, on_change=lambda c, v: heard.put(v)
    ).start()
    try:
        with pytest.raises(queue.Empty):
            heard.get(timeout=0.5)
    finally:
        watcher.stop()


@pytest.mark.django_db
def test_sync_republishes_after_redis_lost_the_config(redis_client: redis.Redis, settings: Any) -> None:
    telemetry_config_replace(data={"enabled": True}, user=None, via="api")
    assert telemetry_config_sync() is False  # already there
    redis_client.delete(settings.TELEMETRY_CONFIG_KEY)
    assert telemetry_config_sync() is True
    assert redis_client.exists(settings.TELEMETRY_CONFIG_KEY)


def test_what_a_message_on_the_channel_holds_is_never_applied_only_the_key(
    redis_client: redis.Redis, settings: Any
) -> None:
    # Anyone who may subscribe may publish (Redis cannot separate the two): a forged config with
    # the highest version makes the watcher read the key again, nothing more.
    key = settings.TELEMETRY_CONFIG_KEY
    telemetry_config_publish(
        client=redis_client,
        key=key,
        config=TelemetryConfigSchema(enabled=True, prometheus_port=9700),
        version=3,
    )
    heard: queue.Queue[tuple[bool, int, int]] = queue.Queue()
    watcher = TelemetryConfigWatcher(
        client=redis_client, key=key, on_change=lambda c, v: heard.put((c.enabled, c.prometheus_port, v))
    ).start()
    try:
        assert heard.get(timeout=2.0) == (True, 9700, 3)
        forged = b'{"version": 9223372036854775807, "config": {"enabled": false}}'
        for _ in range(2_000):  # a flood: handled as a few reads of the key
            redis_client.publish(f"{key}:changes", forged)
        with pytest.raises(queue.Empty):
            heard.get(timeout=1.0)
        assert watcher.version == 3
        # The control plane's next save is applied as usual.
        telemetry_config_publish(
            client=redis_client,
            key=key,
            config=TelemetryConfigSchema(enabled=True, prometheus_port=9701),
            version=4,
        )
        assert heard.get(timeout=2.0) == (True, 9701, 4)
    finally:
        watcher.stop()
