"""Continuous batching against mlx-lm's own, in the same run (issue 24's bars):

1. aggregate tokens/s of one engine (telemetry on: events to a real Redis stream, metrics) at 8 and
   32 concurrent requests, against mlx-lm's ``BatchGenerator`` with no telemetry on the same model,
   prompts and lengths (bar: at least 90%);
2. one request alone on an engine of concurrency 8, against bare ``mlx_lm.stream_generate``, the
   single-sequence path a worker ran before (bar: at least 97%);
3. the time to first token of a request joining a running generation, against the same request's
   alone plus one prefill and one decode step (bar: at most that).

Rounds are interleaved so drift hits both sides alike; each figure is a median with its spread.

    .venv/bin/python bench/batching.py [--rounds 5] [--tokens 256]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxserve.settings")

import redis
from mlx_lm import stream_generate
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from bench.telemetry_on import runtime_with_telemetry
from mlxserve.engine.demo_model import create_demo_model
from mlxserve.engine.engine import GenerationRequest

WORDS = [
    "the",
    "fleet",
    "serves",
    "many",
    "requests",
    "at",
    "once",
    "and",
    "every",
    "one",
    "of",
    "them",
    "keeps",
    "its",
    "own",
    "events",
]


def prompts(count: int) -> list[str]:
    return [" ".join(WORDS[: 4 + (i * 5) % len(WORDS)]) + f" ({i})" for i in range(count)]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above: sampled, unseeded")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/12"))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mlxserve-bench-"))
    model_dir = create_demo_model(workdir / "demo-model")
    client = redis.Redis.from_url(args.redis_url)
    stream = "bench:batching"
    runtime = runtime_with_telemetry(client, args.redis_url, stream, workdir, 19465, concurrency=32)
    engine = runtime.engine
    loaded = engine.load(str(model_dir))
    greedy = make_sampler(temp=0.0)
    sampler = make_sampler(temp=args.temperature)

    def request(prompt: str, max_tokens: int = args.tokens) -> GenerationRequest:
        return GenerationRequest(
            model=str(model_dir), prompt=prompt, max_tokens=max_tokens, temperature=args.temperature
        )

    def mlx_batch(texts: list[str]) -> float:
        ids = [loaded.tokenizer.encode(t) for t in texts]
        generator = BatchGenerator(
            loaded.model,
            sampler=sampler,
            completion_batch_size=len(texts),
            stop_tokens=[[token] for token in loaded.tokenizer.eos_token_ids],  # as the engine stops
        )
        started, made = time.perf_counter(), 0
        generator.insert(ids, [args.tokens] * len(ids))
        while responses := generator.next_generated():
            made += len(responses)
        generator.close()
        return made / (time.perf_counter() - started)

    def engine_batch(texts: list[str]) -> float:
        made = [0] * len(texts)

        def run(i: int) -> None:
            made[i] = engine.generate(request(texts[i])).tokens

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(made) / (time.perf_counter() - started)

    def bare_alone() -> float:
        started, made = time.perf_counter(), 0
        for _ in stream_generate(
            loaded.model, loaded.tokenizer, prompts(1)[0], max_tokens=args.tokens, sampler=sampler
        ):
            made += 1
        return made / (time.perf_counter() - started)

    def engine_alone() -> float:
        result = engine.generate(request(prompts(1)[0]))
        return result.tokens / result.duration_s

    def first_token_s(joining: bool) -> float:
        """A 40-word prompt's time to first token, alone or joining a generation under way."""
        long_prompt = " ".join(WORDS * 3)
        runner = None
        if joining:
            going = threading.Event()
            runner = threading.Thread(
                target=engine.generate,
                args=(request(prompts(1)[0], 4 * args.tokens),),
                kwargs={"on_token": lambda _text: going.set()},
            )
            runner.start()
            going.wait()
            time.sleep(0.05)
        first: list[float] = []

        def on_token(_text: str) -> None:
            if not first:
                first.append(time.perf_counter())

        started = time.perf_counter()
        engine.generate(request(long_prompt, 8), on_token=on_token)
        if runner is not None:
            runner.join()
        return first[0] - started

    def prefill_and_step_s() -> float:
        """One prefill of that prompt and one decode step, measured with mlx-lm alone."""
        long_prompt = " ".join(WORDS * 3)
        started = time.perf_counter()
        steps = []
        for _ in stream_generate(loaded.model, loaded.tokenizer, long_prompt, max_tokens=16, sampler=greedy):
            steps.append(time.perf_counter())
        prefill = steps[0] - started
        step = statistics.median(b - a for a, b in itertools.pairwise(steps))
        return prefill + step

    for warm in (mlx_batch, engine_batch):
        warm(prompts(8))
    bare_alone(), engine_alone()
    sampling = f"temperature {args.temperature:g}, unseeded" if args.temperature else "greedy"
    print(f"demo model, {args.tokens} tokens a request, {sampling}, {args.rounds} interleaved rounds")
    for count in (8, 32):
        texts = prompts(count)
        ratios, ours, theirs = [], [], []
        for round_number in range(args.rounds):
            if round_number % 2:
                b, a = engine_batch(texts), mlx_batch(texts)
            else:
                a, b = mlx_batch(texts), engine_batch(texts)
            theirs.append(a)
            ours.append(b)
            ratios.append(b / a)
            print(
                f"  {count} at once, round {round_number + 1}: "
                f"mlx-lm {a:8.1f} tok/s, engine {b:8.1f}  {b / a:.3f}"
            )
        print(
            f"{count} at once: engine {statistics.median(ours):.1f} tok/s vs BatchGenerator "
            f"{statistics.median(theirs):.1f}; ratio {spread(ratios)} (bar 0.90)"
        )
    ratios = []
    for round_number in range(args.rounds * 2):
        if round_number % 2:
            b, a = engine_alone(), bare_alone()
        else:
            a, b = bare_alone(), engine_alone()
        ratios.append(b / a)
    print(f"one alone: engine / bare stream_generate {spread(ratios)} (bar 0.97)")
    joins, bars = [], []
    for _ in range(args.rounds):
        alone, joined, extra = first_token_s(False), first_token_s(True), prefill_and_step_s()
        joins.append(joined * 1000)
        bars.append((alone + extra) * 1000)
        print(
            f"  TTFT alone {alone * 1000:.1f} ms, joining {joined * 1000:.1f} ms, "
            f"bar {(alone + extra) * 1000:.1f} ms"
        )
    met = sum(j <= b for j, b in zip(joins, bars, strict=True))
    print(
        f"TTFT joining a running generation: median {statistics.median(joins):.1f} ms vs bar (alone + one "
        f"prefill + one decode step) median {statistics.median(bars):.1f} ms; "
        f"within the bar in {met}/{len(joins)} rounds"
    )
    assert runtime.publisher.flush(30), "events not delivered"
    runtime.shutdown()
    client.delete(stream)


if __name__ == "__main__":
    main()
