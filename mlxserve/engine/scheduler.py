"""Continuous batching: the one thread that runs mlx for a worker's generations.

Every generation is submitted here (``Engine.generate``) and waits for its end; the scheduler's
thread does all of mlx's work, so the Celery pool's threads only wait. Up to ``concurrency``
generations run at once, the rest wait in arrival order (``kr_serve_requests_waiting``).

Per model, what runs is one of two things:

- **alone**: one generation on mlx-lm's single-sequence ``generate_step``, as fast as mlx-lm
  generates one sequence (a ``BatchGenerator`` of one costs ~6% of tokens/s on the CPU here: its
  cache keeps per-row offsets and an attention mask);
- **batched**: mlx-lm's ``BatchGenerator`` (continuous batching: a request joins at the next
  step and leaves when it ends, each with its own sampler, stop tokens and ``max_tokens``).

A request for a model that runs alone moves the running one into a batch (its cache handed over,
its last token computed again) and joins it; when one is left it goes back to running alone.
Each step's tokens go to their generations (``Sequence.token``): one generation's end, failure or
departed client removes it alone.

Memory: a request is admitted only if its key-value cache at full length fits: one that can
never fit (its prompt and ``max_tokens`` past the model's context, or past what the machine can
hold) ends with an ``error`` event at once; one that fits alone waits until enough others end.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from mlxserve.contract.validation import EngineError
from mlxserve.engine.memory import KV_MEMORY_FRACTION, kv_bytes_per_token, machine_memory_bytes, model_context
from mlxserve.engine.sequence import KeyedSampler, Sequence

if TYPE_CHECKING:
    from mlxserve.engine.models import LoadedModel

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # how long the thread sleeps between checks when a waiting request cannot start


def _rewind(sampler: Any) -> None:
    if isinstance(sampler, KeyedSampler):
        sampler.rewind()


class _ModelRun:
    """What runs for one model: one sequence alone, or a batch."""

    def __init__(self, loaded: LoadedModel, concurrency: int) -> None:
        self.loaded = loaded
        self.concurrency = concurrency
        self.sequences: list[Sequence] = []
        self.alone: Any = None  # generate_step's generator while one sequence runs alone
        self.batch: Any = None  # a BatchGenerator while several share the model
        self.by_uid: dict[int, Sequence] = {}

    def can_take(self) -> bool:
        """A second sequence needs the first one's cache handed to a batch: mlx-lm's trimmable
        caches can be (attention models); others wait for the one running to end."""
        if self.alone is None:
            return True
        from mlx_lm.models.cache import can_trim_prompt_cache

        only = self.sequences[0]
        return only.n == 0 or can_trim_prompt_cache(only.cache)

    def add(self, sequence: Sequence) -> None:
        if not self.sequences:
            self._run_alone(sequence, list(sequence.prompt_ids), None)
        else:
            if self.alone is not None:
                self._to_batch()
            self._join(sequence, list(sequence.prompt_ids), None, None)
        self.sequences.append(sequence)

    def _run_alone(self, sequence: Sequence, prompt: list[int], cache: Any) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        sequence.cache = cache if cache is not None else make_prompt_cache(self.loaded.model)
        sequence.uid = None
        self.alone = generate_step(
            mx.array(prompt),
            self.loaded.model,
            sampler=sequence.sampler,
            prompt_cache=sequence.cache,
            max_tokens=sequence.remaining,
        )

    def _join(self, sequence: Sequence, prompt: list[int], cache: Any, history: list[int] | None) -> None:
        if self.batch is None:
            from mlx_lm.generate import BatchGenerator

            self.batch = BatchGenerator(
                self.loaded.model,
                stop_tokens=[[token] for token in self.loaded.tokenizer.eos_token_ids],
                completion_batch_size=self.concurrency,
                prefill_batch_size=min(8, self.concurrency),
            )
        (uid,) = self.batch.insert(
            [prompt],
            [sequence.remaining],
            caches=[cache] if cache is not None else None,
            all_tokens=[history] if history is not None else None,
            samplers=[sequence.sampler],
        )
        sequence.uid, sequence.cache, sequence.batch_tokens = uid, None, 0
        self.by_uid[uid] = sequence

    def _to_batch(self) -> None:
        """The sequence running alone joins a batch: its cache goes with it, less the last token
        (generate_step has already run it and drawn the next one: both are done again there)."""
        from mlx_lm.models.cache import trim_prompt_cache

        (sequence,) = self.sequences
        self.alone.close()
        self.alone = None
        if sequence.n == 0:  # it had not started: it starts in the batch
            self._join(sequence, list(sequence.prompt_ids), None, None)
            return
        trim_prompt_cache(sequence.cache, 1)
        _rewind(sequence.sampler)
        history = sequence.prompt_ids + sequence.tokens[:-1]
        self._join(sequence, [sequence.tokens[-1]], sequence.cache, history)

    def _to_alone(self) -> None:
        """The one sequence left in a batch runs alone again (the same hand-over, reversed)."""
        from mlx_lm.models.cache import trim_prompt_cache

        (sequence,) = self.sequences
        caches = self.batch.remove([sequence.uid], return_prompt_caches=True)
        cache, _ = caches[sequence.uid]
        self._close_batch()
        trim_prompt_cache(cache, 1)
        _rewind(sequence.sampler)
        self._run_alone(sequence, [sequence.tokens[-1]], cache)

    def step(self) -> list[tuple[Sequence, int, Any, bool]]:
        """One step: each running sequence's next token, its log-probability row, and whether
        mlx-lm has already dropped it (its end of sequence or length)."""
        if self.alone is not None:
            token, row = next(self.alone)
            return [(self.sequences[0], token, row, False)]
        _, responses = self.batch.next()
        return [(self.by_uid[r.uid], r.token, r.logprobs, r.finish_reason is not None) for r in responses]

    def remove(self, sequence: Sequence, dropped: bool) -> None:
        self.sequences.remove(sequence)
        if self.alone is not None:
            self.alone.close()
            self.alone = None
            sequence.cache = None
        elif sequence.uid is not None:
            self.by_uid.pop(sequence.uid, None)
            if not dropped:
                self.batch.remove([sequence.uid])
            if not self.sequences:
                self._close_batch()

    def settle(self, others_waiting: bool) -> None:
        """Back to running alone when one sequence is left, in its generation phase, and no
        request for this model waits to join."""
        if (
            self.batch is not None
            and len(self.sequences) == 1
            and self.sequences[0].batch_tokens > 0
            and not others_waiting
        ):
            self._to_alone()

    def fail_all(self) -> list[Sequence]:
        sequences, self.sequences = self.sequences, []
        if self.alone is not None:
            self.alone.close()
            self.alone = None
        self._close_batch()
        return sequences

    def _close_batch(self) -> None:
        if self.batch is not None:
            self.batch.close()
            self.batch = None
        self.by_uid.clear()


class Scheduler:
    """The generation thread of an engine: admission, steps, ends (see the module's text).

    ``engine`` is the ``Engine`` it works for (its emitter, metrics, model cache, ``load``,
    ``prompt_text``, ``completed`` and ``failed``), typed loosely: the engine module imports this one.
    """

    def __init__(self, engine: Any, *, concurrency: int, kv_bytes: int = 0) -> None:
        self.engine = engine
        self.concurrency = max(1, concurrency)
        self.kv_bytes = kv_bytes  # 0: KV_MEMORY_FRACTION of the machine, less the loaded models
        self._submitted: deque[Sequence] = deque()
        self._waiting: deque[Sequence] = deque()
        self._runs: dict[str, _ModelRun] = {}
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._wired = contextlib.ExitStack()
        self._wired_on = False
        self._machine_bytes: int | None = None  # read once, at the first admission
        self._gauges = (-1, -1)  # running and waiting as last set

    # -- the callers' side -------------------------------------------------------------

    def submit(self, sequence: Sequence) -> None:
        with self._changed:
            if self._stopping:
                raise EngineError("WorkerShutdown", "The worker is shutting down: no new generation starts")
            self._submitted.append(sequence)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="engine-generation", daemon=True)
                self._thread.start()
            self._changed.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking work; generations still running end with an ``error`` (WorkerShutdown)
        after their tokens so far. A Celery worker's warm shutdown waits for its tasks first,
        so none is running by then."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        if self._thread is not None:
            self._stopped.wait(timeout)

    @property
    def running(self) -> int:
        return sum(len(run.sequences) for run in self._runs.values())

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._submitted)

    # -- the generation thread ----------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._changed:
                while not self._stopping and not self._submitted and not self._runs and not self._waiting:
                    self._wired.close()  # idle: Metal's wired memory limit back as it was
                    self._wired_on = False
                    self._changed.wait()
                if self._stopping:
                    break
                taken = list(self._submitted)
                self._submitted.clear()
            try:
                self._turn(taken)
            except Exception:  # a bug of ours: logged, and the thread goes on serving the others
                logger.exception("The generation loop failed a turn")
                time.sleep(IDLE_WAIT_S)
        self._shutdown()
        self._stopped.set()
        # The thread never ends: when a thread that ran mlx-lm's BatchGenerator exits, mlx's
        # thread-local stream is destroyed with it, and that aborts the process now and then
        # ("terminate called without an active exception", seen here on the CPU backend). Parked,
        # it costs a stack; the process's exit takes it with everything else.
        threading.Event().wait()

    def _turn(self, taken: list[Sequence]) -> None:
        """Take what was submitted, start what fits, and run one step of each model's run."""
        for sequence in taken:
            self._take(sequence)
        started = self._admit()
        if self._runs:
            for name, run in list(self._runs.items()):
                self._step(name, run)
        elif self._waiting and not started:  # nothing runs, yet the first cannot start
            with self._changed:
                self._changed.wait(IDLE_WAIT_S)
        self._observe()

    def _observe(self) -> None:
        """The running and waiting gauges, set when they change (not at every step)."""
        gauges = (self.running, self.waiting)
        if gauges != self._gauges:
            self._gauges = gauges
            self.engine.metrics.requests_running.set(gauges[0])
            self.engine.metrics.requests_waiting.set(gauges[1])

    def _take(self, sequence: Sequence) -> None:
        """A generation submitted: say it started (its own events begin here) and queue it."""
        request = sequence.request
        try:
            self.engine.emitter.generation_started(
                generation_id=request.generation_id,
                model=request.model,
                prompt=request.prompt,
                max_tokens=request.max_tokens,
                metadata={
                    "attempt": request.attempt,
                    "temperature": request.temperature,
                    "topP": request.top_p,
                    **({"seed": request.seed} if request.seed is not None else {}),
                },
            )
        except Exception as exc:
            self._fail(sequence, exc)
            return
        self._waiting.append(sequence)

    def _admit(self) -> bool:
        """Start waiting generations, first come first served, while there is room."""
        started = False
        while self._waiting:
            sequence = self._waiting[0]
            reply = sequence.reply
            if reply is not None and reply.cancelled.is_set():
                self._waiting.popleft()
                self._end(sequence, "cancelled")
                continue
            if self.running >= self.concurrency:
                break
            try:
                if sequence.loaded is None:
                    self._prepare(sequence)
            except Exception as exc:
                self._waiting.popleft()
                self._fail(sequence, exc)
                continue
            run = self._runs.get(sequence.request.model)
            if run is not None and not run.can_take():
                break
            if not self._fits(sequence):
                break
            self._waiting.popleft()
            if run is None:
                run = self._runs[sequence.request.model] = _ModelRun(sequence.loaded, self.concurrency)
                if not self._wired_on:  # Metal's wired memory limit while working (a no-op elsewhere)
                    from mlx_lm.generate import generation_stream, wired_limit

                    streams: list[Any] = [generation_stream]
                    self._wired.enter_context(wired_limit(sequence.loaded.model, streams))
                    self._wired_on = True
            try:
                run.add(sequence)
            except Exception as exc:
                self._fail(sequence, exc)
                if not run.sequences:
                    self._runs.pop(sequence.request.model, None)
                continue
            started = True
        return started

    def _prepare(self, sequence: Sequence) -> None:
        """Load the model, render and tokenize the prompt, and refuse what can never run."""
        request = sequence.request
        run = self._runs.get(request.model)
        loaded = run.loaded if run is not None else self.engine.load(request.model, request.model_path)
        tokenizer = loaded.tokenizer
        text = self.engine.prompt_text(loaded, request.prompt)
        add_special = tokenizer.bos_token is None or not text.startswith(tokenizer.bos_token)
        ids = list(tokenizer.encode(text, add_special_tokens=add_special))
        if not ids:
            raise EngineError("InvalidPrompt", "The prompt is empty once tokenized: nothing to generate from")
        context = model_context(loaded)
        wanted = len(ids) + request.max_tokens
        if context is not None and wanted > context:
            raise EngineError(
                "ContextLengthExceeded",
                f"This model's maximum context length is {context} tokens; the request asks for "
                f"{wanted} ({len(ids)} in the prompt, max_tokens {request.max_tokens}): shorten the "
                "prompt or lower max_tokens",
            )
        need = wanted * kv_bytes_per_token(loaded)
        budget = self._budget()
        if need > budget:
            raise EngineError(
                "RequestTooLarge",
                f"The request needs about {need / 2**20:.0f} MiB of key-value cache ({wanted} tokens), "
                f"more than this worker can hold ({budget / 2**20:.0f} MiB): lower max_tokens or "
                "shorten the prompt",
            )
        sequence.prepare(loaded, ids, self.engine.emitter, self.engine.metrics, self.engine.token_linger_ns)

    def _budget(self) -> int:
        if self.kv_bytes:
            return self.kv_bytes
        if self._machine_bytes is None:
            self._machine_bytes = machine_memory_bytes()
        cache = self.engine.cache
        weights = sum(loaded.size_bytes for name in cache.names() if (loaded := cache.peek(name)) is not None)
        return max(0, int(self._machine_bytes * KV_MEMORY_FRACTION) - weights)

    def _fits(self, sequence: Sequence) -> bool:
        """Would the key-value caches of everything running, with this one, fit? A batch holds
        each row at its longest row's length, so a run costs its rows times its longest."""
        total = 0
        for run in self._runs.values():
            rows = list(run.sequences)
            if run.loaded is sequence.loaded:
                rows.append(sequence)
            if rows:
                total += len(rows) * max(row.kv_tokens for row in rows) * kv_bytes_per_token(run.loaded)
        if sequence.request.model not in self._runs:
            total += sequence.kv_tokens * kv_bytes_per_token(sequence.loaded)
        return total <= self._budget() or not self._runs

    def _step(self, name: str, run: _ModelRun) -> None:
        try:
            made = run.step()
        except Exception as exc:  # mlx failed the step: every sequence of this run ends
            logger.exception("A generation step of %s failed", name)
            self._runs.pop(name, None)
            for sequence in run.fail_all():
                self._fail(sequence, exc)
            return
        now_ns = time.perf_counter_ns()
        self.engine.metrics.generation_batch_size.observe(len(made))
        for sequence, token, row, dropped in made:
            try:
                ended = sequence.token(token, row, now_ns)
            except Exception as exc:
                run.remove(sequence, dropped)
                self._fail(sequence, exc)
                continue
            if ended:
                run.remove(sequence, dropped)
                self._end(sequence, sequence.finish_reason or "stop")
        if not run.sequences:
            self._runs.pop(name, None)
        else:
            model = run.loaded.name
            run.settle(any(waiting.request.model == model for waiting in self._waiting))

    # -- ends -------------------------------------------------------------------------------

    def _end(self, sequence: Sequence, finish_reason: str) -> None:
        try:
            sequence.result = self.engine.completed(sequence, finish_reason)
        except Exception as exc:  # telling the end failed: it is an error, said as one
            self._fail(sequence, exc)
            return
        sequence.done.set()

    def _fail(self, sequence: Sequence, exc: BaseException) -> None:
        try:
            self.engine.failed(sequence, exc)
        except Exception:
            logger.exception("The failure of generation %s could not be told", sequence.request.generation_id)
        sequence.error = exc if isinstance(exc, EngineError) else EngineError("GenerationFailed", str(exc))
        sequence.done.set()

    def _shutdown(self) -> None:
        shutdown = EngineError("WorkerShutdown", "The worker shut down during the generation")
        for run in self._runs.values():
            for sequence in run.fail_all():
                self._fail(sequence, shutdown)
        self._runs.clear()
        with self._changed:
            left = list(self._waiting) + list(self._submitted)
            self._waiting.clear()
            self._submitted.clear()
        for sequence in left:
            self._fail(sequence, shutdown)
        self._wired.close()
