"""The view serving the OpenAPI schema (apart from mlxserve.openapi, which DRF's settings
import while drf-spectacular's views are still loading)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.renderers import OpenApiJsonRenderer
from drf_spectacular.views import SpectacularAPIView


class SchemaView(SpectacularAPIView):
    """``/api/schema/``: YAML by default, JSON for ``Accept: application/json`` or ``?format=json``.

    DRF's own ``?format=`` handling is off project-wide (an unknown format was a 404
    on every endpoint); this view keeps the one users rely on.
    """

    def perform_content_negotiation(self, request: Any, force: bool = False) -> Any:
        if request.query_params.get("format") == "json":
            renderer = OpenApiJsonRenderer()
            return renderer, renderer.media_type
        return super().perform_content_negotiation(request, force)
