"""Model bases both apps use."""

from __future__ import annotations

from typing import Any, Self

from django.db import models


class SingletonModel(models.Model):
    """A table of exactly one row (pk 1): a CHECK constraint holds it to one, ``load()``
    reads it, made with its defaults the first time. Subclasses' ``Meta`` inherit this one."""

    SINGLETON_PK = 1

    class Meta:
        abstract = True
        constraints = [
            models.CheckConstraint(condition=models.Q(pk=1), name="%(app_label)s_%(class)s_singleton"),
        ]

    @classmethod
    def load(cls, **lookups: Any) -> Self:
        row, _ = cls.objects.get_or_create(pk=cls.SINGLETON_PK, **lookups)  # type: ignore[attr-defined]
        return row
