"""Serving: how a worker says which models it serves, and how it answers the client waiting on a
generation (the control plane's ``/v1/`` endpoints).

- **Which models**: a worker started with ``MLXSERVE_WORKER_MODELS`` takes tasks only from those
  models' queues (``model_queue``) and keeps its name in each model's sorted set of live workers
  (``serving_key``; score: when its claim lapses, epoch milliseconds), renewed every few seconds.
  A worker with no declared models takes the default queue, every model, and says so under
  ``serving_key(None)``. A request for a model nobody live serves is refused at once.
- **Replies**: a generation whose task asks for one (``reply``) is answered on its own pub/sub
  channel (``reply_channel``): ``start`` when a worker takes it, ``tokens`` as they come (deltas,
  stop sequences already cut), ``ping`` while nothing else is said, then ``end`` or ``error``.
  Publishing to a channel nobody listens to returns 0 receivers: that is how the worker learns the
  client left, and it stops generating. Nothing is stored (the events carry the record), so a
  generation nobody waits for costs nothing per token.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

SERVING_KEY_PREFIX = "mlxserve:serving:"
ANY_MODEL = "*"  # under serving_key(None): the workers that take the default queue (every model)
REPLY_CHANNEL_PREFIX = "mlxserve:reply:"
MODEL_QUEUE_PREFIX = "mlxserve.model."
# A worker renews its claim this often; a claim lapses this long after its last renewal.
SERVING_RENEW_S = 5.0
SERVING_TTL_S = 15.0
# While a generation says nothing else, its worker pings this often: the client's leaving is
# noticed within this long even between slow tokens (and before the first).
REPLY_PING_S = 0.1

MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20
StopSequence = Annotated[str, Meta(min_length=1, max_length=200)]
StopSequences = Annotated[list[StopSequence], Meta(max_length=MAX_STOP_SEQUENCES)]
TopLogprobs = Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)]
QueueTimeoutMs = Annotated[int, Meta(ge=1, le=86_400_000)]
EpochMs = Annotated[int, Meta(ge=0, le=2**53)]

_QUEUE_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def model_queue(model: str) -> str:
    """The Celery queue of a model's tasks. A name of plain characters is kept readable; any other
    (paths, repo ids with a slash) is named by its digest, so a queue name is always a plain key."""
    if _QUEUE_SAFE.fullmatch(model):
        return MODEL_QUEUE_PREFIX + model
    return MODEL_QUEUE_PREFIX + "sha256-" + hashlib.sha256(model.encode()).hexdigest()[:32]


def serving_key(model: str | None) -> str:
    """The sorted set of the live workers serving ``model`` (None: those that take every model)."""
    return SERVING_KEY_PREFIX + (ANY_MODEL if model is None else model_queue(model))


def reply_channel(generation_id: str) -> str:
    return REPLY_CHANNEL_PREFIX + generation_id


FinishReason = Literal["stop", "length", "cancelled"]


class ReplyToken(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """One token's delta: its text (a stop sequence cut off), and when asked its log-probability
    and the most likely alternatives, ``[text, logprob]`` each."""

    text: str
    logprob: float | None = None
    top: list[tuple[str, float]] | None = None


class ReplyMessage(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, tag_field="kind"):
    pass


class ReplyStart(ReplyMessage, tag="start"):
    worker: str = ""


class ReplyTokens(ReplyMessage, tag="tokens"):
    tokens: list[ReplyToken] = []


class ReplyPing(ReplyMessage, tag="ping"):
    pass


class ReplyEnd(ReplyMessage, tag="end"):
    finish_reason: FinishReason = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ReplyError(ReplyMessage, tag="error"):
    code: str = "GenerationFailed"
    message: str = ""


Reply = ReplyStart | ReplyTokens | ReplyPing | ReplyEnd | ReplyError
reply_encoder = msgspec.json.Encoder()
reply_decoder = msgspec.json.Decoder(Reply)
