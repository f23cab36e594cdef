"""The view serving the OpenAPI schema (apart from mlxserve.web.openapi, which DRF's settings
import while drf-spectacular's views are still loading)."""

from __future__ import annotations

import threading
from typing import Any

from drf_spectacular.renderers import OpenApiJsonRenderer
from drf_spectacular.views import SpectacularAPIView
from rest_framework.response import Response

_schema: dict[str, Any] = {}
_schema_lock = threading.Lock()


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

    # The schema is the same for every request (the API has one version and a public schema): it
    # is generated once per process, so an anonymous client asking for it again and again costs
    # a lookup and a rendering, not an introspection of every view.

    def _get_version_parameter(self, request: Any) -> None:
        return None  # one version: a ?version= cannot make the view generate (or keep) another

    def _get_schema_response(self, request: Any) -> Response:
        with _schema_lock:
            if "schema" not in _schema:
                generator = self.generator_class(
                    urlconf=self.urlconf, api_version=None, patterns=self.patterns
                )
                _schema["schema"] = generator.get_schema(request=request, public=self.serve_public)
        return Response(
            data=_schema["schema"],
            headers={"Content-Disposition": f'inline; filename="{self._get_filename(request, None)}"'},
        )
