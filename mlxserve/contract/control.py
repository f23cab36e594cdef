"""Commands the control plane sends workers.

A command is written to a Redis stream only the control plane may write (``<channel>:log``,
kept to its last 1,000 commands), then the channel is told: the message only nudges workers to
read the stream. Workers may publish on the channel (Redis cannot give a user the right to
subscribe without the right to publish), so a worker host can at most make the others read
the stream again; what a message holds is never a command. The message still carries the
command's JSON, for workers of earlier versions that read it from there.
"""

from __future__ import annotations

import msgspec

COMMAND_FIELD = b"c"
LOG_LENGTH = 1000


class ControlCommand(msgspec.Struct, forbid_unknown_fields=True):
    command: str
    model: str
    source: str | None = None  # None: every worker


def control_log_key(channel: str) -> str:
    return f"{channel}:log"
