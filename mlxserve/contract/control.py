"""Commands the control plane sends workers on the control channel (one JSON object each)."""

from __future__ import annotations

import msgspec
import redis


class ControlCommand(msgspec.Struct, forbid_unknown_fields=True):
    command: str
    model: str
    source: str | None = None  # None: every worker


def control_command_publish(*, client: redis.Redis, channel: str, command: ControlCommand) -> int:
    """Send a command to the workers; returns how many were listening."""
    return int(client.publish(channel, msgspec.json.encode(command)))  # type: ignore[arg-type]
