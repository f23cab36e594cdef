from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularSwaggerView

from mlxserve.web.metrics_view import metrics
from mlxserve.web.schema_view import SchemaView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/telemetry/", include("telemetry.urls")),
    path("api/", include("events.urls")),
    path("api/schema/", SchemaView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("v1/", include("serving.urls")),  # the OpenAI-compatible endpoints
    path("metrics", metrics, name="prometheus-django-metrics"),
]

handler404 = "mlxserve.web.api.not_found"
