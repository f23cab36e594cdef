"""The roles, as Django groups with their admin permissions.

- ``viewer``: reads history over the API.
- ``operator``: a viewer who also queues generations and unloads models.
- ``admin``: staff (only staff change the config), with every admin permission of the
  two apps: the telemetry config, retention and prompt policies, dead-letter replay.
- ``producer``: posts events and nothing else (a token, never a login).

Viewers and operators are API accounts, not staff: staff may change the config.
The groups are (re)made after every ``migrate``, so a new deployment has them.
"""

from __future__ import annotations

from typing import Any

VIEWER_GROUP = "viewer"
OPERATOR_GROUP = "operator"
ADMIN_GROUP = "admin"
PRODUCER_GROUP = "producer"
ROLES = (VIEWER_GROUP, OPERATOR_GROUP, ADMIN_GROUP, PRODUCER_GROUP)

_APPS = ("events", "telemetry")


def roles_ensure(**kwargs: Any) -> None:
    """Create the role groups and give each its permissions; idempotent."""
    from django.contrib.auth.models import Group, Permission

    permissions = list(Permission.objects.filter(content_type__app_label__in=_APPS))
    grants = {VIEWER_GROUP: [], OPERATOR_GROUP: [], ADMIN_GROUP: permissions, PRODUCER_GROUP: []}
    for name, granted in grants.items():
        group, _ = Group.objects.get_or_create(name=name)
        group.permissions.set(granted)
