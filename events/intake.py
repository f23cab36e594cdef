"""Events posted over the API: validated, bound to their producer, within budget, onto the stream.

A producer account named ``N`` may post only events whose ``source`` is ``N`` or starts
with ``N/``; staff may post any source. Every account has an event budget (events, not
requests, per period, shared by every web process through Redis), and while the stream's
backlog of entries not yet stored is past its limit, posts are refused with 503 so that
one producer cannot fill the Redis that Celery and everyone else rely on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis
from django.conf import settings

from events.responses import BatchOutcome, Rejected
from mlxserve.bus import backlog_refusal, stream_append, stream_append_batch
from mlxserve.contract.events import Envelope, envelope_encode, envelope_validate
from mlxserve.contract.validation import Issue, ValidationFailed
from mlxserve.redis_conn import redis_clock

# Envelopes one POST may carry. A 1 MiB body holds about 5,000 real envelopes; without a cap
# it could hold 500,000 one-byte items, each answered with an error object (100 MB out).
MAX_BATCH_ITEMS = 5000


class IntakeRefused(Exception):
    """A post refused whole: ``status`` and the error object (``code``, ``message``)."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after

    def as_error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


def source_refusal(producer: str | None, source: str) -> IntakeRefused | None:
    """Why ``producer`` may not post as ``source`` (None: it may). ``producer`` None is staff."""
    if producer is None or source == producer or source.startswith(producer + "/"):
        return None
    return IntakeRefused(
        403,
        "Forbidden",
        f"Producer '{producer}' may only post events whose source is '{producer}' or starts with "
        f"'{producer}/'; this one's is '{source[:200]}'",
    )


# Admit the sources of a post to the account's set of recent sources (a sorted set: source -> when
# last used), unless that would pass the limit; returns the sources refused. One round trip, atomic.
_SOURCES = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local limit = tonumber(ARGV[3])
local count = redis.call('ZCARD', KEYS[1])
local refused = {}
for i = 5, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
  elseif count < limit then
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
    count = count + 1
  else
    table.insert(refused, ARGV[i])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return refused
