"""API keys for the OpenAI-compatible endpoints (``Authorization: Bearer <key>``)."""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.db import models

KEY_PREFIX = "mlx-"


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKey(models.Model):
    """A key acts as its account (one allowed to generate: an operator or staff), within its own
    budgets and models. Only the key's SHA-256 is stored: the key is shown once, when made."""

    name = models.CharField(max_length=100, unique=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    digest = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(
        max_length=12, editable=False, help_text="The key's first characters, to tell keys apart"
    )
    model_names = models.JSONField(
        default=list, blank=True, help_text="Registered model names this key may use; empty: every model"
    )
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True, help_text="Empty: no limit")
    tokens_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Prompt and completion tokens a minute; empty: no limit"
    )
    is_active = models.BooleanField(default=True, help_text="Untick to revoke the key")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        verbose_name = "API key"
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @classmethod
    def create(cls, **fields: object) -> tuple[ApiKey, str]:
        """A new key and its secret (shown once)."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        row = cls.objects.create(digest=key_digest(key), prefix=key[:12], **fields)
        return row, key
