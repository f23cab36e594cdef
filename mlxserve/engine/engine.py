"""The generation engine: mlx-lm behind a model cache, emitting every lifecycle event.

Plain Python, no Celery and no Django: a worker process drives it through a
thin task, tests and benchmarks drive it directly. Each event comes from the
code path where the thing happens.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from msgspec import UNSET

from mlxserve.contract.events import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    tokens_per_second,
)
from mlxserve.contract.serving import ReplyToken
from mlxserve.contract.telemetry import LABEL_VALUE_LENGTH
from mlxserve.contract.validation import EngineError
from mlxserve.engine.emitter import EngineEventEmitter
from mlxserve.engine.metrics import WorkerMetrics, observe_many
from mlxserve.engine.models import (
    LoadedModel,
    ModelCache,
    files_fingerprint,
    parameters_counted,
    quantization_of,
    resolve_model_path,
)
from mlxserve.engine.reply import GenerationReply

logger = logging.getLogger(__name__)


# A generation's token events are recorded as the tokens come (a clock read and a list append)
# and sent a batch at a time: when this many are waiting, when the last batch left this long
# ago (a slow model's tokens leave one by one), at the first token and at the end. A batch
# costs about 200 µs however small (between mlx-lm's steps its code runs cold) plus about
# 10 µs a token, so batches are as long as the publisher's own linger allows: a token's event
# reaches Redis at most half a second after the token (bench/generation_overhead.py).
TOKEN_BATCH = 128
TOKEN_BATCH_LINGER_NS = 250_000_000


class _TokenEvents:
    """One generation's tokenGenerated events and per-token metrics, a batch at a time.

    The generation loop appends to ``waiting`` what an event needs: the time, the text and the
    log-probability (``_logprob_reader``). ``flush`` emits the waiting tokens' events
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
            logprobs = _logprobs_gathered(logprobs)
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


def _logprob_reader(dtype: Any) -> Callable[[Any, int], Any]:
    """How a generation reads each token's log-probability from mlx-lm's computed row.

    ``row[token].item()`` would queue an op behind the next token's forward pass and wait for
    it, undoing mlx-lm's overlap of compute and Python (about 12% of tokens/s); so the row is
    read in place, through the buffer protocol, as the token comes (holding the rows for a
    batch instead costs 3-5% of tokens/s here: mlx-lm cannot reuse their buffers). A dtype
    with no buffer format, bfloat16 (most published models), cannot be read so: its rows are
    kept, ``(row, token)``, and read a batch at a time by ``_logprobs_gathered``.
    """
    import mlx.core as mx
    import numpy as np

    if dtype == mx.float32:
        return lambda row, token: memoryview(row)[token]
    if dtype == mx.float16:  # a buffer format memoryview lacks, NumPy has
        return lambda row, token: float(np.asarray(row)[token])
    return lambda row, token: (row, token)


def _logprobs_gathered(rows: list[tuple[Any, int]]) -> list[float]:
    """Each kept row's value at its token, in one op on a stream of its own (which waits for
    nothing queued for generation)."""
    import mlx.core as mx

    global _side_stream
    if _side_stream is None:
        _side_stream = mx.new_stream(mx.cpu)
    with mx.stream(_side_stream):
        values = mx.stack([row[token] for row, token in rows]).astype(mx.float32).tolist()
    return values  # type: ignore[return-value] # a 1-d array's list


def _reply_token(reply: GenerationReply, response: Any, logprob: Any, tokenizer: Any) -> ReplyToken:
    """One token as its client gets it: the text, and when asked its log-probability (read now
    where the telemetry kept the row) and the ``top_logprobs`` most likely tokens."""
    if not reply.logprobs:
        return ReplyToken(response.text)
    if type(logprob) is tuple:
        row, token = logprob
        logprob = row[token].item()
    top = None
    if reply.top_logprobs:
        import mlx.core as mx

        row = response.logprobs
        ids = mx.argpartition(-row, kth=reply.top_logprobs - 1)[: reply.top_logprobs]
        values = row[ids].astype(mx.float32).tolist()
        pairs = sorted(zip(ids.tolist(), values, strict=True), key=lambda pair: -pair[1])  # type: ignore[arg-type]
        top = [(tokenizer.decode([i]), float(v)) for i, v in pairs]
    return ReplyToken(response.text, float(logprob), top)


@dataclass
class TelemetryCost:
    """What telemetry costs the generation thread: nanoseconds spent after each token on
    its event and metrics, summed, and the tokens (bench/generation_overhead.py reads it)."""

    ns: int = 0
    tokens: int = 0

    def per_token_us(self) -> float:
        return self.ns / 1000 / self.tokens if self.tokens else 0.0