"""


def sources_admit(*, client: redis.Redis, producer: str, sources: Sequence[str]) -> set[str]:
    """Which of ``sources`` the producer may not post as: each account posts as at most
    ``MLXSERVE_SOURCES_PER_PRODUCER`` distinct sources over ``MLXSERVE_WORKER_FORGET_AFTER``
    (shared by every web process through Redis), so what one account can make grow (worker rows,
    series, pages) is bounded. New sources are admitted in the order given."""
    if not sources:
        return set()
    now_ms = time.time_ns() // 1_000_000
    window_ms = settings.WORKER_FORGET_AFTER_S * 1000
    refused: Any = client.eval(  # type: ignore[no-untyped-call]
        _SOURCES,
        1,
        f"mlxserve:producer-sources:{producer}",
        now_ms,
        now_ms - window_ms,
        settings.SOURCES_PER_PRODUCER,
        settings.WORKER_FORGET_AFTER_S,
        *sources,
    )
    return {s.decode() if isinstance(s, bytes) else str(s) for s in refused or []}


def _too_many_sources(producer: str, source: str) -> IntakeRefused:
    return IntakeRefused(
        403,
        "Forbidden",
        f"Producer '{producer}' already posts as {settings.SOURCES_PER_PRODUCER} sources "
        f"(MLXSERVE_SOURCES_PER_PRODUCER); a new one, '{source[:200]}', is refused until one of them "
        "has been silent for MLXSERVE_WORKER_FORGET_AFTER",
    )


def event_submit(*, client: redis.Redis, stream: str, data: Any, account: str, producer: str | None) -> str:
    """One envelope: validate it, check its source and the budget, append it. Returns its id."""
    envelope = envelope_validate(data, now_ms=redis_clock.now_ms(client))
    refusal = source_refusal(producer, envelope.source)
    if refusal is not None:
        raise refusal
    if producer is not None and sources_admit(client=client, producer=producer, sources=[envelope.source]):
        raise _too_many_sources(producer, envelope.source)
    _admit(client, stream, account, 1)
    stream_append(client, stream, [envelope_encode(envelope)])
    return str(envelope.id)


def event_submit_batch(
    *, client: redis.Redis, stream: str, items: Sequence[Any], account: str, producer: str | None
) -> BatchOutcome:
    """An array of envelopes: the valid ones of this producer go to the stream whatever the others hold."""
    if len(items) > MAX_BATCH_ITEMS:
        message = f"Too many envelopes in one request ({len(items)}; at most {MAX_BATCH_ITEMS})"
        raise ValidationFailed([Issue([], message, "too_big")])
    outcome = BatchOutcome(accepted=[], rejected=[])
    valid: list[Envelope] = []
    indexes: list[int] = []
    now_ms = redis_clock.now_ms(client)  # the receiving clock: Redis's, as the ingester's check
    for index, item in enumerate(items):
        try:
            envelope = envelope_validate(item, now_ms=now_ms)
        except ValidationFailed as exc:
            outcome.rejected.append(Rejected(index=index, error=exc.as_error()))
            continue
        refusal = source_refusal(producer, envelope.source)
        if refusal is not None:
            outcome.rejected.append(Rejected(index=index, error=refusal.as_error()))
            continue
        valid.append(envelope)
        indexes.append(index)
    if producer is not None and valid:
        refused_sources = sources_admit(
            client=client, producer=producer, sources=list(dict.fromkeys(e.source for e in valid))
        )
        if refused_sources:
            for index, envelope in zip(indexes, valid, strict=True):
                if envelope.source in refused_sources:
                    error = _too_many_sources(producer, envelope.source).as_error()
                    outcome.rejected.append(Rejected(index=index, error=error))
            valid = [e for e in valid if e.source not in refused_sources]
            outcome.rejected.sort(key=lambda r: r.index)
    if valid:
        _admit(client, stream, account, len(valid))
    # One stream entry for the whole batch, as workers send theirs.
    stream_append_batch(client, stream, [envelope_encode(e) for e in valid])
    outcome.accepted = [str(e.id) for e in valid]
    return outcome


def _admit(client: redis.Redis, stream: str, account: str, events: int) -> None:
    """Refuse the post (nothing kept) when the backlog is past its limit or the budget would be."""
    refusal = backlog_refusal(
        client=client,
        stream=stream,
        group=settings.EVENTS_CONSUMER_GROUP,
        max_entries=settings.STREAM_BACKLOG_LIMIT,
        max_bytes=settings.STREAM_BACKLOG_BYTES,
    )
    if refusal is not None:
        raise IntakeRefused(
            503, "Unavailable", f"The event stream is full: {refusal}; nothing was accepted, retry later", 5
        )
    if settings.PRODUCER_EVENT_RATE:
        budget_spend(client=client, account=account, events=events, rate=settings.PRODUCER_EVENT_RATE)


_PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# Add ``events`` to this window's count unless that would pass the limit; one round trip,
# atomic, so concurrent posts in every web process share one count.
_SPEND = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local events, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if used + events > limit then
  return -1
end
redis.call('INCRBY', KEYS[1], events)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return used + events
"""


def parse_rate(rate: str) -> tuple[int, int]:
    """DRF's rate form, ``N/period`` (``60000/min``, ``100/s``): (events, seconds)."""
    number, _, period = rate.partition("/")
    try:
        count, seconds = int(number), _PERIODS[period[:1]]
    except (ValueError, KeyError):
        raise ValueError(f"A rate is N/s, N/min, N/hour or N/day, not {rate!r}") from None
    return count, seconds


def budget_spend(*, client: redis.Redis, account: str, events: int, rate: str) -> None:
    """Count ``events`` against ``account``'s budget, or raise 429 (``IntakeRefused``) counting nothing.

    Fixed windows of the rate's period: simple and shared by every process; a producer can
    at most send twice its rate across the boundary of two windows.
    """
    limit, seconds = parse_rate(rate)
    window = int(time.time()) // seconds
    key = f"mlxserve:event-budget:{account}:{window}"
    if events > limit or client.eval(_SPEND, 1, key, events, limit, seconds * 2) == -1:  # type: ignore[no-untyped-call]
        retry_after = max(1, (window + 1) * seconds - int(time.time()))
        raise IntakeRefused(
            429,
            "Throttled",
            f"Event budget of {rate} used up for this account ({events} more would pass it); "
            f"nothing was accepted, retry in {retry_after} s",
            retry_after=retry_after,
        )
