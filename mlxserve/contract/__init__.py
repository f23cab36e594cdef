"""The wire contract, shared by the control plane and the workers: loads neither Django nor Celery.

- ``validation``: the error object (``ValidationFailed``, ``EngineError``), strict JSON, struct validation.
- ``telemetry``: the telemetry config, metric labels, and how the config reaches workers through Redis.
- ``events``: the eight payloads and the envelope.
- ``stream``: the Redis stream entry format (single envelopes and batches).
- ``control``: commands to workers on the control channel.
"""
