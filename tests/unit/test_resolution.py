"""From spec to trainer input: the operator's defaults and the checks the CRD schema cannot make."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import make_spec
from finetune_operator.resolution import InvalidSpec, resolve_trainer_config
from finetune_operator.settings import Settings

SETTINGS = Settings(
    model_weights={"meta/llama-2-7b": "hf://meta-llama/Llama-2-7b-hf"},
    default_destination="s3://finetunes/",
)


def test_defaults_come_from_settings() -> None:
    config = resolve_trainer_config("demo", "research", "run-uid", make_spec(), SETTINGS)
    assert config.weights == "hf://meta-llama/Llama-2-7b-hf"
    assert config.destination == "s3://finetunes/research/demo/run-uid/"
    assert config.run_uid == "run-uid"
    assert (config.model_name, config.nodes, config.gpus_per_node, config.world_size) == (
        "meta/llama-2-7b",
        1,
        8,
        8,
    )
    assert config.job == "research/demo"
    assert config.input == make_spec().input


def test_spec_values_win_over_settings() -> None:
    spec = make_spec(model={"weights": "pvc://models/llama"}, destination="gs://out/run", resources={"nodes": 2})
    config = resolve_trainer_config("demo", "research", "run-uid", spec, SETTINGS)
    assert (config.weights, config.destination, config.world_size) == (
        "pvc://models/llama",
        "gs://out/run",
        16,
    )


@pytest.mark.parametrize(
    ("fields", "settings", "field", "message"),
    [
        (
            {"input": {"train_data": "https://169.254.169.254/latest/meta-data"}},
            SETTINGS,
            "spec.input.train_data",
            "link-local",
        ),
        (
            {
                "input": {
                    "train_data": "s3://d/t.jsonl",
                    "validation_data": "https://metadata.google.internal/v1",
                }
            },
            SETTINGS,
            "spec.input.validation_data",
            "metadata",
        ),
        (
            {"input": {"train_data": "https://127.0.0.1/t.jsonl"}},
            SETTINGS,
            "spec.input.train_data",
            "link-local",
        ),
        ({"model": {"weights": "https://[fe80::1]/w"}}, SETTINGS, "spec.model.weights", "link-local"),
        (
            {"input": {"train_data": "pvc://claim-only"}},
            SETTINGS,
            "spec.input.train_data",
            "pvc://claim/path",
        ),
        (
            {"model": {"name": "mistral/7b"}},
            SETTINGS,
            "spec.model.weights",
            "no default weights for model 'mistral/7b'",
        ),
        ({}, Settings(default_destination=None), "spec.destination", "no default destination"),
        (
            {},
            Settings(default_destination="https://bucket.example/"),
            "spec.destination",
            "operator's default",
        ),
        (
            {},
            Settings(model_weights={"meta/llama-2-7b": "ftp://weights"}, default_destination="s3://o"),
            "spec.model.weights",
            "operator's default for meta/llama-2-7b",
        ),
    ],
)
def test_invalid_specs_name_the_field(fields: dict[str, Any], settings: Settings, field: str, message: str) -> None:
    with pytest.raises(InvalidSpec) as raised:
        resolve_trainer_config("demo", "research", "run-uid", make_spec(**fields), settings)
    assert raised.value.field == field
    assert message in raised.value.message
    assert str(raised.value).startswith(f"{field}: ")


@pytest.mark.parametrize(("env", "expected"), [(None, "auto"), ("all", "all"), ("off", "off"), ("2", 2)])
def test_the_activation_checkpointing_setting_reaches_the_trainer_input(
    env: str | None, expected: str | int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env is not None:
        monkeypatch.setenv("FINETUNE_ACTIVATION_CHECKPOINTING", env)
    settings = Settings(model_weights=SETTINGS.model_weights, default_destination="s3://finetunes/")
    config = resolve_trainer_config("demo", "research", "run-uid", make_spec(), settings)
    assert config.activation_checkpointing == expected
    assert type(config).model_validate_json(config.model_dump_json()).activation_checkpointing == expected


def test_an_activation_checkpointing_setting_that_is_no_plan_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_ACTIVATION_CHECKPOINTING", "sometimes")
    with pytest.raises(ValueError, match="activation_checkpointing"):
        Settings()
