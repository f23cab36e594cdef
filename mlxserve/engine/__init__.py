"""The worker: mlx-lm generation and its telemetry. Loads neither Django nor Celery, and imports
nothing of this project but ``mlxserve.contract``.

- ``engine``: model cache and loading, generation, the events each emits.
- ``emitter``: one method per event type; validates and hands envelopes to a publisher.
- ``publisher``: batches events to the Redis stream, spools them to disk while Redis is away.
- ``metrics``: the worker's Prometheus metrics and the endpoint that serves them.
- ``config_watcher``, ``subscription``: the live telemetry config and the control channel.
- ``bridge``: ``TelemetryBridge``, the telemetry config applied to a process (its metrics endpoint).
- ``runtime``: all of the above for one worker process.
- ``demo_model``: a small random-weight model with a locally trained tokenizer.
"""

from mlxserve.engine.bridge import TelemetryBridge
from mlxserve.engine.emitter import EngineEventEmitter

__all__ = ["EngineEventEmitter", "TelemetryBridge"]
