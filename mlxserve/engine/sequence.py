"""One generation as the scheduler runs it: its sampler, its tokens, its events and its reply.

A ``Sequence`` takes its tokens one at a time from whichever way the scheduler produces them
(mlx-lm's single-sequence ``generate_step`` when it runs alone, its ``BatchGenerator`` when it
shares the model with others) and does for each what a generation owes: the text (a streaming
detokenizer of its own), the ``tokenGenerated`` events a batch at a time, the per-token metrics,
the client's reply, and the end (end of sequence, ``max_tokens``, a stop sequence, the client
gone). Its sampler has a random key of its own, so a seeded request samples the same tokens
whatever else runs beside it.
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlxserve.contract.serving import ReplyToken
from mlxserve.engine.emitter import EngineEventEmitter
from mlxserve.engine.metrics import observe_many
from mlxserve.engine.reply import GenerationReply

# A generation's token events are recorded as the tokens come (a clock read and a list append)
# and sent a batch at a time: when this many are waiting, when the last batch left the
# publisher's linger ago (a slow model's tokens leave one by one; the engine's
# ``token_linger_s``), at the first token and at the end. A batch costs about 200 µs however
# small (between mlx-lm's steps its code runs cold) plus about 10 µs a token, so batches are as
# long as the publisher's own linger allows: a token's event reaches Redis at most two lingers
# after the token (bench/generation_overhead.py).
TOKEN_BATCH = 128


@dataclass
class TelemetryCost:
    """What telemetry costs the generation thread: nanoseconds spent after each token on
    its event and metrics, summed, and the tokens (bench/generation_overhead.py reads it)."""

    ns: int = 0
    tokens: int = 0

    def per_token_us(self) -> float:
        return self.ns / 1000 / self.tokens if self.tokens else 0.0


class KeyedSampler:
    """mlx-lm's temperature and nucleus sampling with a random key of the generation's own.

    mlx-lm's ``make_sampler`` draws from mlx's global key, which every sequence of a batch would
    share: a seed would then say nothing about the tokens. Here each generation splits its own
    key (from its seed, or a random one) once a sampled token, so the same seeded request gives
    the same tokens alone or batched. ``rewind`` takes back the last draw: a sequence moved
    between mlx-lm's two ways of generating has its last sampled token computed again.
    Temperature 0 is the argmax and draws nothing.
    """

    __slots__ = ("_mx", "_previous", "_top_p", "key", "temperature", "top_p")

    def __init__(self, temperature: float, top_p: float, seed: int | None) -> None:
        import mlx.core as mx
        from mlx_lm.sample_utils import apply_top_p

        self._mx, self.temperature, self.top_p = mx, temperature, top_p
        self._top_p = (lambda logprobs: apply_top_p(logprobs, top_p)) if 0 < top_p < 1 else None
        self.key = mx.random.key(seed if seed is not None else secrets.randbits(63))
        self._previous: Any = None

    def __call__(self, logprobs: Any) -> Any:
        mx = self._mx
        if self.temperature == 0:
            return mx.argmax(logprobs, axis=-1)
        if self._top_p is not None:
            logprobs = self._top_p(logprobs)
        self._previous = self.key
        self.key, draw = mx.random.split(self.key)
        return mx.random.categorical(logprobs * (1.0 / self.temperature), key=draw)

    def rewind(self) -> None:
        if self._previous is not None:
            self.key, self._previous = self._previous, None


def sampler_for(temperature: float, top_p: float, seed: int | None) -> Any:
    """Generations that need no key of their own share one sampler per setting: the greedy ones
    mlx-lm's argmax, unseeded ones mlx-lm's ``make_sampler`` (mlx's global key), so a batch of them
    samples in one op, as mlx-lm's own batches do (mlx-lm samples a batch in one call only when
    every row has the same sampler). A seeded one gets a ``KeyedSampler``: its tokens are its seed's."""
    if temperature == 0:
        from mlx_lm.sample_utils import greedy_sampler

        return greedy_sampler
    if seed is None:
        return _shared_sampler(temperature, top_p)
    return KeyedSampler(temperature, top_p, seed)


@functools.lru_cache(maxsize=64)
def _shared_sampler(temperature: float, top_p: float) -> Any:
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=temperature, top_p=top_p)


