"""Writes deploy/grafana/dashboards/mlxserve.json (the committed dashboard) from the panel list below,
with Grafana's own typed builders (grafana-foundation-sdk, a dev dependency).

    .venv/bin/python deploy/grafana/build_dashboard.py

Edit the panels here, run it, commit both; tests/test_prometheus.py evaluates every
query of the JSON against a real Prometheus.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders.common import VizLegendOptions, VizTooltipOptions
from grafana_foundation_sdk.builders.dashboard import Dashboard, QueryVariable, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery as PrometheusQuery
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement, TooltipDisplayMode
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh, VariableSort

DATASOURCE = {"type": "prometheus", "uid": "mlxserve-prometheus"}
M = '{model=~"$model"}'
RI = "[$__rate_interval]"

# (title, unit, [(legend, expr)], width)
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]], int]]]] = [
    (
        "Fleet",
        [
            (
                "Fleet throughput (tokens/s)",
                "short",
                [("{{model}}", f"sum by (model) (rate(mlxserve_fleet_tokens_total{M}{RI}))")],
                12,
            ),
            (
                "Generations per second",
                "short",
                [
                    (
                        "started {{model}}",
                        f"sum by (model) (rate(mlxserve_fleet_generations_started_total{M}{RI}))",
                    ),
                    (
                        "completed {{model}}",
                        f"sum by (model) (rate(mlxserve_fleet_generations_completed_total{M}{RI}))",
                    ),
                ],
                12,
            ),
            (
                "Workers by status",
                "short",
                [
                    ("{{status}}", "sum by (status) (mlxserve_fleet_workers)"),
                    ("stale", "mlxserve_fleet_workers_stale"),
                ],
                12,
            ),
            (
                "Seconds since each worker was last heard",
                "s",
                [("{{source}}", "time() - mlxserve_fleet_worker_last_heard_timestamp_seconds")],
                12,
            ),
        ],
    ),
    (
        "Latency",
        [
            (
                "Time to first token (from events)",
                "s",
                [
                    (
                        f"p{q}",
                        f"histogram_quantile(0.{q}, sum by (le) "
                        f"(rate(mlxserve_fleet_time_to_first_token_seconds_bucket{M}{RI})))",
                    )
                    for q in (50, 95, 99)
                ],
                8,
            ),
            (
                "Time to first token (worker exporters)",
                "s",
                [
                    (
                        f"p{q}",
                        f"histogram_quantile(0.{q}, sum by (le) "
                        f"(rate(kr_serve_time_to_first_token_seconds_bucket{M}{RI})))",
                    )
                    for q in (50, 95, 99)
                ],
                8,
            ),
            (
                "Inter-token latency (worker exporters)",
                "s",
                [
                    (
                        f"p{q}",
                        f"histogram_quantile(0.{q}, sum by (le) "
                        f"(rate(kr_serve_inter_token_latency_seconds_bucket{M}{RI})))",
                    )
                    for q in (50, 95, 99)
                ],
                8,
            ),
            (
                "Generation duration",
                "s",
                [
                    (
                        f"p{q}",
                        f"histogram_quantile(0.{q}, sum by (le) "
                        f"(rate(mlxserve_fleet_generation_duration_seconds_bucket{M}{RI})))",
                    )
                    for q in (50, 95)
                ]
                + [
                    (
                        "mean",
                        f"sum(rate(mlxserve_fleet_generation_duration_seconds_sum{M}{RI})) / "
                        f"sum(rate(mlxserve_fleet_generation_duration_seconds_count{M}{RI}))",
                    )
                ],
                12,
            ),
            (
                "Errors by code (per second)",
                "short",
                [("{{code}}", f"sum by (code) (rate(mlxserve_fleet_errors_total{RI}))")],
                12,
            ),
        ],
    ),
    (
        "Models",
        [
            (
                "Model loads",
                "short",
                [
                    (
                        "{{model}} {{quantization}}",
                        f"sum by (model, quantization) (increase(mlxserve_fleet_model_loads_total{M}{RI}))",
                    )
                ],
                12,
            ),
            (
                "Model load time (worker exporters, p95)",
                "s",
                [
                    (
                        "{{model}}",
                        "histogram_quantile(0.95, sum by (model, le) "
                        f"(rate(kr_serve_model_load_duration_seconds_bucket{M}{RI})))",
                    )
                ],
                12,
            ),
        ],
    ),
    (
        "Control plane",
        [
            (
                "Ingest lag",
                "s",
                [
                    ("oldest event not stored", "mlxserve_ingest_lag_seconds"),
                    ("oldest read, not stored", "mlxserve_ingest_oldest_pending_seconds"),
                ],
                8,
            ),
            (
                "Stream backlog",
                "short",
                [
                    ("not yet read", "mlxserve_ingest_undelivered"),
                    ("read, not stored", "mlxserve_ingest_pending"),
                    ("stream length", "mlxserve_ingest_stream_length"),
                ],
                8,
            ),
            (
                "Dead letters",
                "short",
                [
                    ("waiting for replay", "mlxserve_dead_letters_waiting"),
                    ("new", f"increase(mlxserve_dead_letters_total{RI})"),
                ],
                8,
            ),
            (
                "Events stored per second, by type",
                "short",
                [("{{type}}", f"sum by (type) (rate(mlxserve_events_ingested_total{RI}))")],
                8,
            ),
            (
                "API responses per second, by status",
                "reqps",
                [("{{status}}", f"sum by (status) (rate(django_http_responses_total_by_status_total{RI}))")],
                8,
            ),
            (
                "API latency p95, by view",
                "s",
                [
                    (
                        "{{view}}",
                        "histogram_quantile(0.95, sum by (view, le) "
                        f"(rate(django_http_requests_latency_seconds_by_view_method_bucket{RI})))",
                    )
                ],
                8,
            ),
            (
                "Database queries per second",
                "short",
                [("{{vendor}}", f"sum by (vendor) (rate(django_db_execute_total{RI}))")],
                12,
            ),
        ],
    ),
    (
        "Serving (the OpenAI-compatible /v1/ endpoints, as clients see them)",
        [
            (
                "Requests per second, by outcome",
                "reqps",
                [("{{status}}", f"sum by (status) (rate(mlxserve_openai_requests_total{M}{RI}))")],
                6,
            ),
            (
                "Time to first token p95",
                "s",
                [
                    (
                        "{{model}}",
                        "histogram_quantile(0.95, sum by (model, le) "
                        f"(rate(gen_ai_server_time_to_first_token_seconds_bucket{M}{RI})))",
                    )
                ],
                6,
            ),
            (
                "Time in the queue p95",
                "s",
                [
                    (
                        "{{model}}",
                        "histogram_quantile(0.95, sum by (model, le) "
                        f"(rate(mlxserve_openai_queue_seconds_bucket{M}{RI})))",
                    )
                ],
                6,
            ),
            (
                "Request duration p95",
                "s",
                [
                    (
                        "{{model}}",
                        "histogram_quantile(0.95, sum by (model, le) "
                        f"(rate(gen_ai_server_request_duration_seconds_bucket{M}{RI})))",
                    )
                ],
                6,
            ),
        ],
    ),
    (
        "Batching (each worker's generations at once)",
        [
            (
                "Generations running and waiting, by worker",
                "short",
                [
                    ("running {{instance}}", "sum by (instance) (kr_serve_requests_running)"),
                    ("waiting {{instance}}", "sum by (instance) (kr_serve_requests_waiting)"),
                ],
                12,
            ),
            (
                "Sequences per generation step (mean)",
                "short",
                [
                    (
                        "{{instance}}",
                        f"sum by (instance) (rate(kr_serve_generation_batch_size_sum{RI})) / "
                        f"sum by (instance) (rate(kr_serve_generation_batch_size_count{RI}))",
                    )
                ],
                12,
            ),
        ],
    ),
]


def dashboard() -> dict[str, Any]:
    """The dashboard, built with Grafana's own typed builders (grafana-foundation-sdk)."""
    source = DataSourceRef(type_val=DATASOURCE["type"], uid=DATASOURCE["uid"])
    builder = (
        Dashboard("mlxserve fleet")
        .uid("mlxserve-fleet")
        .tags(["mlxserve", "mlx-lm"])
        .timezone("utc")
        .editable()
        .refresh("30s")
        .time("now-6h", "now")
        .with_variable(
            QueryVariable("model")
            .label("Model")
            .datasource(source)
            .query("label_values(mlxserve_fleet_tokens_total, model)")
            .include_all(True)
            .all_value(".*")
            .multi(True)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
        )
    )
    for row_title, row_panels in ROWS:
        builder = builder.with_row(Row(row_title))
        for title, unit, targets, width in row_panels:
            panel = (
                Timeseries()
                .title(title)
                .unit(unit)
                .datasource(source)
                .span(width)
                .height(8)
                .legend(
                    VizLegendOptions().display_mode(LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM)
                )
                .tooltip(VizTooltipOptions().mode(TooltipDisplayMode.MULTI))
            )
            for index, (legend, expr) in enumerate(targets):
                panel = panel.with_target(
                    PrometheusQuery()
                    .ref_id(chr(ord("A") + index))
                    .datasource(source)
                    .expr(expr)
                    .legend_format(legend)
                )
            builder = builder.with_panel(panel)
    encoded: dict[str, Any] = json.loads(JSONEncoder(sort_keys=True, indent=2).encode(builder.build()))
    return encoded


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "dashboards" / "mlxserve.json"
    out.write_text(json.dumps(dashboard(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")
