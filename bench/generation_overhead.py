"""Tokens/s of bare ``mlx_lm.stream_generate`` against the same generation through the engine
with telemetry on (the bar: at least 99.5%), and what telemetry costs per token, directly: the
time the engine spends on each token's event and metrics, and the CPU time of the generation
thread, of the publisher's and other telemetry threads, and of the Redis server, per token,
each against the bare step's time per token.

Telemetry on means everything a worker does per token: validate and emit the
event, hand it to the buffered publisher, which batches it to a real Redis
stream in its thread; Prometheus metrics recorded and served on a port. Both
sides use the same loaded model, prompt, sampler and length; runs are
interleaved so drift hits both alike. The model is the demo model (tiny, so
fast: the worst case for relative overhead) unless ``--model`` names another.

    .venv/bin/python bench/generation_overhead.py [--model DIR] [--tokens 512] [--rounds 40]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxserve.settings")

import redis
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

from bench.telemetry_on import runtime_with_telemetry
from mlxserve.bus import stream_envelope_bodies
from mlxserve.engine.demo_model import create_demo_model
from mlxserve.engine.engine import GenerationRequest

BAR = 0.995  # the contract's bar is 0.98; issue 14 raised it


class CpuMeter:
    """CPU time spent per token while one side runs: the generation thread's (this one for bare
    mlx-lm; the engine's scheduler thread, ``engine-generation``, for the engine), the other
    Python threads' (the event publisher, the metrics server, the config watcher, and this one
    waiting for the engine; mlx's own compute threads are not Python threads and are not
    counted), and the Redis server's (``INFO cpu``)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.totals: dict[tuple[str, str], float] = {}
        self.tokens: dict[str, int] = {}

    @staticmethod
    def _threads_ns() -> tuple[int, int]:
        """CPU nanoseconds of the generation threads (this one, the engine's) and of the rest."""
        generation = other = 0
        for thread in threading.enumerate():
            if thread.ident is None:
                continue
            try:
                used = time.clock_gettime_ns(time.pthread_getcpuclockid(thread.ident))
            except (OSError, AttributeError):  # the thread ended meanwhile; no such clock (macOS)
                continue
            if thread is threading.main_thread() or thread.name == "engine-generation":
                generation += used
            else:
                other += used
        return generation, other

    def _redis_s(self) -> float:
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    @contextlib.contextmanager
    def measuring(self, side: str) -> Iterator[list[int]]:
        tokens = [0]
        (main, threads), server = self._threads_ns(), self._redis_s()
        try:
            yield tokens
        finally:
            main_after, threads_after = self._threads_ns()
            for name, value in (
                ("main", (main_after - main) / 1000),
                ("threads", (threads_after - threads) / 1000),
                ("redis", (self._redis_s() - server) * 1e6),
            ):
                self.totals[(side, name)] = self.totals.get((side, name), 0.0) + value
            self.tokens[side] = self.tokens.get(side, 0) + tokens[0]

    def per_token(self, side: str, name: str) -> float:
        """Microseconds per token."""
        return self.totals.get((side, name), 0.0) / max(self.tokens.get(side, 0), 1)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="An MLX model directory (default: a fresh demo model)")
    parser.add_argument("--tokens", type=int, default=512)
    # Fewer rounds let this machine's noise (about +/-1.5% a round) move the median by a point.
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13"))
    parser.add_argument(
        "--same-both-sides",
        action="store_true",
        help="bare mlx-lm on both sides (an A/A run): the spread of the ratio when nothing differs, "
        "the smallest overhead this machine lets the ratio tell",
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mlxserve-bench-"))
    model_dir = Path(args.model) if args.model else create_demo_model(workdir / "demo-model")
    client = redis.Redis.from_url(args.redis_url)
    stream = "bench:generation-overhead"
    runtime = runtime_with_telemetry(client, args.redis_url, stream, workdir, 19464)
    loaded = runtime.engine.load(str(model_dir))
    prompt = "The quick brown fox"

    cpu = CpuMeter(client)

    def bare(side: str = "bare") -> float:
        sampler = make_sampler(temp=0.0)
        with cpu.measuring(side) as tokens:
            started = time.perf_counter()
            for _ in stream_generate(
                loaded.model, loaded.tokenizer, prompt, max_tokens=args.tokens, sampler=sampler
            ):
                tokens[0] += 1
            return tokens[0] / (time.perf_counter() - started)

    def engine() -> float:
        with cpu.measuring("engine") as tokens:
            started = time.perf_counter()
            result = runtime.engine.generate(
                GenerationRequest(model=str(model_dir), prompt=prompt, max_tokens=args.tokens)
            )
            tokens[0] = result.tokens
            # The publisher's thread sends this generation's last batch within 0.25 s: wait for it,
            # so its CPU is counted here (the clock for tokens/s has stopped).
            elapsed = time.perf_counter() - started
            runtime.publisher.flush(10)
            return result.tokens / elapsed

    if args.same_both_sides:  # the A/A run: the bench measuring itself
        engine = functools.partial(bare, "engine")
    bare()
    engine()  # warm-up: compile, caches
    bare_runs, engine_runs = [], []
    print(f"model {model_dir}, {args.tokens} tokens a run, {args.rounds} interleaved rounds")
    print(f"{'round':>5}{'bare tok/s':>14}{'engine tok/s':>14}{'ratio':>8}")
    for round_number in range(1, args.rounds + 1):
        pair = (bare(), engine()) if round_number % 2 else tuple(reversed((engine(), bare())))
        bare_runs.append(pair[0])
        engine_runs.append(pair[1])
        print(f"{round_number:>5}{pair[0]:>14.1f}{pair[1]:>14.1f}{pair[1] / pair[0]:>8.3f}", flush=True)
    assert runtime.publisher.flush(30), "events not delivered"
    events = len(stream_envelope_bodies(client, stream))
    runtime.shutdown()
    client.delete(stream)
    bare_median, engine_median = statistics.median(bare_runs), statistics.median(engine_runs)
    step_us = 1e6 / bare_median
    main_us = cpu.per_token("engine", "main") - cpu.per_token("bare", "main")
    side_us = cpu.per_token("engine", "threads") - cpu.per_token("bare", "threads")
    redis_us = cpu.per_token("engine", "redis") - cpu.per_token("bare", "redis")
    engine_us = runtime.engine.telemetry_cost.per_token_us()
    print(
        f"telemetry on the generation thread, timed in the engine: {engine_us:.2f} µs a token (the event, "
        f"its metrics, the log-probability), against a bare step of {step_us:.0f} µs "
        f"({engine_us / step_us:.2%})"
    )
    print(
        f"telemetry CPU per token: generation thread +{main_us:.1f} µs, publisher and other telemetry "
        f"threads +{side_us:.1f} µs, Redis server +{redis_us:.1f} µs; "
        f"total {main_us + side_us + redis_us:.1f} µs "
        f"against a bare step of {step_us:.0f} µs ({(main_us + side_us + redis_us) / step_us:.2%})"
    )
    # Each round's two runs are neighbours in time: their ratio cancels the machine's drift,
    # and the median of the ratios is robust to a round hit by a noisy neighbour.
    ratio = statistics.median(e / b for b, e in zip(bare_runs, engine_runs, strict=True))
    verdict = "PASS" if ratio >= BAR else "FAIL"
    print(f"median: bare {bare_median:.1f} tok/s, engine with telemetry {engine_median:.1f} tok/s")
    print(f"median of the rounds' ratios {ratio:.3f} -> {verdict} (bar {BAR}); {events} events reached Redis")
    return 0 if ratio >= BAR else 1


if __name__ == "__main__":
    sys.exit(main())
