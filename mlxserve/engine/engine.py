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
from dataclasses import dataclass
from typing import Any

import msgspec
from msgspec import UNSET

from mlxserve.contract.generations import GenerationFields, tokens_per_second
from mlxserve.contract.telemetry import LABEL_VALUE_LENGTH
from mlxserve.contract.validation import EngineError
from mlxserve.engine.emitter import EngineEventEmitter
from mlxserve.engine.metrics import WorkerMetrics
from mlxserve.engine.models import (
    LoadedModel,
    ModelCache,
    files_fingerprint,
    parameters_counted,
    quantization_of,
    resolve_model_path,
)
from mlxserve.engine.publisher import DEFAULT_LINGER_S
from mlxserve.engine.reply import GenerationReply
from mlxserve.engine.scheduler import Scheduler
from mlxserve.engine.sequence import Sequence, TelemetryCost

logger = logging.getLogger(__name__)


class GenerationRequest(GenerationFields, frozen=True, kw_only=True):
    """A generation as the engine runs it: the request's fields (``model`` is the name events
    carry: a registry name, a path or a repo id) and what the worker adds."""

    model_path: str | None = None  # where to load it from, when the name is not itself a path
    generation_id: str = msgspec.field(default_factory=lambda: str(uuid.uuid4()))
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


class Engine:
    def __init__(
        self,
        *,
        emitter: EngineEventEmitter,
        metrics: WorkerMetrics,
        cache: ModelCache | None = None,
        heartbeat_seconds: float = 60.0,
        watch_seconds: float = 2.0,
        concurrency: int = 1,
        kv_bytes: int = 0,
        token_linger_s: float = DEFAULT_LINGER_S,
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
        self.token_linger_ns = int(token_linger_s * 1e9)  # a generation's token events wait at most this
        self.scheduler = Scheduler(self, concurrency=concurrency, kv_bytes=kv_bytes)

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
        self.scheduler.stop()
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
        It runs on the scheduler's thread, batched with whatever else this worker generates
        (``mlxserve.engine.scheduler``); this call waits for its end. With ``reply``, its client
        is answered as the tokens come (``mlxserve.engine.reply``), and the generation stops when
        the client leaves or a stop sequence is met."""
        if request.model_path is not None:  # the control plane resolved a registered name
            self.metrics.label_budget.registered_models.add(request.model[:LABEL_VALUE_LENGTH])
        sequence = Sequence(request, reply, on_token)
        with self._lock:
            self.active_tasks += 1
            self._status("busy")
        try:
            try:
                self.scheduler.submit(sequence)
            except EngineError as exc:
                self.failed(sequence, exc)
                raise
            sequence.done.wait()
        finally:
            with self._lock:
                self.active_tasks -= 1
                self._status("busy" if self.active_tasks else "ready")
        if sequence.error is not None:
            raise sequence.error
        return sequence.result  # type: ignore[no-any-return]

    def completed(self, sequence: Sequence, finish_reason: str) -> GenerationResult:
        """Tell a generation's end (the scheduler's thread): its last tokens, ``generationCompleted``
        with the finish reason, the reply's end."""
        request = sequence.request
        sequence.flush()
        self.telemetry_cost.ns += sequence.telemetry_ns
        self.telemetry_cost.tokens += sequence.n
        duration = time.perf_counter() - sequence.submitted
        first_ns = sequence.first_ns
        first_token_s = first_ns / 1e9 - sequence.submitted if first_ns is not None else None
        generating = (
            (sequence.last_ns - sequence.first_ns) / 1e9
            if sequence.first_ns is not None and sequence.last_ns is not None
            else 0.0
        )
        throughput = tokens_per_second(sequence.n, generating) or 0.0
        self.metrics.series(self.metrics.generation_duration, model=request.model).observe(duration)
        self.emitter.generation_completed(
            generation_id=request.generation_id,
            seq=sequence.n + 1,
            model=request.model,
            tokens_generated=sequence.n,
            duration_ms=duration * 1000,
            throughput=throughput,
            metadata={
                "attempt": request.attempt,
                "finishReason": finish_reason,
                "timeToFirstTokenMs": round(first_token_s * 1000, 3) if first_token_s is not None else None,
            },
        )
        if sequence.reply is not None:
            sequence.reply.end(finish_reason, len(sequence.prompt_ids))
        return GenerationResult(
            generation_id=request.generation_id,
            text="".join(sequence.pieces),
            tokens=sequence.n,
            duration_s=duration,
            time_to_first_token_s=first_token_s,
            tokens_per_second=throughput,
            finish_reason=finish_reason,
        )

    def failed(self, sequence: Sequence, exc: BaseException) -> None:
        """Tell a generation's failure: the tokens it made first, then ``error``, and its client."""
        if isinstance(exc, EngineError):
            code, message = exc.code, str(exc)
        else:
            code, message = "GenerationFailed", f"{type(exc).__name__}: {exc}"
        if sequence.loaded is not None:
            try:
                sequence.flush()
            except Exception:
                logger.exception("Token events of a failed generation could not be sent")
            self.telemetry_cost.ns += sequence.telemetry_ns
            self.telemetry_cost.tokens += sequence.n
        self._failed(sequence.request, code, message, sequence.n + 1)
        if sequence.reply is not None:
            sequence.reply.fail(code, message)

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

    @staticmethod
    def prompt_text(loaded: LoadedModel, prompt: str | dict[str, Any]) -> str:
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
