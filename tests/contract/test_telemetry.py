from __future__ import annotations

from typing import Any

import pytest

from mlxserve.contract.telemetry import (
    TelemetryConfigSchema,
    metric_labels_validate,
    telemetry_config_merge,
    telemetry_config_validate,
)
from mlxserve.contract.validation import ValidationFailed


def issues_of(data: Any) -> list[tuple[list[Any], str]]:
    with pytest.raises(ValidationFailed) as info:
        telemetry_config_validate(data)
    return [(i.path, i.message) for i in info.value.issues]


def test_it_fills_in_the_defaults() -> None:
    config = telemetry_config_validate({"enabled": True})
    assert config.to_wire() == {
        "enabled": True,
        "serviceName": "kr-serve-mlx",
        "prometheusPort": 9464,
        "exportIntervalMs": 60000,
    }


def test_enabled_is_required() -> None:
    assert issues_of({}) == [(["enabled"], "Required")]


@pytest.mark.parametrize("value", ["true", 1, 0, None])
def test_enabled_must_be_a_real_boolean(value: Any) -> None:
    assert issues_of({"enabled": value}) == [(["enabled"], "Must be a boolean")]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "Service name cannot be empty"),
        ("a" * 101, "Service name cannot exceed 100 characters"),
        ("has space", "Service name must be alphanumeric with hyphens/underscores"),
        ("worker\n", "Service name must be alphanumeric with hyphens/underscores"),
        ("dot.name", "Service name must be alphanumeric with hyphens/underscores"),
        ("caf\u00e9", "Service name must be alphanumeric with hyphens/underscores"),
        ("\uff11\uff12", "Service name must be alphanumeric with hyphens/underscores"),
        ("\uff21", "Service name must be alphanumeric with hyphens/underscores"),
    ],
)
def test_it_rejects_bad_service_names_with_the_exact_message(name: str, message: str) -> None:
    assert issues_of({"enabled": True, "serviceName": name}) == [(["serviceName"], message)]


@pytest.mark.parametrize("name", ["a", "a" * 100, "Mac-Studio_3", "0", "-_-"])
def test_it_accepts_service_names_at_the_edges(name: str) -> None:
    assert telemetry_config_validate({"enabled": True, "serviceName": name}).service_name == name


@pytest.mark.parametrize(
    ("port", "message"),
    [
        (1023, "Port must be at least 1024 (non-privileged)"),
        (80, "Port must be at least 1024 (non-privileged)"),
        (-1, "Port must be at least 1024 (non-privileged)"),
        (65536, "Port cannot exceed 65535"),
        (2**70, "Port cannot exceed 65535"),
        ("9464", "Must be an integer"),
        (9464.5, "Must be an integer"),
        (9464.0, "Must be an integer"),
        (True, "Must be an integer"),
        (None, "Must be an integer"),
    ],
)
def test_it_rejects_bad_ports_with_the_exact_message(port: Any, message: str) -> None:
    assert issues_of({"enabled": True, "prometheusPort": port}) == [(["prometheusPort"], message)]


@pytest.mark.parametrize("port", [1024, 65535, 9464])
def test_it_accepts_ports_at_the_edges(port: int) -> None:
    assert telemetry_config_validate({"enabled": True, "prometheusPort": port}).prometheus_port == port


@pytest.mark.parametrize(
    ("interval", "message"),
    [
        (999, "Export interval must be at least 1 second"),
        (600001, "Export interval cannot exceed 10 minutes"),
        ("60000", "Must be an integer"),
        (1000.5, "Must be an integer"),
        (False, "Must be an integer"),
    ],
)
def test_it_rejects_bad_intervals_with_the_exact_message(interval: Any, message: str) -> None:
    assert issues_of({"enabled": True, "exportIntervalMs": interval}) == [(["exportIntervalMs"], message)]


@pytest.mark.parametrize("interval", [1000, 600000])
def test_it_accepts_intervals_at_the_edges(interval: int) -> None:
    assert (
        telemetry_config_validate({"enabled": True, "exportIntervalMs": interval}).export_interval_ms
        == interval
    )


