"""The admin says which product and which deployment it is."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from django.test import Client


@pytest.mark.django_db
def test_the_admin_is_named_after_the_deployment(client: Client, settings: Any) -> None:
    settings.MLXSERVE_SITE_NAME = "prod-eu · 20 Mac Studios"
    page = client.get("/admin/login/").content.decode()
    assert "<title>Log in | mlxserve prod-eu · 20 Mac Studios</title>" in page
    assert "mlxserve · prod-eu · 20 Mac Studios" in page
    assert "Django administration" not in page


def test_by_default_it_is_named_after_the_host() -> None:
    from django.conf import settings

    assert socket.gethostname() == settings.MLXSERVE_SITE_NAME
