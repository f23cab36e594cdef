"""Tokens/s of bare ``mlx_lm.stream_generate`` against the same generation through the engine
with telemetry on (the bar: at least 98%).

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
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxserve.settings")

import redis
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

from mlxserve.contract.stream import stream_envelope_bodies
from mlxserve.contract.telemetry import TelemetryConfigSchema
from mlxserve.engine.demo_model import create_demo_model
from mlxserve.engine.engine import GenerationRequest
from mlxserve.engine.runtime import RuntimeSettings, WorkerRuntime

BAR = 0.98


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="An MLX model directory (default: a fresh demo model)")
    parser.add_argument("--tokens", type=int, default=512)
    # Fewer rounds let this machine's noise (about +/-1.5% a round) move the median by a point.
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13"))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mlxserve-bench-"))
    model_dir = Path(args.model) if args.model else create_demo_model(workdir / "demo-model")
    client = redis.Redis.from_url(args.redis_url)
    stream = "bench:generation-overhead"
    client.delete(stream)
    runtime = WorkerRuntime(
        RuntimeSettings(
            redis_url=args.redis_url,
            stream=stream,
            config_key="bench:config",
            control_channel="bench:control",
            source="bench/worker",
            spool_dir=workdir / "spool",
            metrics_host="127.0.0.1",
        ),
        client=client,
    ).start()
    runtime.apply_config(TelemetryConfigSchema(enabled=True, prometheus_port=19464), version=1)
    loaded = runtime.engine.load(str(model_dir))
    prompt = "The quick brown fox"

    def bare() -> float:
        sampler = make_sampler(temp=0.0)
        started = time.perf_counter()
        count = 0
        for _ in stream_generate(
            loaded.model, loaded.tokenizer, prompt, max_tokens=args.tokens, sampler=sampler
        ):
            count += 1
        return count / (time.perf_counter() - started)

    def engine() -> float:
        started = time.perf_counter()
        result = runtime.engine.generate(
            GenerationRequest(model=str(model_dir), prompt=prompt, max_tokens=args.tokens)
        )
        return result.tokens / (time.perf_counter() - started)

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
    # Each round's two runs are neighbours in time: their ratio cancels the machine's drift,
    # and the median of the ratios is robust to a round hit by a noisy neighbour.
    ratio = statistics.median(e / b for b, e in zip(bare_runs, engine_runs, strict=True))
    verdict = "PASS" if ratio >= BAR else "FAIL"
    print(f"median: bare {bare_median:.1f} tok/s, engine with telemetry {engine_median:.1f} tok/s")
    print(f"median of the rounds' ratios {ratio:.3f} -> {verdict} (bar {BAR}); {events} events reached Redis")
    return 0 if ratio >= BAR else 1


if __name__ == "__main__":
    sys.exit(main())
