from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from events.fleet import fleet_labels_fold
from events.retention import events_retention_apply


class Command(BaseCommand):
    help = (
        "Delete events past their type's kept-for period, and fold metric label values unseen for as long"
        " into the overflow series, now (ingest_events also does both every hour)."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        progress = {"rows": 0}

        def report(event_type: str, count: int, seconds: float) -> None:
            progress["rows"] += count
            if count:
                self.stderr.write(f"  {event_type}: {progress['rows']:,} deleted so far")

        for event_type, count in events_retention_apply(on_chunk=report).items():
            self.stdout.write(f"{event_type}: {count} deleted")
        folded = fleet_labels_fold()
        self.stdout.write(
            f"{folded} metric label values unseen since the retention period folded into the overflow"
        )
