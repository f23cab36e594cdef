from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand
from rest_framework.authtoken.models import Token

from mlxserve.web.roles import ADMIN_GROUP, ROLES


class Command(BaseCommand):
    help = (
        "Create (or update) an account with one role and print its API token. Admins are staff and log "
        "into the admin (a password is generated unless --password is given); viewers, operators and "
        "producers are API tokens."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("username")
        parser.add_argument("--role", choices=ROLES, required=True, help="each role is a group of that name")
        parser.add_argument(
            "--password", help="admins: the login password (default: a generated one, printed)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        role = options["role"]
        user, _ = get_user_model().objects.get_or_create(username=options["username"])
        user.groups.set([Group.objects.get_or_create(name=role)[0]])
        # Staff may change the config, so only admins are staff (and log into the admin).
        user.is_staff = role == ADMIN_GROUP
        password = None
        if role == ADMIN_GROUP:
            password = options["password"] or secrets.token_urlsafe(12)
            user.set_password(password)
        else:
            user.set_unusable_password()  # a token, never a login
        user.save()
        token, _ = Token.objects.get_or_create(user=user)
        self.stdout.write(f"token: {token.key}")
        if password and not options["password"]:
            self.stdout.write(f"password: {password}")