class TokenEvents:
    """One generation's tokenGenerated events and per-token metrics, a batch at a time.

    The generation appends to ``waiting`` what an event needs: the time, the text and the
    log-probability (``logprob_reader``). ``flush`` emits the waiting tokens' events
    (``EngineEventEmitter.tokens_generated``), observes their inter-token latencies and adds
    them to the tokens counter.
    """

    __slots__ = ("emitter", "generation_id", "itl", "last_ns", "model", "seq", "tokens_counter", "waiting")

    def __init__(
        self, emitter: EngineEventEmitter, generation_id: str, model: str, tokens_counter: Any, itl: Any
    ) -> None:
        self.emitter, self.generation_id, self.model = emitter, generation_id, model
        self.tokens_counter, self.itl = tokens_counter, itl
        self.waiting: list[tuple[int, str, Any]] = []  # (perf_counter_ns, text, logprob or (row, token))
        self.seq = 0  # the last seq sent
        self.last_ns: int | None = None  # the previous token's time, for inter-token latency

    def flush(self) -> None:
        waiting, self.waiting = self.waiting, []
        if not waiting:
            return
        logprobs = [logprob for _, _, logprob in waiting]
        if type(logprobs[0]) is tuple:  # rows kept to be read now (bfloat16)
            logprobs = logprobs_gathered(logprobs)
        to_wall_ns = time.time_ns() - time.perf_counter_ns()  # events carry wall-clock milliseconds
        first = self.seq + 1
        self.seq += len(waiting)
        last_ns = self.last_ns
        gaps = []
        for at_ns, _, _ in waiting:
            if last_ns is not None:
                gaps.append((at_ns - last_ns) / 1e9)
            last_ns = at_ns
        self.last_ns = last_ns
        observe_many(self.itl, gaps)
        self.tokens_counter.inc(len(waiting))
        self.emitter.tokens_generated(
            generation_id=self.generation_id,
            model=self.model,
            tokens=[
                (seq, (to_wall_ns + at_ns) // 1_000_000, text, logprob)
                for seq, (at_ns, text, _), logprob in zip(
                    range(first, self.seq + 1), waiting, logprobs, strict=True
                )
            ],
        )


_side_stream: Any = None


def logprob_reader(dtype: Any) -> Callable[[Any, int], Any]:
    """How a generation reads each token's log-probability from mlx-lm's computed row.

    ``row[token].item()`` would queue an op behind the next token's forward pass and wait for
    it, undoing mlx-lm's overlap of compute and Python (about 12% of tokens/s); so the row is
    read in place, through the buffer protocol, as the token comes (holding the rows for a
    batch instead costs 3-5% of tokens/s here: mlx-lm cannot reuse their buffers). A dtype
    with no buffer format, bfloat16 (most published models), cannot be read so: its rows are
    kept, ``(row, token)``, and read a batch at a time by ``logprobs_gathered``.
    """
    import mlx.core as mx
    import numpy as np

    if dtype == mx.float32:
        return lambda row, token: memoryview(row)[token]
    if dtype == mx.float16:  # a buffer format memoryview lacks, NumPy has
        return lambda row, token: float(np.asarray(row)[token])
    return lambda row, token: (row, token)


def logprobs_gathered(rows: list[tuple[Any, int]]) -> list[float]:
    """Each kept row's value at its token, in one op on a stream of its own (which waits for
    nothing queued for generation)."""
    import mlx.core as mx

    global _side_stream
    if _side_stream is None:
        _side_stream = mx.new_stream(mx.cpu)
    with mx.stream(_side_stream):
        values = mx.stack([row[token] for row, token in rows]).astype(mx.float32).tolist()
    return values  # type: ignore[return-value] # a 1-d array's list


def reply_token(reply: GenerationReply, text: str, row: Any, logprob: Any, tokenizer: Any) -> ReplyToken:
    """One token as its client gets it: the text, and when asked its log-probability (read now
    where the telemetry kept the row) and the ``top_logprobs`` most likely tokens."""
    if not reply.logprobs:
        return ReplyToken(text)
    if type(logprob) is tuple:
        kept, token = logprob
        logprob = kept[token].item()
    top = None
    if reply.top_logprobs:
        import mlx.core as mx

        ids = mx.argpartition(-row, kth=reply.top_logprobs - 1)[: reply.top_logprobs]
        values = row[ids].astype(mx.float32).tolist()
        pairs = sorted(zip(ids.tolist(), values, strict=True), key=lambda pair: -pair[1])  # type: ignore[arg-type]
        top = [(tokenizer.decode([i]), float(v)) for i, v in pairs]
    return ReplyToken(text, float(logprob), top)


class Sequence:
    """One generation from its submission to its end, fed one token at a time by the scheduler.

    ``token`` does what stream_generate's loop did for each token (the end of sequence and
    ``max_tokens`` are told apart the same way, so the token counts and texts are the same), and
    telemetry's part of it: the token's event waits in ``events`` and leaves a batch at a time,
    its latency is the time of the step that made it. ``done`` is set when the generation ended,
    with ``result`` or ``error``.
    """

    def __init__(
        self,
        request: Any,  # engine.GenerationRequest
        reply: GenerationReply | None,
        on_token: Callable[[str], None] | None,
    ) -> None:
        self.request, self.reply, self.on_token = request, reply, on_token
        self.submitted = time.perf_counter()
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.told_started = False
        # Set when the scheduler prepares it (the model loaded, the prompt tokenized):
        self.loaded: Any = None
        self.prompt_ids: list[int] = []
        self.kv_tokens = 0  # prompt and max_tokens: what its key-value cache may grow to
        self.cache: Any = None  # its own cache while it runs alone
        self.uid: int | None = None  # its place in a BatchGenerator while it shares one
        self.batch_tokens = 0  # tokens made since it joined its current batch
        self.n = 0
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self.telemetry_ns = 0

    def prepare(
        self, loaded: Any, prompt_ids: list[int], emitter: EngineEventEmitter, metrics: Any, linger_ns: int
    ) -> None:
        request = self.request
        self.loaded, self.prompt_ids = loaded, prompt_ids
        self.kv_tokens = len(prompt_ids) + request.max_tokens
        self.detokenizer = loaded.tokenizer.detokenizer
        self.eos = set(loaded.tokenizer.eos_token_ids)
        self.sampler = sampler_for(request.temperature, request.top_p, request.seed)
        self.events = TokenEvents(
            emitter,
            request.generation_id,
            request.model,
            metrics.series(metrics.tokens_generated, model=request.model),
            metrics.series(metrics.inter_token_latency, model=request.model),
        )
        self.ttft = metrics.series(metrics.time_to_first_token, model=request.model)
        self.flushed_ns = time.perf_counter_ns()
        self.linger_ns = linger_ns
        self.read_logprob: Callable[[Any, int], Any] | None = None

    @property
    def remaining(self) -> int:
        return int(self.request.max_tokens) - self.n

    def token(self, token: int, row: Any, now_ns: int) -> bool:
        """Take the next token and its log-probability row; True when the generation has ended."""
        self.n = n = self.n + 1
        self.tokens.append(token)
        self.batch_tokens += 1
        detokenizer = self.detokenizer
        finish = None
        if token in self.eos:
            detokenizer.finalize()
            finish = "stop"
        else:
            detokenizer.add_token(token)
            if n >= self.request.max_tokens:
                detokenizer.finalize()
                finish = "length"
        text = detokenizer.last_segment
        telemetry_ns = time.perf_counter_ns()  # from here to the flush: what telemetry costs a token
        if self.read_logprob is None:
            self.read_logprob = logprob_reader(row.dtype)
        logprob = self.read_logprob(row, token)
        waiting = self.events.waiting
        waiting.append((now_ns, text, logprob))
        if len(waiting) >= TOKEN_BATCH or now_ns - self.flushed_ns >= self.linger_ns or n == 1:
            if n == 1:
                self.first_ns = now_ns
                self.ttft.observe(now_ns / 1e9 - self.submitted)
            self.events.flush()
            self.flushed_ns = now_ns
        self.last_ns = now_ns
        self.telemetry_ns += time.perf_counter_ns() - telemetry_ns
        self.pieces.append(text)
        if self.on_token is not None:
            self.on_token(text)
        reply = self.reply
        if reply is not None and reply.token(reply_token(reply, text, row, logprob, self.loaded.tokenizer)):
            finish = "cancelled" if reply.cancelled.is_set() else "stop"
        if finish is not None:
            self.finish_reason = finish
            return True
        return False

    def flush(self) -> None:
        """Send the tokens still waiting (the end, or a failure: tokens made are told first)."""
        started = time.perf_counter_ns()
        self.events.flush()
        self.telemetry_ns += time.perf_counter_ns() - started
