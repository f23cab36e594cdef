"""A generation's answer to the client waiting on it, and the worker's claim to serve its models.

``GenerationReply`` is made per generation whose task asks for a reply. The generation loop hands
it each token (``token``: a clock read and a queue put, nothing on the network); a thread of its
own publishes what is waiting on the generation's channel as soon as it comes, one message for all
that waited, and pings while nothing is said. A publish that reaches nobody means the client left:
``cancelled`` is set and the loop stops at its next token. Stop sequences are cut here, so the
client never sees one, nor text past it: text that may be the start of one is held back until the
next tokens tell.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import redis

from mlxserve.contract.serving import (
    REPLY_PING_S,
    SERVING_RENEW_S,
    SERVING_TTL_S,
    ReplyEnd,
    ReplyError,
    ReplyMessage,
    ReplyPing,
    ReplyStart,
    ReplyToken,
    ReplyTokens,
    reply_channel,
    reply_encoder,
    serving_key,
)

logger = logging.getLogger(__name__)


class StopScanner:
    """Cuts a generation's text at the first of its stop sequences, across token boundaries."""

    __slots__ = ("held", "longest", "stops")

    def __init__(self, stops: list[str] | tuple[str, ...]) -> None:
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.held: list[ReplyToken] = []

    def feed(self, token: ReplyToken) -> tuple[list[ReplyToken], bool]:
        """The tokens that may go to the client now, and whether a stop sequence was met (then
        the last of them is cut just before it)."""
        if not self.stops:
            return [token], False
        self.held.append(token)
        joined = "".join(t.text for t in self.held)
        hits = [i for i in (joined.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, left = [], min(hits)
            for held in self.held:
                if left <= 0:
                    break
                out.append(ReplyToken(held.text[:left], held.logprob, held.top))
                left -= len(held.text)
            self.held = []
            return out, True
        # Hold the longest tail that may begin a stop sequence; release the tokens before it.
        keep = 0
        for k in range(min(len(joined), self.longest - 1), 0, -1):
            tail = joined[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        free = len(joined) - keep
        out = []
        while self.held and len(self.held[0].text) <= free:
            free -= len(self.held[0].text)
            out.append(self.held.pop(0))
        return out, False

    def rest(self) -> list[ReplyToken]:
        rest, self.held = self.held, []
        return rest


_END = object()


class GenerationReply:
    """Publishes one generation's reply (see the module's doc). ``start`` first, then ``token``
    per token, then ``end`` or ``fail``; ``close`` waits for the thread."""

    def __init__(
        self,
        client: redis.Redis,
        generation_id: str,
        *,
        worker: str,
        stop: list[str] | tuple[str, ...] = (),
        logprobs: bool = False,
        top_logprobs: int = 0,
        ping_s: float = REPLY_PING_S,
    ) -> None:
        self.client, self.channel, self.worker = client, reply_channel(generation_id), worker
        self.logprobs, self.top_logprobs = logprobs or top_logprobs > 0, top_logprobs
        self.scanner = StopScanner(stop)
        self.ping_s = ping_s
        self.cancelled = threading.Event()  # the client left: nobody received the last message
        self.stopped = False  # a stop sequence was met
        self.completion_tokens = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    # -- the generation thread's side ----------------------------------------------------

    def start(self) -> bool:
        """Say the generation is taken, before anything is loaded. False if nobody listens any
        more (its client left, or stopped waiting in the queue): then nothing is to be generated."""
        if not self._publish(ReplyStart(worker=self.worker)):
            self.cancelled.set()
            return False
        self._thread = threading.Thread(target=self._run, name="generation-reply", daemon=True)
        self._thread.start()
        return True

    def token(self, token: ReplyToken) -> bool:
        """Hand one token over; True when the generation should stop (a stop sequence was met or
        the client left)."""
        self.completion_tokens += 1
        out, stopped = self.scanner.feed(token)
        if out:
            self._queue.put(out)
        if stopped:
            self.stopped = True
        return stopped or self.cancelled.is_set()

    def end(self, finish_reason: str, prompt_tokens: int) -> None:
        rest = self.scanner.rest()
        if rest:
            self._queue.put(rest)
        reason = "cancelled" if self.cancelled.is_set() else ("stop" if self.stopped else finish_reason)
        self._queue.put(
            ReplyEnd(
                finish_reason=reason,  # type: ignore[arg-type] # one of the three
                prompt_tokens=prompt_tokens,
                completion_tokens=self.completion_tokens,
            )
        )
        self.close()

    def fail(self, code: str, message: str) -> None:
        self._queue.put(ReplyError(code=code, message=message[:2000]))
        self.close()

    def close(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        self._queue.put(_END)
        self._thread.join(timeout)
        self._thread = None

    # -- the reply thread ---------------------------------------------------------------

    def _publish(self, message: ReplyMessage) -> bool:
        try:
            receivers = self.client.publish(self.channel, reply_encoder.encode(message))
        except redis.RedisError:
            # The events still tell the story; the client will hear nothing and time out.
            logger.warning("Reply on %s not sent: Redis unreachable", self.channel, exc_info=True)
            return True
        return bool(receivers)

    def _run(self) -> None:
        get = self._queue.get
        while True:
            try:
                item = get(timeout=self.ping_s)
            except queue.Empty:
                if not self._publish(ReplyPing()):
                    self.cancelled.set()
                continue
            items = [item]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            tokens = [t for part in items if isinstance(part, list) for t in part]
            if tokens and not self._publish(ReplyTokens(tokens=tokens)):
                self.cancelled.set()
            for part in items:
                if isinstance(part, ReplyMessage):
                    self._publish(part)
            if any(part is _END for part in items):
                return


class ServingClaim:
    """Keeps this worker's name in the sorted set of each model it serves (``serving_key``),
    renewed every ``SERVING_RENEW_S``; withdrawn on ``stop``."""

    def __init__(self, client: redis.Redis, worker: str, models: list[str] | None) -> None:
        self.client, self.worker = client, worker
        self.keys = [serving_key(m) for m in models] if models else [serving_key(None)]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def renew(self) -> None:
        seconds, micros = self.client.time()  # Redis's clock: the one the control plane reads claims by
        now_ms = seconds * 1000 + micros // 1000
        pipe = self.client.pipeline(transaction=False)
        for key in self.keys:
            pipe.zadd(key, {self.worker: now_ms + int(SERVING_TTL_S * 1000)})
            pipe.zremrangebyscore(key, 0, now_ms)  # lapsed claims
        pipe.execute()

    def start(self) -> None:
        """Claim now (the worker is ready to be sent requests once this returns), then renew."""
        self._renew_or_say()
        self._thread = threading.Thread(target=self._run, name="serving-claim", daemon=True)
        self._thread.start()

    def _renew_or_say(self) -> None:
        try:
            self.renew()
        except redis.RedisError:
            logger.warning("Could not renew this worker's serving claim", exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(SERVING_RENEW_S):
            self._renew_or_say()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in self.keys:
                pipe.zrem(key, self.worker)
            pipe.execute()
        except redis.RedisError:
            logger.warning("Could not withdraw this worker's serving claim (it lapses by itself)")
