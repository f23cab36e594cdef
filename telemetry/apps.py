from django.apps import AppConfig


class TelemetryAppConfig(AppConfig):
    name = "telemetry"
    verbose_name = "Telemetry"
    default_auto_field = "django.db.models.BigAutoField"
