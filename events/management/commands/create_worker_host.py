from __future__ import annotations

import re
import secrets
from typing import Any

import redis
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from events.ingest import host_stream
from events.models import WorkerHost

# What a worker host's Redis user may do: Celery's queues and bookkeeping; on the event stream of
# its own, append and look (never trim, delete or read another's); read the config and the command
# log; the generations' attempt counts and its own (never another host's: those bound the
# retries). The shared `worker` user of deploy/redis/users.acl is the same rules on the shared
# stream and every counter (a test holds the file to them).
ACL_RULES = (
    "~celery* ~_kombu.* ~unacked* ~mlxserve.model.* &* +@all -@dangerous +info "
    "(~{stream} +xadd +xlen +xinfo|groups +xinfo|stream +memory|usage) "
    "(%R~{config_key} +get) (%R~{control_log} +xrange +xrevrange) "
    "({counters} +incrby +expire) (~mlxserve:serving:* +zadd +zrem +zremrangebyscore)"
)


def acl_rules(host: str | None) -> str:
    """A worker host's rules; ``None``: the shared `worker` user's."""
    return ACL_RULES.format(
        stream=settings.EVENTS_STREAM if host is None else host_stream(settings.EVENTS_STREAM, host),
        counters="~mlxserve:generation:*"
        if host is None
        else f"~mlxserve:generation:*:attempts ~mlxserve:generation:*:attempts:{host}",
        config_key=settings.TELEMETRY_CONFIG_KEY,
        control_log=f"{settings.WORKER_CONTROL_CHANNEL}:log",
    )


class Command(BaseCommand):
    help = (
        "Give a worker host an event stream of its own and a Redis user that may append to it alone: "
        "what that host's credentials can do to the events stays on its stream (events on it must have "
        "source HOST or HOST/...). Prints the ACL line for the Redis users file and the worker's "
        "environment; with --redis-admin-url, also makes the user on that Redis (ACL SETUSER, ACL SAVE)."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("host", help="The host's name: its workers' sources are HOST/...")
        parser.add_argument("--password", help="The Redis user's password (default: a new random one)")
        parser.add_argument("--redis-admin-url", help="A Redis URL with the right to run ACL SETUSER")

    def handle(self, *args: Any, **options: Any) -> None:
        host = options["host"]
        row = WorkerHost.objects.filter(name=host).first() or WorkerHost(name=host)
        try:
            row.full_clean(validate_unique=False)
        except ValidationError as exc:
            raise CommandError("; ".join(" ".join(v) for v in exc.message_dict.values())) from None
        password = options["password"] or secrets.token_urlsafe(32)
        user, rules = f"worker-{host}", acl_rules(host)
        if options["redis_admin_url"]:
            admin = redis.Redis.from_url(options["redis_admin_url"])
            # One argument a rule, a selector "( ... )" whole.
            arguments = re.findall(r"\([^)]*\)|\S+", rules)
            admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", *arguments)
            try:
                admin.execute_command("ACL", "SAVE")
            except redis.ResponseError:  # no aclfile: the user lives until Redis restarts
                self.stderr.write("Redis has no aclfile: add the line below to its users file too")
        row.save()
        self.stdout.write(f"user {user} on >{password} {rules}")
        self.stdout.write(f"MLXSERVE_EVENTS_STREAM={host_stream(settings.EVENTS_STREAM, host)}")
        self.stdout.write(f"MLXSERVE_WORKER_SOURCE={host}/worker-1")
