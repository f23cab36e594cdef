"""The ``/v1/`` requests as the clients see them, on the control plane's ``/metrics``.

Names follow OpenTelemetry's GenAI semantic conventions where they have one (``gen_ai.server.*``,
with their advised buckets), as Prometheus spells them; ``model`` is a registered model name (only
those are served, so the label is bounded by the registry) and ``operation`` ``chat`` or
``text_completion``. Counted in each web process and added up through prometheus_client's
multiprocess files.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

# OpenTelemetry GenAI semantic conventions, advised explicit bucket boundaries.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

requests_total = Counter(
    "mlxserve_openai_requests",
    "OpenAI-compatible requests by model, operation and outcome (an HTTP status, or cancelled)",
    ["model", "operation", "status"],
)
queue_seconds = Histogram(
    "mlxserve_openai_queue_seconds",
    "From a request's arrival to a worker taking its generation",
    ["model", "operation"],
    buckets=TTFT_BUCKETS,
)
time_to_first_token = Histogram(
    "gen_ai_server_time_to_first_token_seconds",
    "From a request's arrival to its first token, as the control plane hands it to the client",
    ["model", "operation"],
    buckets=TTFT_BUCKETS,
)
request_duration = Histogram(
    "gen_ai_server_request_duration_seconds",
    "From a request's arrival to its last byte, as the client sees it",
    ["model", "operation"],
    buckets=DURATION_BUCKETS,
)
