"""What the long-running control-plane processes refuse to start without.

A key made on each host (``var/secret-key``, ``var/prompt-hash-key``) is right for
one checkout under ``make run`` and wrong for a deployment: two web hosts would
not accept each other's sessions, and the same prompt would hash differently on
each ingester and change on every redeploy. So with ``DEBUG`` off, the web server
and the ingester refuse to start unless both keys come from the environment.
Workers sign and hash nothing: they need only ``REDIS_URL`` and their model files.
"""

from __future__ import annotations

import os

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

KEYS = {
    "SECRET_KEY": "signs sessions and CSRF tokens; every web host needs the same one",
    "MLXSERVE_PROMPT_HASH_KEY": "keys the prompt hashes; every web and ingester host needs the same one",
}


def host_made_keys() -> list[str]:
    """The keys this process read from a file its host made rather than from the environment."""
    made = getattr(settings, "HOST_MADE_KEYS", {})
    return [name for name in KEYS if name in made and not os.environ.get(name)]


def production_keys_require(process: str) -> None:
    """Raise ``ImproperlyConfigured`` saying why, if ``process`` must not start (DEBUG off,
    a key not set in the environment)."""
    if settings.DEBUG:
        return
    missing = host_made_keys()
    if missing:
        reasons = "; ".join(f"{name} {KEYS[name]}" for name in missing)
        raise ImproperlyConfigured(
            f"The {process} will not start with DEBUG off and {' and '.join(missing)} not set: {reasons}. "
            "A key made on this host would differ between hosts and change on redeploy. Set "
            f"{' and '.join(missing)} in the environment (python -c 'import secrets; "
            "print(secrets.token_urlsafe(50))' makes one), or DEBUG=1 for development. "
            "`make run` does this for you."
        )


@checks.register(checks.Tags.security, deploy=True)
def keys_from_the_environment(app_configs: object = None, **kwargs: object) -> list[checks.CheckMessage]:
    return [
        checks.Warning(
            f"{name} is read from a file this host made, not from the environment.",
            hint=f"Set {name} in the environment: it {KEYS[name]}.",
            id="mlxserve.W001",
        )
        for name in host_made_keys()
    ]