def test_it_rejects_unknown_fields_and_names_them() -> None:
    assert issues_of({"enabled": True, "metricsPort": 9000}) == [
        (["metricsPort"], "Unknown field 'metricsPort'")
    ]


def test_snake_case_names_are_unknown_on_the_wire() -> None:
    assert issues_of({"enabled": True, "service_name": "x"}) == [
        (["service_name"], "Unknown field 'service_name'")
    ]


def test_it_lists_every_issue_and_describes_the_first() -> None:
    with pytest.raises(ValidationFailed) as info:
        telemetry_config_validate(
            {"enabled": "yes", "serviceName": "", "prometheusPort": 80, "exportIntervalMs": 10**9, "x": 1}
        )
    error = info.value.as_error()
    assert error["code"] == "InvalidParams"
    assert error["message"] == "Validation error on field 'enabled': Must be a boolean"
    assert error["details"]["field"] == "enabled"
    assert [i["path"] for i in error["details"]["issues"]] == [
        ["enabled"],
        ["serviceName"],
        ["prometheusPort"],
        ["exportIntervalMs"],
        ["x"],
    ]
    assert [i["code"] for i in error["details"]["issues"]] == [
        "invalid_type",
        "too_small",
        "too_small",
        "too_big",
        "unknown_field",
    ]


@pytest.mark.parametrize("data", [[], "config", None, 3])
def test_a_config_must_be_an_object(data: Any) -> None:
    with pytest.raises(ValidationFailed) as info:
        telemetry_config_validate(data)
    assert info.value.field == "root"
    assert info.value.issues[0].message == "Must be an object"


def test_merge_keeps_unpatched_fields_and_checks_the_patch() -> None:
    current = TelemetryConfigSchema(enabled=True, service_name="svc", prometheus_port=9000)
    merged = telemetry_config_merge(current, {"exportIntervalMs": 5000})
    assert merged.to_wire() == {
        "enabled": True,
        "serviceName": "svc",
        "prometheusPort": 9000,
        "exportIntervalMs": 5000,
    }
    with pytest.raises(ValidationFailed):
        telemetry_config_merge(current, {"prometheusPort": 1023})
    with pytest.raises(ValidationFailed):
        telemetry_config_merge(current, ["not", "an", "object"])


# -- metric labels -------------------------------------------------------------


def test_labels_are_converted_to_strings_as_javascript_would() -> None:
    labels = metric_labels_validate(
        {
            "enabled": True,
            "off": False,
            "port": 9464,
            "ratio": 0.5,
            "whole": 2.0,
            "big": 1e21,
            "tiny": 1e-7,
            "small": 0.000001,
            "name": "svc",
            "neg": -3,
            "nan": float("nan"),
            "inf": float("inf"),
            "ninf": float("-inf"),
            "zero": -0.0,
        }
    )
    assert labels == {
        "enabled": "true",
        "off": "false",
        "port": "9464",
        "ratio": "0.5",
        "whole": "2",
        "big": "1e+21",
        "tiny": "1e-7",
        "small": "0.000001",
        "name": "svc",
        "neg": "-3",
        "nan": "NaN",
        "inf": "Infinity",
        "ninf": "-Infinity",
        "zero": "0",
    }


def test_an_empty_label_key_is_rejected() -> None:
    with pytest.raises(ValidationFailed) as info:
        metric_labels_validate({"": "x"})
    assert info.value.issues[0].message == "Label key cannot be empty"


@pytest.mark.parametrize("value", [None, [1], {"a": 1}, b"bytes", object()])
def test_other_label_value_types_are_rejected(value: Any) -> None:
    with pytest.raises(ValidationFailed) as info:
        metric_labels_validate({"model": value})
    assert info.value.issues[0].path == ["model"]
    assert info.value.issues[0].message == "Label value must be a string, number or boolean"


def test_label_keys_must_be_strings_and_labels_a_mapping() -> None:
    with pytest.raises(ValidationFailed) as info:
        metric_labels_validate({1: "x"})
    assert info.value.issues[0].message == "Label key must be a string"
    with pytest.raises(ValidationFailed):
        metric_labels_validate(["model", "x"])
