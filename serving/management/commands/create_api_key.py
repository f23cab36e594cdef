"""``manage.py create_api_key NAME``: a key for the OpenAI-compatible endpoints, printed once."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand, CommandError, CommandParser

from events.models import RegisteredModel
from mlxserve.web.roles import OPERATOR_GROUP
from serving.models import ApiKey


class Command(BaseCommand):
    help = (
        "Make an API key for /v1/ (Authorization: Bearer <key>) and print it: it is shown this once. The key "
        "acts as an account allowed to generate: --user, or an API account named NAME (made an operator, "
        "with no password) when there is none."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="The key's name (unique)")
        parser.add_argument(
            "--user", help="The account the key acts as (an operator or staff); default: NAME"
        )
        parser.add_argument(
            "--models", nargs="+", default=[], help="Registered models it may use (default: all)"
        )
        parser.add_argument("--requests-per-minute", type=int, help="Requests a minute (default: no limit)")
        parser.add_argument("--tokens-per-minute", type=int, help="Prompt and completion tokens a minute")

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["name"]
        if not 1 <= len(name) <= 100:
            raise CommandError("NAME must be 1 to 100 characters")
        if ApiKey.objects.filter(name=name).exists():
            raise CommandError(
                f"A key named {name!r} exists already (revoke it in the admin, or pick another name)"
            )
        for option in ("requests_per_minute", "tokens_per_minute"):
            value = options[option]
            if value is not None and not 1 <= value <= 2**31 - 1:
                raise CommandError(f"--{option.replace('_', '-')} must be from 1 to {2**31 - 1}")
        unknown = sorted(set(options["models"]) - set(RegisteredModel.objects.values_list("name", flat=True)))
        if unknown:
            raise CommandError(f"Not registered: {', '.join(unknown)} (manage.py register_model NAME PATH)")
        username = options["user"] or name
        user = User.objects.filter(username=username).first()
        if user is None and options["user"]:
            raise CommandError(f"No account {username!r}")
        if user is None:
            user = User(username=username)
            user.set_unusable_password()
            user.full_clean(exclude=["password"])
            user.save()
            user.groups.add(Group.objects.get_or_create(name=OPERATOR_GROUP)[0])
            self.stderr.write(f"Made the API account {username!r} (an operator, no password)")
        elif not (user.is_staff or user.groups.filter(name=OPERATOR_GROUP).exists()):
            raise CommandError(f"Account {username!r} may not generate: make it an operator or staff first")
        _, key = ApiKey.create(
            name=name,
            user=user,
            model_names=options["models"],
            requests_per_minute=options["requests_per_minute"],
            tokens_per_minute=options["tokens_per_minute"],
        )
        self.stdout.write(key)
