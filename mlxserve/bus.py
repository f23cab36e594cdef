"""The contract's Redis I/O: the event stream, the control channel and the telemetry config's key.

``mlxserve.contract`` says what goes over Redis (entry fields, batches, commands, the published
config) and imports no client; this module reads and writes it with redis-py. The web side, the
ingester and the workers all go through here (no Django, no Celery).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import redis

from mlxserve.contract.control import COMMAND_FIELD, LOG_LENGTH, ControlCommand, control_log_key
from mlxserve.contract.stream import BATCH_FIELD, ENTRY_FIELD, EntryContents, batch_body, entry_envelopes
from mlxserve.contract.telemetry import PublishedConfig, TelemetryConfigSchema, channel_for, config_parse


def redis_from_url(url: str) -> redis.Redis:
    """A client with the project's timeouts, for the web side, the ingester and workers alike: a
    short connect timeout (a request fails fast, 503, when Redis is down, instead of holding a web
    thread), a bounded wait for any answer, and idle connections checked before use."""
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30)


# -- the event stream ---------------------------------------------------------------------------


def stream_append(client: redis.Redis, stream: str, bodies: Sequence[bytes]) -> list[str]:
    """XADD each body in one round trip; returns the entry ids. Raises ``redis.RedisError``.

    No MAXLEN here: trimming by length would drop entries the ingester has
    not stored yet.
    """
    if not bodies:
        return []
    pipe = client.pipeline(transaction=False)
    for body in bodies:
        pipe.xadd(stream, {ENTRY_FIELD: body})
    return [i.decode() if isinstance(i, bytes) else str(i) for i in pipe.execute()]


def stream_backlog(*, client: redis.Redis, stream: str, group: str) -> int:
    """Entries not yet stored: read and pending, plus not yet read (the whole stream if no
    ingester has made the group yet, or if this Redis does not report the group's lag)."""
    try:
        groups: Any = client.xinfo_groups(stream)
    except redis.ResponseError:  # no stream yet
        return 0
    for info in groups:
        name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
        if name == group and info.get("lag") is not None:
            return int(info["pending"]) + int(info["lag"])
    return int(client.xlen(stream))


def stream_bytes(*, client: redis.Redis, stream: str) -> int:
    """The stream's memory in Redis (``MEMORY USAGE``, sampled: a few nodes read, whatever its
    length), 0 when there is no stream."""
    used: Any = client.memory_usage(stream, samples=5)
    return int(used or 0)


def backlog_refusal(
    *, client: redis.Redis, stream: str, group: str, max_entries: int, max_bytes: int
) -> str | None:
    """Why nothing more may be written to the stream now, or None: past ``max_entries`` entries
    not yet stored, or past ``max_bytes`` of stream in Redis (0 turns either check off). Entries
    alone would not bound memory: one entry may hold thousands of events."""
    if max_entries:
        backlog = stream_backlog(client=client, stream=stream, group=group)
        if backlog >= max_entries:
            return f"the stream holds {backlog} entries not yet stored (limit {max_entries})"
    if max_bytes:
        used = stream_bytes(client=client, stream=stream)
        if used >= max_bytes:
            return f"the stream takes {used} bytes of Redis (limit {max_bytes})"
    return None


def stream_ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) if missing; from the start of the stream."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def stream_append_batch(client: redis.Redis, stream: str, bodies: Sequence[bytes]) -> str | None:
    """XADD one entry holding all ``bodies``, in order. Raises ``redis.RedisError``."""
    if not bodies:
        return None
    entry_id = client.xadd(stream, {BATCH_FIELD: batch_body(bodies)})
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def stream_envelope_bodies(client: redis.Redis, stream: str) -> list[bytes]:
    """Every envelope body on the stream, in order (for tools and tests; reads it all)."""
    entries: Any = client.xrange(stream)
    contents = EntryContents()
    for entry_id, fields in entries:
        entry_envelopes(entry_id.decode() if isinstance(entry_id, bytes) else entry_id, fields, contents)
    return [body for _, body in contents.bodies]


# -- commands to workers ------------------------------------------------------------------------


def control_command_publish(*, client: redis.Redis, channel: str, command: ControlCommand) -> int:
    """Write a command to the log and nudge the workers; returns how many were listening."""
    body = msgspec.json.encode(command)
    pipe = client.pipeline(transaction=True)
    pipe.xadd(control_log_key(channel), {COMMAND_FIELD: body}, maxlen=LOG_LENGTH, approximate=True)
    pipe.publish(channel, body)
    _, listeners = pipe.execute()
    return int(listeners)


# -- the telemetry config -----------------------------------------------------------------------


def telemetry_config_publish(
    *, client: redis.Redis, key: str, config: TelemetryConfigSchema, version: int
) -> None:
    message = msgspec.json.encode(PublishedConfig(version=version, config=config.to_wire()))
    pipe = client.pipeline(transaction=True)
    pipe.set(key, message)
    pipe.publish(channel_for(key), message)
    pipe.execute()


def telemetry_config_read(*, client: redis.Redis, key: str) -> tuple[int, TelemetryConfigSchema] | None:
    """The current config and its version, or None if the control plane never published one."""
    raw = client.get(key)
    return config_parse(raw)  # type: ignore[arg-type]
