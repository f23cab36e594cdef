"""The control plane's Django side: what the API's views share (parsing, errors, access, the
OpenAPI schema), the admin site, ``/metrics``, the static files, the long responses streamed
from the event loop, the roles and the checks a deployment must pass. The apps (events,
telemetry, serving) build on it; it imports none of them, nor the engine or the worker host."""
