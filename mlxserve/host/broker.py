"""Celery's Redis queues, read without trusting what they hold.

Anyone with the broker's credentials (every worker host) can push anything onto a queue. Kombu
decodes what it pops and, on bytes that are not one of its messages, raises out of the worker's
consumer loop: the worker exits ("Unrecoverable error: JSONDecodeError") and the generations
behind stay ``queued``. Here a popped item that is not a message kombu can deliver is moved to a
quarantine list (``celery.quarantine``, its newest 1,000), logged and counted, and the worker
reads on. A message that is one (valid JSON with its envelope) goes on to Celery, which refuses
unknown task names and undecodable bodies by itself; the task decodes its own arguments
(``events.tasks``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import loads

logger = logging.getLogger(__name__)

QUARANTINE = "celery.quarantine"
QUARANTINE_LENGTH = 1000

# Called with the queue's name for each item quarantined (the worker counts them as errors).
on_quarantine: list[Callable[[str], None]] = []


def deliverable(item: bytes | str) -> bool:
    """Whether ``item`` is a message kombu's virtual transport can make a ``Message`` of."""
    try:
        payload = json.loads(item)
    except (ValueError, TypeError):
        return False
    if not isinstance(payload, dict):
        return False
    properties = payload.get("properties")
    return (
        isinstance(properties, dict)
        and isinstance(properties.get("delivery_info"), dict)
        and "body" in payload
        and isinstance(payload.get("headers", {}), dict)
        and isinstance(payload.get("content-type"), str)
        and isinstance(payload.get("content-encoding"), str)
    )


def _quarantine(client: Any, queue: bytes | str, item: bytes) -> None:
    name = queue.decode("utf-8", "replace") if isinstance(queue, bytes) else str(queue)
    logger.error("Quarantined an item of queue %s that is not a task message: %r", name, item[:200])
    try:
        pipe = client.pipeline()
        pipe.lpush(QUARANTINE, item)
        pipe.ltrim(QUARANTINE, 0, QUARANTINE_LENGTH - 1)
        pipe.execute()
    except Exception:  # the quarantine is a courtesy: the item is logged, the worker goes on
        logger.exception("Could not keep the quarantined item in %s", QUARANTINE)
    for callback in on_quarantine:
        callback(name)


class QuarantiningChannel(kombu_redis.Channel):
    """Kombu's Redis channel, with what its queues hold checked before it is decoded."""

    def _brpop_read(self, **options: Any) -> Any:
        client = self.client
        original = client.parse_response

        def checked(connection: Any, command_name: Any, **kwargs: Any) -> Any:
            response = original(connection, command_name, **kwargs)
            if response and str(command_name).upper() == "BRPOP":
                queue, item = response
                if not deliverable(item):
                    _quarantine(self.client, queue, item)
                    return None  # nothing to deliver: kombu reads on (Empty)
            return response

        client.parse_response = checked
        try:
            return super()._brpop_read(**options)
        finally:
            del client.parse_response  # the class's own again

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                while (item := client.rpop(self._q_for_pri(queue, pri))) is not None:
                    if deliverable(item):
                        return loads(item.decode() if isinstance(item, bytes) else item)
                    _quarantine(client, queue, item)
            raise Empty()


def install() -> None:
    """Make kombu's Redis transport (``redis://`` and ``rediss://``) use this channel."""
    kombu_redis.Transport.Channel = QuarantiningChannel
