"""Fixtures of the events app's tests: a fleet's day (and two and a half days) of events, ingested."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.events.rollup_data import fleet_day, ingest


@pytest.fixture
def day(db: Any) -> list[dict[str, Any]]:
    rng = random.Random(11)
    events = fleet_day(rng)
    ingest(events, rng)
    return events


@pytest.fixture
def days(db: Any) -> list[dict[str, Any]]:
    rng = random.Random(13)
    events = fleet_day(rng, hours=60)
    ingest(events, rng, redeliver=False)
    return events
