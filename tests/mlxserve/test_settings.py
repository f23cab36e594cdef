"""Settings as an operator sets them: the README's production environment passes Django's deploy checks."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

from django.conf import settings as django_settings

ROOT = Path(django_settings.BASE_DIR)


def readme_production_environment() -> dict[str, str]:
    """The environment block under "Running it in production" in the README, as written there."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Running it in production", 1)[1]
    block = section.split("```", 2)[1]
    return dict(line.split("=", 1) for line in block.strip().splitlines())


def deploy_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )


def test_the_readme_production_settings_pass_the_deploy_checks() -> None:
    env = readme_production_environment()
    assert env["SECRET_KEY"].startswith("<")  # a placeholder the operator fills in
    env["SECRET_KEY"] = secrets.token_urlsafe(60)
    result = deploy_check(env)
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_without_them_the_deploy_checks_say_what_is_missing() -> None:
    result = deploy_check({"DEBUG": "0", "SECRET_KEY": secrets.token_urlsafe(60)})
    assert result.returncode != 0
    assert set(re.findall(r"security\.W\d+", result.stderr)) >= {
        "security.W004",
        "security.W012",
        "security.W016",
    }


def test_a_malformed_proxy_header_refuses_to_start() -> None:
    result = deploy_check({"MLXSERVE_PROXY_SSL_HEADER": "X-Forwarded-Proto"})
    assert result.returncode != 0
    assert "MLXSERVE_PROXY_SSL_HEADER must look like HTTP_X_FORWARDED_PROTO=https" in result.stderr
