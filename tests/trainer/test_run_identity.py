"""Each run has its own identity: checkpoints of other inputs or another run are never resumed, and a destination
that holds another run's output is refused before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_contract.trainer_config import TrainerConfig
from finetune_trainer.checkpoints import COMPLETE_MARKER, latest_checkpoint, run_fingerprint
from finetune_trainer.errors import DESTINATION_IN_USE, UserError
from finetune_trainer.train import MANIFEST_FILE, probe_destination

pytestmark = pytest.mark.trainer


def config(run_uid: str = "run-a", **inputs: object) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "input": {"train_data": "s3://data/train.jsonl", **inputs},
            "model_name": "meta/llama-2-7b",
            "weights": "s3://weights/llama",
            "destination": "s3://out/run/",
            "run_uid": run_uid,
        }
    )


def checkpoint(destination: Path, step: int, fingerprint: str | None) -> None:
    directory = destination / "checkpoints" / f"step-{step}"
    directory.mkdir(parents=True)
    (directory / "adapter_model.safetensors").write_bytes(b"weights")
    if fingerprint is not None:
        (directory / COMPLETE_MARKER).write_text(json.dumps({"step": step, "fingerprint": fingerprint}))


def test_the_fingerprint_changes_with_the_run_the_inputs_and_the_data() -> None:
    base = run_fingerprint(config(), ["data-a"])
    assert run_fingerprint(config(), ["data-a"]) == base
    assert run_fingerprint(config(run_uid="run-b"), ["data-a"]) != base
    assert run_fingerprint(config(learning_rate=2e-4), ["data-a"]) != base
    assert run_fingerprint(config(), ["data-b"]) != base


def test_only_the_newest_complete_checkpoint_of_this_run_is_resumed(tmp_path: Path) -> None:
    mine = run_fingerprint(config(), ["data-a"])
    other = run_fingerprint(config(run_uid="run-b"), ["data-a"])
    checkpoint(tmp_path, 10, mine)
    checkpoint(tmp_path, 20, mine)
    checkpoint(tmp_path, 30, None)  # killed mid-upload: no marker
    checkpoint(tmp_path, 40, other)  # a namesake's, or other inputs'
    assert latest_checkpoint(str(tmp_path), mine) == (20, str(tmp_path / "checkpoints" / "step-20"))
    assert latest_checkpoint(str(tmp_path), run_fingerprint(config(), ["data-c"])) is None


def test_a_destination_with_another_runs_output_is_refused_before_training(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"run": "run-a", "files": []}))
    probe_destination(str(tmp_path), "run-a")  # its own output: a retry may publish again
    with pytest.raises(UserError, match="holds the output of another run") as refused:
        probe_destination(str(tmp_path), "run-b")
    assert refused.value.reason == DESTINATION_IN_USE
