"""Writes deploy/grafana/dashboards/mlxserve.json (the committed dashboard) from the panel list below.

    .venv/bin/python deploy/grafana/build_dashboard.py

Edit the panels here, run it, commit both; tests/test_prometheus.py evaluates every
query of the JSON against a real Prometheus.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
]


def panel(
    panel_id: int, title: str, unit: str, targets: list[tuple[str, str]], x: int, y: int, w: int
) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (legend, expr) in enumerate(targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y, next_id = 0, 1
    for row_title, row_panels in ROWS:
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        next_id, y, x = next_id + 1, y + 1, 0
        for title, unit, targets, width in row_panels:
            if x + width > 24:
                x, y = 0, y + 8
            panels.append(panel(next_id, title, unit, targets, x, y, width))
            next_id, x = next_id + 1, x + width
        y += 8
    return {
        "uid": "mlxserve-fleet",
        "title": "mlxserve fleet",
        "tags": ["mlxserve", "mlx-lm"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "model",
                    "label": "Model",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {"query": "label_values(mlxserve_fleet_tokens_total, model)", "refId": "model"},
                    "definition": "label_values(mlxserve_fleet_tokens_total, model)",
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "refresh": 2,
                    "sort": 1,
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "dashboards" / "mlxserve.json"
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")
