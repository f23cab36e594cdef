from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from mlxserve.metrics_view import metrics

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/telemetry/", include("telemetry.urls")),
    path("api/", include("events.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("metrics", metrics, name="prometheus-django-metrics"),
]

handler404 = "mlxserve.api.not_found"
