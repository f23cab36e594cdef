"""The payload rules' whole test plan, through the emitter (a Python program's way in) and over
HTTP (a producer's), with the same answer as the contract's."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from rest_framework.test import APIClient

from mlxserve.contract import EngineError, validate_event
from mlxserve.engine import EngineEventEmitter
from tests.factories import ACCEPTED, REJECTED, with_payload

pytestmark = pytest.mark.django_db


def json_can_carry(value: Any) -> bool:
    return not (isinstance(value, float) and not math.isfinite(value))


def emit(envelope: dict[str, Any]) -> tuple[EngineEventEmitter, list[Any]]:
    emitter = EngineEventEmitter(source=envelope["source"])
    seen: list[Any] = []
    emitter.on("*", seen.append)
    emitter.emit(
        envelope["type"], envelope["payload"], generation_id=envelope["generationId"], seq=envelope["seq"]
    )
    return emitter, seen


@pytest.mark.parametrize(("event_type", "field", "value", "message"), REJECTED)
def test_each_refusal_is_the_same_from_the_emitter_and_over_http(
    staff_client: APIClient, event_type: str, field: str, value: Any, message: str
) -> None:
    envelope = with_payload(event_type, **{field: value})
    with pytest.raises(EngineError) as by_contract:
        validate_event(envelope)
    with pytest.raises(EngineError) as by_emitter:
        emit(envelope)
    assert by_emitter.value.as_error() == by_contract.value.as_error()
    assert by_emitter.value.as_error()["details"]["issues"][0]["message"] == message
    if json_can_carry(value):  # NaN and Infinity are not JSON: an API client cannot send them at all
        response = staff_client.post(
            "/api/events/", data=json.dumps(envelope), content_type="application/json"
        )
        assert response.status_code == 400
        assert response.json() == by_contract.value.as_error()


@pytest.mark.parametrize(("event_type", "field", "value"), ACCEPTED)
def test_each_edge_is_accepted_by_the_emitter_and_over_http(
    staff_client: APIClient, event_type: str, field: str, value: Any
) -> None:
    envelope = with_payload(event_type, **{field: value})
    _, seen = emit(envelope)
    assert [e.type for e in seen] == [event_type]
    response = staff_client.post("/api/events/", data=json.dumps(envelope), content_type="application/json")
    assert response.status_code == 202, response.json()
