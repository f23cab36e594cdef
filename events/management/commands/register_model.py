from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from events.models import RegisteredModel


class Command(BaseCommand):
    help = "Give a model directory (or a cached Hugging Face repo id) a name in the model registry."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("name")
        parser.add_argument("path")
        parser.add_argument("--description", default="")

    def handle(self, *args: Any, **options: Any) -> None:
        model = RegisteredModel.objects.filter(name=options["name"]).first()
        created = model is None
        model = model or RegisteredModel(name=options["name"])
        model.path, model.description = options["path"], options["description"]
        try:
            model.full_clean()
        except ValidationError as exc:
            raise CommandError(
                "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
            ) from None
        model.save()
        self.stdout.write(f"{'Registered' if created else 'Updated'} {model.name} -> {model.path}")
