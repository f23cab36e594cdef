"""The control plane's /metrics: fleet figures derived from the stored events."""

from __future__ import annotations

import time
from datetime import timedelta
from io import StringIO
from typing import Any

import msgspec
import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from events.fleet import fleet_labels_fold
from events.models import Event, FleetLabelValue, RegisteredModel, RetentionPolicy, Worker
from events.storage import events_store
from tests.factories import T0, generation, make_envelope

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


# -- bounded label values ---------------------------------------------------------------

OVERFLOW = "__overflow__"


def series_of(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> dict[str, float]:
    """``name``'s samples by their model label."""
    return {dict(labels)["model"]: value for (sample, labels), value in m.items() if sample == name}


def test_past_the_label_limit_new_models_share_the_overflow_series_and_totals_add_up(settings: Any) -> None:
    settings.METRIC_LABEL_LIMIT = 3
    RegisteredModel.objects.create(name="registered-late", path="/models/x")
    # Ten unregistered models a token each, then the registered one: four places taken, it has its own.
    store([make_envelope(payload={"model": f"m{i}", "token": "x"}) for i in range(10)])
    store([make_envelope(payload={"model": "registered-late", "token": "x"})])
    store([make_envelope(payload={"model": name, "token": "x"}) for name in ("m0", "m9", "m9")])
    tokens = series_of(scrape(), "mlxserve_fleet_tokens_total")
    assert tokens == {"m0": 2, "m1": 1, "m2": 1, "registered-late": 1, OVERFLOW: 9}
    assert sum(tokens.values()) == Event.objects.filter(type="tokenGenerated").count() == 14


def test_each_label_of_each_metric_has_its_own_limit(settings: Any) -> None:
    settings.METRIC_LABEL_LIMIT = 2
    store(
        [
            make_envelope(
                "error", generationId=None, payload={"error": "x", "code": f"Code{i}", "model": "m"}
            )
            for i in range(5)
        ]
        + [make_envelope("modelUnloaded", payload={"model": f"u{i}", "reason": "manual"}) for i in range(4)]
    )
    m = scrape()
    errors = {labels: v for (name, labels), v in m.items() if name == "mlxserve_fleet_errors_total"}
    assert errors == {
        (("code", "Code0"), ("model", "m")): 1,
        (("code", "Code1"), ("model", "m")): 1,
        (("code", OVERFLOW), ("model", "m")): 3,
    }
    # modelUnloaded's model label is another metric's: its own two places.
    assert series_of(m, "mlxserve_fleet_model_unloads_total") == {"u0": 1, "u1": 1, OVERFLOW: 2}


def test_histograms_past_the_limit_keep_every_observation(settings: Any) -> None:
    settings.METRIC_LABEL_LIMIT = 1
    store(
        generation(start=T0, ttft=50, tokens=2, model="a")
        + generation(start=T0, ttft=50, tokens=2, model="b")
    )
    store(generation(start=T0, ttft=500, tokens=2, model="c"))
    m = scrape()
    duration = "mlxserve_fleet_generation_duration_seconds"
    assert series_of(m, f"{duration}_count") == {"a": 1, OVERFLOW: 2}
    assert series_of(m, f"{duration}_sum") == {"a": pytest.approx(0.07), OVERFLOW: pytest.approx(0.59)}
    ttft = {
        dict(labels)["le"]: v
        for (name, labels), v in m.items()
        if name == "mlxserve_fleet_time_to_first_token_seconds_bucket" and dict(labels)["model"] == OVERFLOW
    }
    assert ttft["0.05"] == 1 and ttft["0.5"] == 2 and ttft["+Inf"] == 2


def test_a_batch_of_thousands_of_distinct_models_is_stored_and_bounded(settings: Any) -> None:
    settings.METRIC_LABEL_LIMIT = 100
    store([make_envelope(payload={"model": f"attacker-{i}", "token": "x"}) for i in range(5000)])
    tokens = series_of(scrape(), "mlxserve_fleet_tokens_total")
    assert len(tokens) == 101
    assert tokens[OVERFLOW] == 4900 and sum(tokens.values()) == 5000


def test_a_model_name_cut_to_the_label_length_is_one_value(settings: Any) -> None:
    settings.METRIC_LABEL_LIMIT = 1
    long_name = "x" * 150
    store([make_envelope(payload={"model": long_name + suffix, "token": "t"}) for suffix in ("a", "b")])
    assert series_of(scrape(), "mlxserve_fleet_tokens_total") == {"x" * 120: 2}


def test_values_unseen_past_the_retention_period_fold_into_the_overflow(settings: Any) -> None:
    settings.METRIC_LABEL_LIMIT = 2
    RegisteredModel.objects.create(name="kept", path="/models/kept")
    store(
        generation(start=T0, ttft=50, tokens=3, model="old")
        + generation(start=T0, ttft=50, tokens=1, model="kept")
        + generation(start=T0, ttft=50, tokens=2, model="recent")
    )
    store([make_envelope(payload={"model": "late", "token": "x"})])  # no place left
    longest = RetentionPolicy.objects.order_by("-keep_days").first()
    assert longest is not None
    long_ago = timezone.now() - timedelta(days=longest.keep_days + 1)
    FleetLabelValue.objects.filter(value__in=["old", "kept"]).update(last_seen=long_ago)
    before = scrape()

    out = StringIO()
    call_command("apply_retention", stdout=out)
    assert "folded into the overflow" in out.getvalue()

    after = scrape()
    tokens = series_of(after, "mlxserve_fleet_tokens_total")
    # "old" is gone into the overflow with "late"; the registered model is never folded.
    assert tokens == {"kept": 1, "recent": 2, OVERFLOW: 4}
    # Every family adds up to what it did: counts moved, none lost. (The worker gauges are not
    # counts: the same pass forgets workers silent for a week, as these T0 ones are.)
    counted = {
        n for n, _ in before if n.startswith("mlxserve_fleet_") and not n.startswith("mlxserve_fleet_worker")
    }
    for name in counted:
        assert sum(v for (n, _), v in after.items() if n == name) == pytest.approx(
            sum(v for (n, _), v in before.items() if n == name)
        ), name
    # Its place is free again: the next new model has its own series.
    store([make_envelope(payload={"model": "newer", "token": "x"})])
    assert series_of(scrape(), "mlxserve_fleet_tokens_total")["newer"] == 1


def test_a_value_seen_again_is_not_folded(settings: Any) -> None:
    store([make_envelope(payload={"model": "busy", "token": "x"})])
    FleetLabelValue.objects.filter(value="busy").update(last_seen=timezone.now() - timedelta(days=400))
    store([make_envelope(payload={"model": "busy", "token": "x"})])  # refreshes last_seen
    assert fleet_labels_fold() == 0
    assert series_of(scrape(), "mlxserve_fleet_tokens_total") == {"busy": 2}


def test_without_retention_policies_nothing_is_folded() -> None:
    store([make_envelope(payload={"model": "m", "token": "x"})])
    FleetLabelValue.objects.update(last_seen=timezone.now() - timedelta(days=10_000))
    RetentionPolicy.objects.all().delete()
    assert fleet_labels_fold() == 0
    assert FleetLabelValue.objects.filter(value="m").exists()


@pytest.mark.django_db(transaction=True)
def test_upgrading_keeps_every_existing_series_in_its_place(settings: Any) -> None:
    """Series counted before the limit existed stay their own after migrating (0009 admits them)."""
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    executor.migrate([("events", "0008_dead_letter_event_id")])
    try:
        old = executor.loader.project_state([("events", "0008_dead_letter_event_id")]).apps
        old.get_model("events", "FleetCounter").objects.bulk_create(
            [
                old.get_model("events", "FleetCounter")(name=name, labels=labels, value=1)
                for name, labels in (
                    ("mlxserve_fleet_tokens_total", '{"model":"before"}'),
                    ("mlxserve_fleet_errors_total", '{"code":"Boom","model":""}'),
                    ("mlxserve_fleet_generation_duration_seconds_bucket", '{"le":"0.1","model":"hist"}'),
                )
            ]
        )
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
    assert set(FleetLabelValue.objects.values_list("metric", "label", "value")) == {
        ("mlxserve_fleet_tokens_total", "model", "before"),
        ("mlxserve_fleet_errors_total", "code", "Boom"),
        ("mlxserve_fleet_generation_duration_seconds", "model", "hist"),
    }
    settings.METRIC_LABEL_LIMIT = 1
    store([make_envelope(payload={"model": name, "token": "x"}) for name in ("before", "after")])
    assert series_of(scrape(), "mlxserve_fleet_tokens_total") == {"before": 2, OVERFLOW: 1}


def test_staleness_follows_the_heartbeat_setting_when_one_is_set(settings: Any) -> None:
    now = time.time_ns() // 1_000_000
    Worker.objects.create(source="recent", status="ready", last_heard_at=now - 25_000)
    Worker.objects.create(source="silent", status="ready", last_heard_at=now - 31_000)
    settings.WORKER_HEARTBEAT_SECONDS = 10  # stale after three: 30 s
    assert scrape()[("mlxserve_fleet_workers_stale", ())] == 1
    settings.WORKER_HEARTBEAT_SECONDS = 0  # the config's 60 s: neither is stale
    assert scrape()[("mlxserve_fleet_workers_stale", ())] == 0
