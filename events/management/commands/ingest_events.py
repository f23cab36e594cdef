from __future__ import annotations

import logging
import signal
import socket
import time
from typing import Any

import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from django.db import close_old_connections

from events.fleet import fleet_labels_fold
from events.services import DATABASE_ERRORS, EventIngester, events_retention_apply, stream_lag
from mlxserve.production import production_keys_require
from mlxserve.redis_conn import redis_client
from telemetry.services import telemetry_config_sync

logger = logging.getLogger("mlxserve.ingest")

# Redis or the database unreachable (or refusing for reasons no event caused): wait, retry.
PAUSING_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, *DATABASE_ERRORS)


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
        stored = dead = 0
        window_start = time.monotonic()
        window_stored = 0
        next_sync = 0.0
        next_retention = time.monotonic() + 60 if options["retention_every"] > 0 else float("inf")
        backoff = 0.5
        while not self.stopping:
            try:
                if time.monotonic() >= next_sync:
                    telemetry_config_sync()
                    next_sync = time.monotonic() + 5
                if time.monotonic() >= next_retention:
                    removed = events_retention_apply()
                    logger.info("Retention: deleted %s", {k: v for k, v in removed.items() if v} or "nothing")
                    if folded := fleet_labels_fold():
                        logger.info(
                            "Retention: %d metric label values folded into the overflow series", folded
                        )
                    next_retention = time.monotonic() + options["retention_every"]
                outcome = ingester.step()
                stored += outcome.stored
                dead += outcome.dead
                window_stored += outcome.stored
                backoff = 0.5
                if options["exit_when_idle"] and outcome.stored + outcome.duplicates + outcome.dead == 0:
                    break
            except PAUSING_ERRORS as exc:
                logger.error("Ingest paused (%s: %s); retrying in %.1fs", type(exc).__name__, exc, backoff)
                close_old_connections()
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            elapsed = time.monotonic() - window_start
            if elapsed >= options["log_every"]:
                try:
                    trimmed = ingester.trim()
                    lag = stream_lag(client=ingester.client, stream=ingester.stream, group=ingester.group)
                except redis.RedisError:
                    continue  # reported by the next step's retry
                logger.info(
                    "stored %d events (%.0f/s), %d dead letters; stream length %d (%d trimmed), "
                    "pending %d, not yet read %d, oldest not stored %.1fs",
                    stored,
                    window_stored / elapsed,
                    dead,
                    lag["length"],
                    trimmed,
                    lag["pending"],
                    lag["undelivered"],
                    lag["lag_ms"] / 1000,
                )
                window_start, window_stored = time.monotonic(), 0
        logger.info("Stopped: stored %d events, %d dead letters", stored, dead)
