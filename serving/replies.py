"""The web process's side of replies: one Redis pub/sub connection per process (per event loop),
shared by every request waiting on a generation.

A request subscribes to its generation's channel (``listen``) before its task is queued, and
waits until Redis confirms the subscription: no message of its worker can come before it. The
reader task hands each message to the queue of the request that listens on its channel; a request
that ends (its client left, its time ran out, it is done) unsubscribes, and its worker's next
publish reaches nobody, which stops the generation. A request reads its own generation's channel
and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio as aioredis
from django.conf import settings

from mlxserve.contract.serving import ReplyError, reply_channel

logger = logging.getLogger(__name__)

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = weakref.WeakKeyDictionary()
_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ReplyHub] = weakref.WeakKeyDictionary()

LOST = ReplyError(
    code="ReplyLost", message="The control plane lost its connection to Redis during the generation"
)
# What one request holds of its reply: a worker (a buggy one, or a host gone bad) cannot make a web
# process hold more. A message is a batch of tokens, so a long generation read slowly fits.
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_WAITING_MESSAGES = 65536
OVERFLOW = ReplyError(code="ReplyOverflow", message="The worker's reply was more than a request may hold")


def async_redis() -> aioredis.Redis:
    """This event loop's Redis client (a connection pool of its own)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = aioredis.Redis.from_url(
            settings.REDIS_URL, socket_connect_timeout=2, health_check_interval=30
        )
        _clients[loop] = client
    return client


def reply_hub() -> ReplyHub:
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        hub = ReplyHub(async_redis())
        _hubs[loop] = hub
    return hub


class ReplyHub:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.pubsub: Any = None
        self.queues: dict[str, asyncio.Queue[bytes | ReplyError]] = {}
        self.confirmed: dict[str, asyncio.Event] = {}
        self.reader: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.lock = asyncio.Lock()  # one command at a time on the connection: the first one makes it

    @contextlib.asynccontextmanager
    async def listen(
        self, generation_id: str, timeout: float = 5.0
    ) -> AsyncIterator[asyncio.Queue[bytes | ReplyError]]:
        """Subscribe to a generation's replies for the duration of the block."""
        channel = reply_channel(generation_id)
        queue: asyncio.Queue[bytes | ReplyError] = asyncio.Queue(MAX_WAITING_MESSAGES + 1)
        confirmed = asyncio.Event()
        self.queues[channel] = queue
        self.confirmed[channel] = confirmed
        try:
            async with self.lock:
                if self.pubsub is None:
                    self.pubsub = self.client.pubsub()
                await self.pubsub.subscribe(channel)
            if self.reader is None or self.reader.done():
                self.reader = asyncio.create_task(self._read(), name="reply-hub")
            self.wake.set()
            async with asyncio.timeout(timeout):  # not wait_for: see serving.views._messages
                await confirmed.wait()
            yield queue
        finally:
            self.queues.pop(channel, None)
            self.confirmed.pop(channel, None)
            with contextlib.suppress(redis.RedisError, OSError, RuntimeError):
                if self.pubsub is not None:
                    # Shielded: a request cancelled because its client left must still unsubscribe
                    # (it is what stops the worker).
                    await asyncio.shield(self._unsubscribe(channel))

    async def _unsubscribe(self, channel: str) -> None:
        async with self.lock:
            if self.pubsub is not None:
                await self.pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        while True:
            if not self.queues:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(30):
                        await self.wake.wait()
                continue
            try:
                message = await self.pubsub.get_message(timeout=1.0)
            except (redis.RedisError, OSError) as exc:
                logger.warning("Reply hub lost Redis (%s): the requests waiting are told", exc)
                for queue in self.queues.values():
                    queue.put_nowait(LOST)
                with contextlib.suppress(Exception):
                    await self.pubsub.aclose()
                self.pubsub = None
                return
            if message is None:
                continue
            channel = (
                message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
            )
            if message["type"] == "subscribe":
                event = self.confirmed.get(channel)
                if event is not None:
                    event.set()
            elif message["type"] == "message":
                listener = self.queues.get(channel)
                if listener is None:
                    continue
                data = message["data"]
                if len(data) > MAX_MESSAGE_BYTES or listener.qsize() >= MAX_WAITING_MESSAGES:
                    # An error ends the request; it unsubscribes, so the worker stops at its next publish.
                    self.queues.pop(channel, None)
                    listener.put_nowait(OVERFLOW)
                    logger.warning(
                        "Reply on %s refused: a message over 1 MiB or over 65,536 waiting", channel
                    )
                    continue
                listener.put_nowait(data)
