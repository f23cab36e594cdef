"""A fleet's day of events for the stats rollups' tests, the answers reading every event gives,
and the rollup rows as stored."""

from __future__ import annotations

import math
import random
import uuid
from collections import Counter
from typing import Any

import msgspec
import pytest
from rest_framework.test import APIClient

from events.models import StatsDay, StatsMinute, StatsRollup
from events.rollups import (
    HOUR_MS,
    bucket_of,
)
from events.selectors import _percentiles
from events.storage import events_store
from tests.factories import T0, make_envelope

LONG_MODEL = "m" * 300  # stored cut to 200 characters, filtered the same way
MODELS = ["llama-3-8b", "qwen", LONG_MODEL]


def fleet_day(rng: random.Random, hours: int = 6) -> list[dict[str, Any]]:
    """Generations over ``hours`` hours from T0: lognormal time to first token, some retried
    (a second attempt in the same generation), some without throughput; errors and statuses."""
    events: list[dict[str, Any]] = []
    for g in range(hours * 12):
        gid, model = str(uuid.uuid4()), MODELS[g % 3]
        start = T0 + rng.randrange(hours * HOUR_MS - 60_000)
        seq = 0
        for _attempt in range(2 if g % 9 == 0 else 1):
            ttft = int(rng.lognormvariate(5, 1.2))
            events.append(
                make_envelope(
                    "generationStarted",
                    generationId=gid,
                    timestamp=start,
                    seq=seq,
                    payload={"model": model, "prompt": "Hi"},
                )
            )
            tokens = rng.randrange(1, 12)
            for i in range(tokens):
                events.append(
                    make_envelope(
                        "tokenGenerated",
                        generationId=gid,
                        timestamp=start + ttft + i * 15,
                        seq=seq + 1 + i,
                        payload={"model": model, "token": f"t{i}"},
                    )
                )
            seq += tokens + 1
            start += ttft + tokens * 15 + 5
        payload: dict[str, Any] = {
            "model": model,
            "tokensGenerated": tokens,
            "durationMs": rng.uniform(5, 9000),
        }
        if g % 4:
            payload["throughput"] = rng.uniform(1, 400)
        events.append(
            make_envelope("generationCompleted", generationId=gid, timestamp=start, seq=seq, payload=payload)
        )
        if g % 7 == 0:
            events.append(make_envelope("error", timestamp=start + 1, generationId=None))
        events.append(make_envelope("runtimeStatus", timestamp=T0 + rng.randrange(hours * HOUR_MS)))
    return events


def ingest(events: list[dict[str, Any]], rng: random.Random, *, redeliver: bool = True) -> None:
    """Store as the ingester does, in shuffled batches (a start may come after its first
    token), some batches delivered twice."""
    shuffled = events[:]
    rng.shuffle(shuffled)
    for start in range(0, len(shuffled), 37):
        batch = [(f"{start}-{i}", msgspec.json.encode(e)) for i, e in enumerate(shuffled[start : start + 37])]
        events_store(batch)
        if redeliver and start % 3 == 0:
            events_store(batch)


def truth(events: list[dict[str, Any]], since: int, until: int, model: str | None = None) -> dict[str, Any]:
    """What the window holds, worked out from the envelopes themselves."""

    def column(e: dict[str, Any]) -> str:
        m = e["payload"].get("model", "")
        return m[:200] if isinstance(m, str) else ""

    inside = [
        e for e in events if since <= e["timestamp"] <= until and (model is None or column(e) == model[:200])
    ]
    by_type = Counter(e["type"] for e in inside)
    by_model = Counter(column(e) for e in inside if column(e))
    tokens_at = {
        (e["generationId"], e["seq"]): e["timestamp"] for e in events if e["type"] == "tokenGenerated"
    }
    ttft = [
        float(tokens_at[(e["generationId"], e["seq"] + 1)] - e["timestamp"])
        for e in inside
        if e["type"] == "generationStarted" and (e["generationId"], e["seq"] + 1) in tokens_at
    ]
    completed = [e["payload"] for e in inside if e["type"] == "generationCompleted"]
    rates = [
        p["throughput"] if "throughput" in p else (p["tokensGenerated"] - 1) / (p["durationMs"] / 1000)
        for p in completed
        if "throughput" in p or p["tokensGenerated"] > 1
    ]
    return {
        "byType": dict(by_type),
        "byModel": dict(by_model),
        "ttft": ttft,
        "rates": rates,
        "durations": [float(p["durationMs"]) for p in completed],
    }


def within_one_bucket(got: float | None, values: list[float], q: float) -> bool:
    """Whether ``got`` lies within one bucket of the exact percentile: of the values at the
    ranks either side of ``q * (n - 1)``, which the exact figure interpolates between (in a
    sparse tail they can be buckets apart)."""
    if not values:
        return got is None
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low, high = ordered[math.floor(rank)], ordered[math.ceil(rank)]
    return got is not None and bucket_of(low) - 1 <= bucket_of(got) <= bucket_of(high) + 1


def check(body: dict[str, Any], expected: dict[str, Any], *, exact: bool) -> None:
    assert body["events"]["byType"] == expected["byType"]
    assert body["events"]["byModel"] == expected["byModel"]
    assert body["events"]["total"] == sum(expected["byType"].values())
    assert body["tokens"] == expected["byType"].get("tokenGenerated", 0)
    assert body["timeToFirstTokenMs"]["count"] == len(expected["ttft"])
    assert body["durationMs"]["count"] == len(expected["durations"])
    assert body["percentiles"] == ("exact" if exact else "buckets")
    for field, values in (
        ("timeToFirstTokenMs", "ttft"),
        ("tokensPerSecond", "rates"),
        ("durationMs", "durations"),
    ):
        want = _percentiles(expected[values])
        for p in ("p50", "p95", "p99"):
            if exact:
                assert body[field][p] == pytest.approx(want[p], abs=1e-3), (field, p)
            else:
                q = {"p50": 0.5, "p95": 0.95, "p99": 0.99}[p]
                assert within_one_bucket(body[field][p], expected[values], q), (
                    field,
                    p,
                    body[field][p],
                    want[p],
                )


def rollups() -> dict[str, list[tuple[Any, ...]]]:
    """Every rollup row, by width."""
    return {
        key: sorted(table.objects.values_list(key, "model", "series", "bucket", "count"))
        for table, key in ((StatsDay, "day"), (StatsRollup, "hour"), (StatsMinute, "minute"))
    }


def rollups_deleted() -> None:
    for table in (StatsDay, StatsRollup, StatsMinute):
        table.objects.all().delete()


def stats(client: APIClient, since: int, until: int, model: str | None = None) -> dict[str, Any]:
    query = {"since": since, "until": until} | ({"model": model} if model else {})
    response = client.get("/api/stats/", query)
    assert response.status_code == 200, response.content
    return response.json()
