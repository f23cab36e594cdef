from __future__ import annotations

import io
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from rest_framework.test import APIClient

from tests.factories import make_envelope

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue().strip()


def test_create_producer_makes_a_token_that_can_only_post_events() -> None:
    token = run("create_producer", "mac-studio-3")
    assert run("create_producer", "mac-studio-3") == token  # idempotent
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.post("/api/events/", make_envelope(), format="json").status_code == 202
    assert client.get("/api/events/").status_code == 403
    assert client.get("/api/telemetry/config/").status_code == 403
    assert not User.objects.get(username="mac-studio-3").has_usable_password()


def test_bootstrap_admin_prints_a_working_login(settings: Any, tmp_path: Any) -> None:
    settings.VAR_DIR = tmp_path
    line = run("bootstrap_admin")
    password = line.rsplit("password: ", 1)[1]
    assert run("bootstrap_admin") == line  # same login on the next run
    client = APIClient()
    assert client.login(username="admin", password=password)
    assert client.get("/api/telemetry/config/").status_code == 200


def test_create_demo_model_writes_a_model_mlx_lm_loads(tmp_path: Any) -> None:
    import mlx_lm

    out = run("create_demo_model", str(tmp_path / "demo"))
    assert "Demo model ready" in out
    _model, tokenizer = mlx_lm.load(str(tmp_path / "demo"))[:2]
    assert tokenizer.decode(tokenizer.encode("hello world")).strip() == "hello world"


def test_register_model_names_a_path() -> None:
    from events.models import RegisteredModel

    assert run("register_model", "demo", "/models/demo") == "Registered demo -> /models/demo"
    assert run("register_model", "demo", "/models/other") == "Updated demo -> /models/other"
    assert RegisteredModel.objects.get(name="demo").path == "/models/other"


@pytest.mark.parametrize(
    ("role", "writes_config", "queues"),
    [("viewer", 403, 403), ("operator", 403, 400), ("admin", 200, 400)],
)
def test_create_account_makes_a_role_whose_token_does_its_work(
    role: str, writes_config: int, queues: int
) -> None:
    from django.test import Client

    out = run("create_account", f"{role}-1", "--role", role).splitlines()
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=out[0].replace("token: ", "Token "))
    assert api.get("/api/events/").status_code == 200
    patched = api.patch("/api/telemetry/config/", {"serviceName": "x"}, format="json")
    assert patched.status_code == writes_config
    # May it queue? An empty order is refused for what it holds (400), not for who sent it (403).
    assert api.post("/api/generations/", {}, format="json").status_code == queues
    if role == "admin":  # staff: logs into the admin with the printed password
        assert Client().login(username="admin-1", password=out[1].removeprefix("password: "))
    else:
        assert len(out) == 1 and not User.objects.get(username=f"{role}-1").is_staff


def test_create_account_for_a_producer_gives_a_token_and_no_login() -> None:
    out = run("create_account", "mac-9", "--role", "producer").splitlines()
    assert len(out) == 1 and out[0].startswith("token: ")
    assert not User.objects.get(username="mac-9").has_usable_password()
