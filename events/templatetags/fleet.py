"""``{% fleet_overview as fleet %}`` (the admin index's fleet panel, events.selectors) and
``|epoch_ms`` (an epoch-milliseconds time as UTC text)."""

from __future__ import annotations

from datetime import UTC, datetime

from django import template
from django.conf import settings

from events import selectors
from events.backlog import stream_lag
from events.selectors import ConfigRollout, FleetOverview
from mlxserve.redis_conn import redis_client

register = template.Library()


def _lag() -> dict[str, int]:
    return stream_lag(
        client=redis_client(), stream=settings.EVENTS_STREAM, group=settings.EVENTS_CONSUMER_GROUP
    )


@register.simple_tag
def fleet_overview() -> FleetOverview:
    return selectors.fleet_overview(lag=_lag)


@register.filter
def epoch_ms(value: int) -> str:
    if not value:
        return "never"
    return datetime.fromtimestamp(value / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@register.simple_tag
def config_rollout(version: int) -> ConfigRollout:
    return selectors.config_rollout(version)
