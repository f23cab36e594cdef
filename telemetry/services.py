from __future__ import annotations

import logging
from typing import Any, NamedTuple

import redis
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import transaction

from mlxserve.bus import telemetry_config_publish, telemetry_config_read
from mlxserve.contract.telemetry import (
    FIELD_TO_WIRE,
    TelemetryConfigSchema,
    telemetry_config_merge,
    telemetry_config_validate,
)
from mlxserve.redis_conn import redis_client
from telemetry.models import TelemetryConfig, TelemetryConfigChange

logger = logging.getLogger(__name__)

User = AbstractBaseUser | AnonymousUser | None


class ConfigSaved(NamedTuple):
    config: TelemetryConfig
    # False when Redis was unreachable: saved, and published later by the ingester.
    published: bool


def telemetry_config_get() -> TelemetryConfig:
    config = TelemetryConfig.load()
    return config


def telemetry_config_replace(*, data: Any, user: User, via: str) -> ConfigSaved:
    """PUT: ``data`` is a whole config in wire names; raises ``ValidationFailed``."""
    return telemetry_config_save(telemetry_config_validate(data), user=user, via=via)


def telemetry_config_patch(*, data: Any, user: User, via: str) -> ConfigSaved:
    """PATCH: the fields in ``data`` replace the current ones; raises ``ValidationFailed``."""
    return telemetry_config_save(
        telemetry_config_merge(telemetry_config_get().to_schema(), data), user=user, via=via
    )


def telemetry_config_save(new: TelemetryConfigSchema, *, user: User, via: str) -> ConfigSaved:
    """Store a validated config: a history entry if anything changed, then published to workers."""
    account: Any = user if user is not None and user.is_authenticated else None
    with transaction.atomic():
        telemetry_config_get()  # make sure the row exists before locking it
        config = TelemetryConfig.objects.select_for_update().get(pk=TelemetryConfig.SINGLETON_PK)
        before, after = config.to_schema().to_wire(), new.to_wire()
        changes = {k: [before[k], after[k]] for k in after if before[k] != after[k]}
        if changes:
            for field, wire in FIELD_TO_WIRE.items():
                setattr(config, field, after[wire])
            config.version += 1
            config.updated_by = account  # type: ignore[assignment]
            config.save()
            TelemetryConfigChange.objects.create(
                version=config.version,
                config=after,
                changes=changes,
                changed_by=account,
                changed_by_username=account.get_username() if account else "",
                via=via,
            )
    return ConfigSaved(config, telemetry_config_push(config))


def telemetry_config_push(config: TelemetryConfig) -> bool:
    """Publish ``config`` to the workers. False (and a log line) if Redis is down.

    The database stays the source of truth: ``ingest_events`` re-publishes
    whenever Redis holds an older version (or none, after a Redis restart).
    """
    try:
        telemetry_config_publish(
            client=redis_client(),
            key=settings.TELEMETRY_CONFIG_KEY,
            config=config.to_schema(),
            version=config.version,
        )
        return True
    except redis.RedisError as exc:
        logger.error("Telemetry config version %s saved but not published: %s", config.version, exc)
        return False


def telemetry_config_sync() -> bool:
    """Publish the stored config if Redis lacks it or holds another one. True if it published."""
    config = telemetry_config_get()
    published = telemetry_config_read(client=redis_client(), key=settings.TELEMETRY_CONFIG_KEY)
    if published == (config.version, config.to_schema()):
        return False
    return telemetry_config_push(config)
