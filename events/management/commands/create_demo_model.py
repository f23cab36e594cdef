from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand

from mlxserve.engine.demo_model import create_demo_model


class Command(BaseCommand):
    help = (
        "Write a small MLX Llama model with random weights and a locally trained tokenizer to DIR "
        "(nothing is downloaded; its output is gibberish, its machinery is real)."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("directory")
        parser.add_argument("--seed", type=int, default=0)

    def handle(self, *args: Any, **options: Any) -> None:
        started = time.monotonic()
        self.stdout.write(f"Training a tokenizer and writing random weights to {options['directory']} ...")
        path = create_demo_model(options["directory"], seed=options["seed"])
        self.stdout.write(
            self.style.SUCCESS(f"Demo model ready in {path} ({time.monotonic() - started:.1f}s)")
        )
