from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from events.models import StatsCoverage
from events.rollups import rollups_rebuild


class Command(BaseCommand):
    help = (
        "Build the hourly stats rollups of events stored before they existed (an upgrade from a"
        " version without them), newest hour first. Stats are right meanwhile, and faster as it goes;"
        " safe beside running ingesters, and can be stopped and run again."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days", type=int, default=None, help="only the last DAYS days (default: every stored hour)"
        )
        parser.add_argument(
            "--rebuild",
            action="store_true",
            help="rebuild the rollups of every stored hour, not only those stored before them (after"
            " events were loaded around the ingester: a restore of the events table alone, a bulk load)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        since = None
        if options["days"] is not None:
            since = time.time_ns() // 1_000_000 - options["days"] * 86_400_000
        started = time.monotonic()
        total = {"hours": 0, "events": 0}

        def report(hour: int, events: int, left: int) -> None:
            total["hours"] += 1
            total["events"] += events
            if total["hours"] % 24 == 1 or left == 0:
                moment = datetime.fromtimestamp(hour / 1000, UTC).strftime("%Y-%m-%d %H:00")
                self.stderr.write(
                    f"  {moment} UTC: {total['hours']:,} hours, {total['events']:,} events"
                    f" ({time.monotonic() - started:.0f}s), {left:,} hours to go"
                )

        built = rollups_rebuild(since_hour=since, everything=options["rebuild"], on_hour=report)
        covered = StatsCoverage.load().covered_from
        where = (
            "every stored hour"
            if covered == 0
            else datetime.fromtimestamp(covered / 1000, UTC).strftime("%Y-%m-%d %H:00 UTC on")
        )
        self.stdout.write(
            f"Built {built:,} hours of rollups ({total['events']:,} events); stats read rollups for {where}"
        )
