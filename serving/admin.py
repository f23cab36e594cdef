from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from serving.models import ApiKey


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Keys are made with ``manage.py create_api_key`` (the key is shown once, there); here they
    are seen, limited and revoked."""

    list_display = (
        "name",
        "prefix",
        "user",
        "requests_per_minute",
        "tokens_per_minute",
        "is_active",
        "last_used_at",
    )
    list_filter = ("is_active",)
    search_fields = ("name", "prefix", "user__username")
    readonly_fields = ("prefix", "created_at", "last_used_at")
    fields = (
        "name",
        "user",
        "prefix",
        "models",
        "requests_per_minute",
        "tokens_per_minute",
        "is_active",
        "created_at",
        "last_used_at",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
