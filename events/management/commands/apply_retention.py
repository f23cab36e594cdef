from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from events.fleet import fleet_labels_fold
from events.partitions import Partition
from events.retention import events_retention_apply


class Command(BaseCommand):
    help = (
        "Delete events past their type's kept-for period (dropping whole partitions on PostgreSQL), and fold"
        " metric label values unseen for as long"
        " into the overflow series, now (ingest_events also does both every hour)."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        progress = {"rows": 0}

        def report(event_type: str, count: int, seconds: float) -> None:
            progress["rows"] += count
            if count:
                self.stderr.write(f"  {event_type}: {progress['rows']:,} deleted so far")

        def dropped(partition: Partition) -> None:
            self.stdout.write(f"partition {partition.name} ({partition.span}) dropped")

        for event_type, count in events_retention_apply(on_chunk=report, on_drop=dropped).items():
            self.stdout.write(f"{event_type}: {count} deleted")
        folded = fleet_labels_fold()
        self.stdout.write(
            f"{folded} metric label values unseen since the retention period folded into the overflow"
        )
