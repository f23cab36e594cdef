from django.urls import path

from telemetry import views

urlpatterns = [
    path("config/", views.TelemetryConfigView.as_view(), name="telemetry-config"),
    path("config/history/", views.TelemetryConfigHistoryView.as_view(), name="telemetry-config-history"),
]
