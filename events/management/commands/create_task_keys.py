from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from events.signing import task_keys


class Command(BaseCommand):
    help = (
        "Make a key pair for signed generation tasks: MLXSERVE_TASK_SIGNING_KEY for the control plane "
        "(web hosts; keep it secret) and MLXSERVE_TASK_VERIFY_KEY for every worker, which then runs "
        "only tasks the control plane signed."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        signing, verify = task_keys()
        self.stdout.write(f"MLXSERVE_TASK_SIGNING_KEY={signing}")
        self.stdout.write(f"MLXSERVE_TASK_VERIFY_KEY={verify}")