@dataclass(frozen=True)
class GenerationRequest:
    model: str  # the name events carry: a registry name, a path or a repo id
    prompt: str | dict[str, Any]
    max_tokens: int = DEFAULT_MAX_TOKENS
    model_path: str | None = None  # where to load it from, when the name is not itself a path
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None
    generation_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    attempt: int = 1
    stop: tuple[str, ...] = ()  # stop sequences (cut on the reply; the events keep every token)


@dataclass
class GenerationResult:
    generation_id: str
    text: str
    tokens: int
    duration_s: float
    time_to_first_token_s: float | None
    tokens_per_second: float
    finish_reason: str | None


@dataclass
class _Progress:
    seq: int = 0  # the last seq emitted for the generation under way


class Engine:
    def __init__(
        self,
        *,
        emitter: EngineEventEmitter,
        metrics: WorkerMetrics,
        cache: ModelCache | None = None,
        heartbeat_seconds: float = 60.0,
        watch_seconds: float = 2.0,
    ) -> None:
        self.emitter = emitter
        self.metrics = metrics
        self.cache = cache if cache is not None else ModelCache()  # an empty cache is falsy
        self.heartbeat_seconds = heartbeat_seconds
        self.watch_seconds = watch_seconds
        self.status = "ready"
        self.active_tasks = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._heartbeat_changed = threading.Event()
        self._threads: list[threading.Thread] = []
        self.telemetry_cost = TelemetryCost()
        self.status_metadata: dict[str, Any] = {}  # sent with every runtimeStatus

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> Engine:
        self._status("ready")
        for target, name in (
            (self._heartbeat_loop, "engine-heartbeat"),
            (self._watch_loop, "engine-file-watch"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self._heartbeat_changed.set()
        with self._lock:
            for name in self.cache.names():
                self._unload(name, "shutdown")
            self._status("shutdown")
        for thread in self._threads:
            thread.join(timeout=2)

    def set_heartbeat_interval(self, seconds: float) -> None:
        self.heartbeat_seconds = seconds
        self._heartbeat_changed.set()

    def set_config_version(self, version: int) -> None:
        """Say in every runtimeStatus from now on which telemetry config version this worker
        runs (``metadata.configVersion``), starting with one sent now: the admin shows which
        workers have applied a change."""
        self.status_metadata["configVersion"] = version
        self._status(self.status)

    def _status(self, status: str, **metadata: Any) -> None:
        self.status = status
        metadata = {**self.status_metadata, **metadata}
        self.emitter.runtime_status(
            status=status,
            models_loaded=len(self.cache),
            active_tasks=self.active_tasks,
            **({"metadata": metadata} if metadata else {}),
        )

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            self._heartbeat_changed.wait(self.heartbeat_seconds)
            if self._heartbeat_changed.is_set():
                self._heartbeat_changed.clear()  # the interval changed: start a new wait
                continue
            if not self._stop.is_set():
                with self._lock:
                    self._status(self.status, heartbeat=True)

    def _watch_loop(self) -> None:
        while not self._stop.wait(self.watch_seconds):
            with self._lock:
                for name in self.cache.names():
                    self._check_files(name)

    # -- models ---------------------------------------------------------------------

    def _check_files(self, name: str) -> bool:
        """Invalidate ``name`` if its files changed on disk. True if it is still good."""
        loaded = self.cache.peek(name)
        if loaded is None:
            return False
        try:
            current = files_fingerprint(loaded.path)
        except OSError:
            current = {}
        if current == loaded.fingerprint:
            return True
        self.cache.pop(name)
        self.emitter.model_invalidated(model=name, reason="file-changed")
        self.metrics.series(self.metrics.models_unloaded, model=name, reason="file-changed").inc()
        logger.info("Model %s changed on disk: dropped, the next request reloads it", name)
        return False

    def load(self, model: str, model_path: str | None = None) -> LoadedModel:
        with self._lock:
            if self.cache.peek(model) is not None and self._check_files(model):
                loaded = self.cache.get(model)
                assert loaded is not None
                return loaded
            path = resolve_model_path(model, model_path)
            fingerprint = files_fingerprint(path)
            started = time.perf_counter()
            try:
                import mlx.core as mx
                from mlx.utils import tree_flatten
                from mlx_lm import load as mlx_load

                loaded_parts: Any = mlx_load(str(path), return_config=True)
                mlx_model, tokenizer, config = loaded_parts
            except Exception as exc:
                raise EngineError("ModelLoadFailed", f"Loading {model} from {path} failed: {exc}") from exc
            load_seconds = time.perf_counter() - started
            flat: Any = tree_flatten(mlx_model.parameters())
            named = [(n, w) for n, w in flat if isinstance(w, mx.array)]
            size_bytes = sum(int(w.nbytes) for _, w in named)
            quantization = quantization_of(config)
            parameters = parameters_counted(named, quantization)
            loaded = LoadedModel(
                name=model,
                path=path,
                model=mlx_model,
                tokenizer=tokenizer,
                size_bytes=size_bytes,
                parameters=parameters,
                quantization=quantization,
                fingerprint=fingerprint,
            )
            for victim in self.cache.victims_for(size_bytes):
                self._unload(victim, "cache-eviction")
            self.cache.put(loaded)
            self.metrics.series(self.metrics.models_loaded, model=model, **quantization.labels()).inc()
            self.metrics.series(self.metrics.model_load_duration, model=model).observe(load_seconds)
            facts = quantization.as_metadata()
            self.emitter.model_loaded(
                model=model,
                model_path=str(path),
                quantization=quantization.seed_value if quantization.seed_value is not None else UNSET,
                parameters=max(parameters, 1),
                metadata={
                    "loadMs": round(load_seconds * 1000, 3),
                    "sizeBytes": size_bytes,
                    **({"quantization": facts} if facts else {}),
                },
            )
            return loaded

    def _unload(self, name: str, reason: str) -> None:
        if self.cache.pop(name) is None:
            return
        self.emitter.model_unloaded(model=name, reason=reason)
        self.metrics.series(self.metrics.models_unloaded, model=name, reason=reason).inc()

    def unload(self, name: str, reason: str = "manual") -> bool:
        """Drop ``name`` from memory (an unload command). False if it was not loaded."""
        with self._lock:
            if name not in self.cache:
                return False
            self._unload(name, reason)
            return True

    # -- generation -------------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        on_token: Callable[[str], None] | None = None,
        reply: GenerationReply | None = None,
    ) -> GenerationResult:
        """Run one generation, emitting its events; raises ``EngineError`` after emitting ``error``.
        With ``reply``, its client is answered as the tokens come (``mlxserve.engine.reply``), and
        the generation stops when the client leaves or a stop sequence is met."""
        if request.model_path is not None:  # the control plane resolved a registered name
            self.metrics.label_budget.registered_models.add(request.model[:LABEL_VALUE_LENGTH])
        with self._lock:
            self.active_tasks += 1
            self._status("busy")
        progress = _Progress()
        try:
            return self._generate(request, on_token, progress, reply)
        except EngineError as exc:
            self._failed(request, exc.code, str(exc), progress.seq + 1)
            if reply is not None:
                reply.fail(exc.code, str(exc))
            raise
        except Exception as exc:
            self._failed(request, "GenerationFailed", f"{type(exc).__name__}: {exc}", progress.seq + 1)
            if reply is not None:
                reply.fail("GenerationFailed", f"{type(exc).__name__}: {exc}")
            raise EngineError("GenerationFailed", str(exc)) from exc
        finally:
            with self._lock:
                self.active_tasks -= 1
                self._status("ready")

    def _failed(self, request: GenerationRequest, code: str, message: str, seq: int) -> None:
        self.metrics.series(self.metrics.generation_errors, model=request.model, code=code).inc()
        self.metrics.series(self.metrics.errors, code=code).inc()
        self.emitter.error(
            error=message,
            code=code,
            model=request.model,
            generation_id=request.generation_id,
            seq=seq,
            metadata={"attempt": request.attempt},
        )
        with self._lock:
            self._status("error", code=code)

    def dropped(self, request: GenerationRequest, why: str) -> GenerationResult:
        """End a generation taken too late (nobody waits for it any more, or its time in the queue
        ran out) without loading anything: ``generationStarted`` then ``generationCompleted``
        with no token, ``finishReason: "cancelled"`` (``metadata.dropped`` says why)."""
        self.emitter.generation_started(
            generation_id=request.generation_id,
            model=request.model,
            prompt=request.prompt,
            max_tokens=request.max_tokens,
            metadata={"attempt": request.attempt, "dropped": why},
        )
        self.emitter.generation_completed(
            generation_id=request.generation_id,
            seq=1,
            model=request.model,
            tokens_generated=0,
            duration_ms=0.0,
            metadata={"attempt": request.attempt, "finishReason": "cancelled", "dropped": why},
        )
        logger.info("Generation %s dropped without generating: %s", request.generation_id, why)
        return GenerationResult(request.generation_id, "", 0, 0.0, None, 0.0, "cancelled")

    def _generate(
        self,
        request: GenerationRequest,
        on_token: Callable[[str], None] | None,
        progress: _Progress,
        reply: GenerationReply | None,
    ) -> GenerationResult:
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        started = time.perf_counter()
        emitter, gid, model = self.emitter, request.generation_id, request.model
        emitter.generation_started(
            generation_id=gid,
            model=model,
            prompt=request.prompt,
            max_tokens=request.max_tokens,
            metadata={
                "attempt": request.attempt,
                "temperature": request.temperature,
                "topP": request.top_p,
                **({"seed": request.seed} if request.seed is not None else {}),
            },
        )
        loaded = self.load(model, request.model_path)
        prompt = self._prompt_text(loaded, request.prompt)
        if request.seed is not None:
            mx.random.seed(request.seed)
        sampler = make_sampler(temp=request.temperature, top_p=request.top_p)
        tokens = _TokenEvents(
            emitter,
            gid,
            model,
            self.metrics.series(self.metrics.tokens_generated, model=model),
            self.metrics.series(self.metrics.inter_token_latency, model=model),
        )
        waiting, pieces = tokens.waiting, []
        seq = telemetry_ns = 0
        first_token_at: float | None = None
        last_token_at = started
        finish_reason = None
        perf_counter_ns = time.perf_counter_ns
        flushed_ns = perf_counter_ns()  # when tokens were last sent: none waits longer than the linger
        read_logprob: Callable[[Any, int], Any]  # chosen by the first token's dtype
        prompt_tokens = 0
        try:
            for response in stream_generate(
                loaded.model, loaded.tokenizer, prompt, max_tokens=request.max_tokens, sampler=sampler
            ):
                now_ns = perf_counter_ns()
                seq += 1
                progress.seq = seq
                if seq == 1:
                    read_logprob = _logprob_reader(response.logprobs.dtype)
                logprob = read_logprob(response.logprobs, response.token)
                waiting.append((now_ns, response.text, logprob))
                if len(waiting) >= TOKEN_BATCH or now_ns - flushed_ns >= TOKEN_BATCH_LINGER_NS or seq == 1:
                    if seq == 1:
                        first_token_at = now_ns / 1e9
                        self.metrics.series(self.metrics.time_to_first_token, model=model).observe(
                            first_token_at - started
                        )
                    tokens.flush()
                    waiting, flushed_ns = tokens.waiting, now_ns
                telemetry_ns += perf_counter_ns() - now_ns
                pieces.append(response.text)
                if on_token is not None:
                    on_token(response.text)
                finish_reason = response.finish_reason
                if reply is not None:
                    prompt_tokens = response.prompt_tokens
                    if reply.token(_reply_token(reply, response, logprob, loaded.tokenizer)):
                        finish_reason = "cancelled" if reply.cancelled.is_set() else "stop"
                        break
            if seq:
                last_token_at = now_ns / 1e9
                flush_started_ns = perf_counter_ns()
                tokens.flush()  # the last batch, timed as the others are
                telemetry_ns += perf_counter_ns() - flush_started_ns
        except BaseException:
            try:  # the tokens made before the failure are told before it is
                tokens.flush()
            except Exception:
                logger.exception("Token events of a failed generation could not be sent")
            raise
        finally:
            self.telemetry_cost.ns += telemetry_ns
            self.telemetry_cost.tokens += seq
        duration = time.perf_counter() - started
        generating = (last_token_at - first_token_at) if first_token_at is not None else 0.0
        throughput = tokens_per_second(seq, generating) or 0.0
        self.metrics.series(self.metrics.generation_duration, model=model).observe(duration)
        emitter.generation_completed(
            generation_id=gid,
            seq=seq + 1,
            model=model,
            tokens_generated=seq,
            duration_ms=duration * 1000,
            throughput=throughput,
            metadata={
                "attempt": request.attempt,
                "finishReason": finish_reason or "stop",
                "timeToFirstTokenMs": round((first_token_at - started) * 1000, 3) if first_token_at else None,
            },
        )
        if reply is not None:
            reply.end(finish_reason or "stop", prompt_tokens)
        return GenerationResult(
            generation_id=gid,
            text="".join(pieces),
            tokens=seq,
            duration_s=duration,
            time_to_first_token_s=(first_token_at - started) if first_token_at else None,
            tokens_per_second=throughput,
            finish_reason=finish_reason,
        )

    @staticmethod
    def _prompt_text(loaded: LoadedModel, prompt: str | dict[str, Any]) -> str:
        """A string is used as is; ``{"messages": [...]}`` goes through the model's chat template."""
        if isinstance(prompt, str):
            return prompt
        messages = prompt.get("messages")
        tokenizer = loaded.tokenizer
        if isinstance(messages, list) and getattr(tokenizer, "chat_template", None):
            return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        if isinstance(messages, list):
            return (
                "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)
                + "\nassistant:"
            )
        return json.dumps(prompt)
