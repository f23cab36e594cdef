"""The control plane's /metrics: fleet figures derived from the stored events."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from events.models import Worker
from events.services import events_store
from tests.conftest import make_envelope
from tests.events.test_history import T0, generation

pytestmark = pytest.mark.django_db


def store(envelopes: list[dict[str, Any]]) -> None:
    events_store([(f"{i}-0", msgspec.json.encode(e)) for i, e in enumerate(envelopes)])


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = Client().get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_tokens_generations_and_errors_by_model_and_code() -> None:
    store(generation(start=T0, ttft=120, tokens=5) + generation(start=T0, ttft=40, tokens=3, model="qwen"))
    store(
        [
            make_envelope("error", generationId=None),
            make_envelope("modelLoaded"),
            make_envelope("modelUnloaded"),
            make_envelope("modelInvalidated"),
        ]
    )
    m = scrape()
    assert m[("mlxserve_fleet_tokens_total", (("model", "llama-3-8b"),))] == 5
    assert m[("mlxserve_fleet_tokens_total", (("model", "qwen"),))] == 3
    assert m[("mlxserve_fleet_generations_completed_total", (("model", "qwen"),))] == 1
    assert m[("mlxserve_fleet_errors_total", (("code", "ModelNotFound"), ("model", "nope")))] == 1
    assert m[("mlxserve_fleet_model_loads_total", (("model", "llama-3-8b"), ("quantization", "int4")))] == 1
    assert (
        m[("mlxserve_fleet_model_unloads_total", (("model", "llama-3-8b"), ("reason", "cache-eviction")))]
        == 1
    )
    assert m[("mlxserve_events_ingested_total", (("type", "tokenGenerated"),))] == 8
    # Time to first token: 120 ms and 40 ms.
    ttft = "mlxserve_fleet_time_to_first_token_seconds"
    assert m[(f"{ttft}_bucket", (("le", "0.1"), ("model", "llama-3-8b")))] == 0
    assert m[(f"{ttft}_bucket", (("le", "0.25"), ("model", "llama-3-8b")))] == 1
    assert m[(f"{ttft}_bucket", (("le", "0.05"), ("model", "qwen")))] == 1
    assert m[(f"{ttft}_sum", (("model", "llama-3-8b"),))] == pytest.approx(0.12)
    duration = "mlxserve_fleet_generation_duration_seconds"
    assert m[(f"{duration}_count", (("model", "llama-3-8b"),))] == 1
    assert m[(f"{duration}_bucket", (("le", "+Inf"), ("model", "llama-3-8b")))] == 1
    assert m[(f"{duration}_sum", (("model", "llama-3-8b"),))] == pytest.approx(0.17)


def test_redelivered_events_are_not_counted_twice() -> None:
    events = generation(start=T0, ttft=100, tokens=4)
    store(events)
    store(events)  # the same stream entries again, as after an ingester crash before its ack
    m = scrape()
    assert m[("mlxserve_fleet_tokens_total", (("model", "llama-3-8b"),))] == 4
    assert m[("mlxserve_fleet_time_to_first_token_seconds_count", (("model", "llama-3-8b"),))] == 1


def test_a_batch_mixing_new_and_already_stored_events_counts_only_the_new_ones() -> None:
    events = generation(start=T0, ttft=100, tokens=10)
    store(events[:5])
    store(events)  # the first five again (a redelivery) with the rest, in one batch
    m = scrape()
    assert m[("mlxserve_fleet_tokens_total", (("model", "llama-3-8b"),))] == 10
    assert m[("mlxserve_events_ingested_total", (("type", "generationStarted"),))] == 1
    assert m[("mlxserve_fleet_generations_completed_total", (("model", "llama-3-8b"),))] == 1


def test_time_to_first_token_is_found_when_the_start_came_in_an_earlier_batch() -> None:
    events = generation(start=T0, ttft=300, tokens=6)
    store(events[:1])
    store(events[1:4])
    store(events[4:])
    m = scrape()
    assert m[("mlxserve_fleet_time_to_first_token_seconds_count", (("model", "llama-3-8b"),))] == 1
    assert m[("mlxserve_fleet_time_to_first_token_seconds_sum", (("model", "llama-3-8b"),))] == pytest.approx(
        0.3
    )


def test_workers_by_status_and_stale_ones() -> None:
    now = time.time_ns() // 1_000_000
    Worker.objects.create(source="a", status="ready", last_heard_at=now)
    Worker.objects.create(source="b", status="busy", last_heard_at=now)
    Worker.objects.create(source="c", status="ready", last_heard_at=now - 3_600_000)
    Worker.objects.create(source="d", status="shutdown", last_heard_at=now - 3_600_000)
    m = scrape()
    assert m[("mlxserve_fleet_workers", (("status", "ready"),))] == 2
    assert m[("mlxserve_fleet_workers", (("status", "busy"),))] == 1
    assert m[("mlxserve_fleet_workers", (("status", "error"),))] == 0
    # A worker that said it shut down is gone, not silent.
    assert m[("mlxserve_fleet_workers_stale", ())] == 1
    heard = m[("mlxserve_fleet_worker_last_heard_timestamp_seconds", (("source", "a"), ("status", "ready")))]
    assert heard == pytest.approx(now / 1000)
