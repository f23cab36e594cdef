from __future__ import annotations

import logging
import signal
import socket
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from events.ingest import EventIngester, ingest_run
from mlxserve.redis_conn import redis_client
from mlxserve.web.production import production_keys_require

logger = logging.getLogger("mlxserve.ingest")


class Command(BaseCommand):
    help = "Store events from the Redis stream in the database (long-running; Ctrl-C or SIGTERM stops it)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--consumer",
            default=socket.gethostname(),
            help="Consumer name in the group; keep it stable across restarts of one ingester.",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=5000,
            help="Events per transaction (about; entries may hold batches).",
        )
        parser.add_argument("--block-ms", type=int, default=1000)
        parser.add_argument("--log-every", type=float, default=10.0, help="Seconds between progress lines.")
        parser.add_argument(
            "--retention-every",
            type=float,
            default=3600.0,
            help="Seconds between retention runs (deleting events past their kept-for period); 0: never.",
        )
        parser.add_argument(
            "--exit-when-idle",
            action="store_true",
            help="Stop once the stream has nothing new (for scripts and tests).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            production_keys_require("ingester")
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from None
        self.stopping = False

        def stop(signum: int, frame: Any) -> None:
            # Finish the batch in hand (store, acknowledge), then leave.
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

        ingester = EventIngester(
            client=redis_client(),
            stream=settings.EVENTS_STREAM,
            group=settings.EVENTS_CONSUMER_GROUP,
            consumer=options["consumer"],
            batch_size=options["batch_size"],
            block_ms=options["block_ms"],
        )
        logger.info(
            "Ingesting %s (group %s, consumer %s) into %s",
            settings.EVENTS_STREAM,
            settings.EVENTS_CONSUMER_GROUP,
            options["consumer"],
            settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1],
        )
        ingest_run(
            ingester,
            stopping=lambda: self.stopping,
            retention_every=options["retention_every"],
            log_every=options["log_every"],
            exit_when_idle=options["exit_when_idle"],
        )
