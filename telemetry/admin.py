from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect

from mlxserve.web.admin import ReadOnlyAdmin, SingletonAdmin
from telemetry.forms import TelemetryConfigForm
from telemetry.models import TelemetryConfig, TelemetryConfigChange
from telemetry.services import telemetry_config_get, telemetry_config_save


@admin.register(TelemetryConfig)
class TelemetryConfigAdmin(SingletonAdmin):
    form = TelemetryConfigForm
    fieldsets = [
        (None, {"fields": ["enabled", "service_name", "prometheus_port", "export_interval_ms"]}),
        ("Change", {"fields": ["version", "updated_at", "updated_by"]}),
    ]
    readonly_fields = ["version", "updated_at", "updated_by"]

    def singleton(self) -> TelemetryConfig:
        return telemetry_config_get()

    def save_model(self, request: HttpRequest, obj: TelemetryConfig, form: Any, change: bool) -> None:
        # Through the service, like the API: one place records history and publishes.
        saved = telemetry_config_save(form.schema, user=request.user, via="admin")  # the form validated it
        obj.refresh_from_db()
        if not saved.published:
            self.message_user(
                request,
                "Saved, but Redis is unreachable: workers get this config once it is back "
                "(the ingester republishes it).",
                level=messages.WARNING,
            )

    def response_change(self, request: HttpRequest, obj: TelemetryConfig) -> HttpResponse:
        # Stay on the page after saving: there is no list to go back to.
        if "_continue" not in request.POST:
            self.message_user(request, f"Telemetry config saved (version {obj.version}).", messages.SUCCESS)
            return HttpResponseRedirect(request.path)
        return super().response_change(request, obj)


@admin.register(TelemetryConfigChange)
class TelemetryConfigChangeAdmin(ReadOnlyAdmin):
    list_display = ["version", "changed_at", "changed_by_username", "via", "changes"]
    list_filter = ["via"]
    search_fields = ["changed_by_username"]
    readonly_fields = [
        "version",
        "config",
        "changes",
        "changed_by",
        "changed_by_username",
        "via",
        "changed_at",
    ]
