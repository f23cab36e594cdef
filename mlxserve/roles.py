"""The roles of SPEC section 4 and issue 5, as Django groups with their admin permissions.

- ``viewer``: reads history (API reads; in the admin, with ``is_staff``, views everything).
- ``operator``: a viewer who also queues generations, unloads models, replays dead
  letters and edits the model registry.
- ``admin``: a staff user; edits the telemetry config, retention and prompt policies.
- ``producer``: posts events and nothing else (a token, never a login).

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
_OPERATOR_EXTRA = ("change_deadletter", "add_registeredmodel", "change_registeredmodel")


def roles_ensure(**kwargs: Any) -> None:
    """Create the role groups and give each its permissions; idempotent."""
    from django.contrib.auth.models import Group, Permission

    permissions = Permission.objects.filter(content_type__app_label__in=_APPS)
    view = [p for p in permissions if p.codename.startswith("view_")]
    grants = {
        VIEWER_GROUP: view,
        OPERATOR_GROUP: view + [p for p in permissions if p.codename in _OPERATOR_EXTRA],
        ADMIN_GROUP: list(permissions),
        PRODUCER_GROUP: [],
    }
    for name, granted in grants.items():
        group, _ = Group.objects.get_or_create(name=name)
        group.permissions.set(granted)
