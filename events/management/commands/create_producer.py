from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand
from rest_framework.authtoken.models import Token

from mlxserve.web.roles import PRODUCER_GROUP


class Command(BaseCommand):
    help = (
        "Create (or reuse) an account that can only post events, and print its API token. Name it after the "
        "host: account NAME may post only events whose source is NAME or starts with NAME/."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("username")

    def handle(self, *args: Any, **options: Any) -> None:
        user, created = get_user_model().objects.get_or_create(username=options["username"])
        if created:
            user.set_unusable_password()  # a token, never a login
            user.save()
        user.groups.add(Group.objects.get_or_create(name=PRODUCER_GROUP)[0])
        token, _ = Token.objects.get_or_create(user=user)
        self.stdout.write(token.key)
