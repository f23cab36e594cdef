from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from events.models import RegisteredModel


class Command(BaseCommand):
    help = "Give a model directory (or a cached Hugging Face repo id) a name in the model registry."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("name")
        parser.add_argument("path")
        parser.add_argument("--description", default="")

    def handle(self, *args: Any, **options: Any) -> None:
        model, created = RegisteredModel.objects.update_or_create(
            name=options["name"], defaults={"path": options["path"], "description": options["description"]}
        )
        self.stdout.write(f"{'Registered' if created else 'Updated'} {model.name} -> {model.path}")
