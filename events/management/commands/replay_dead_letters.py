from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from events.dead_letters import dead_letters_replay
from events.models import DeadLetter


class Command(BaseCommand):
    help = "Validate dead letters again and store the ones that are valid now."

    def handle(self, *args: Any, **options: Any) -> None:
        stored, invalid = dead_letters_replay(DeadLetter.objects.filter(replayed_at__isnull=True).iterator())
        self.stdout.write(f"{stored} stored, {invalid} still invalid")
