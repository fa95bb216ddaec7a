"""Resuming: a restarted trainer takes the newest complete checkpoint at the destination, never one without its
COMPLETE marker, and goes on exactly where the run stopped: with the optimizer, scheduler and RNG states of the
checkpoint, it ends with the very adapter an uninterrupted run ends with. (Which checkpoint is taken, marker and
fingerprint, is test_run_identity.py's.)"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import TrainerRun, adapter_weights, learnable_rows, train_in_process, trainer_config, write_jsonl
from finetune_contract.protocol import ProgressEvent, StartEvent

pytestmark = pytest.mark.trainer

EPOCHS = 2


def _config(tiny_model_dir: Path, data: Path, destination: Path) -> dict[str, Any]:
    # Dropout draws from the RNG and AdamW keeps moments: both must be restored for the runs to agree.
    return trainer_config(
        tiny_model_dir, data, destination, num_train_epochs=EPOCHS, num_validation_samples=0, lora_dropout=0.1
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("resume-data") / "train.jsonl", learnable_rows(16))


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainerRun:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return train_in_process(_config(tiny_model_dir, data, tmp / "destination"), tmp)


def _restarted(
    tiny_model_dir: Path, data: Path, uninterrupted: TrainerRun, tmp_path: Path, without: tuple[str, ...] = ()
) -> TrainerRun:
    """A restart after epoch 1: the destination has epoch 1's checkpoint (less the files `without`), and the last
    one, whose upload was cut off before its COMPLETE marker."""
    total = uninterrupted.of(StartEvent)[0].total_steps
    first, last = f"step-{total // EPOCHS}", f"step-{total}"
    source, checkpoints = uninterrupted.destination / "checkpoints", tmp_path / "destination" / "checkpoints"
    assert sorted(path.name for path in source.iterdir()) == sorted((first, last))
    shutil.copytree(source / first, checkpoints / first)
    for name in without:
        (checkpoints / first / name).unlink()
    shutil.copytree(source / last, checkpoints / last)
    (checkpoints / last / "COMPLETE").unlink()
    return train_in_process(_config(tiny_model_dir, data, tmp_path / "destination"), tmp_path)


def test_a_restarted_run_resumes_from_the_last_complete_checkpoint_and_ends_as_if_never_stopped(
    tiny_model_dir: Path, data: Path, uninterrupted: TrainerRun, tmp_path: Path
) -> None:
    import torch

    total = uninterrupted.of(StartEvent)[0].total_steps
    per_epoch = total // EPOCHS
    restarted = _restarted(tiny_model_dir, data, uninterrupted, tmp_path)
    # Epoch 2 again, from step per_epoch + 1: the incomplete last checkpoint was not taken.
    steps = [(e.step, e.learning_rate, e.loss) for e in restarted.of(ProgressEvent)]
    expected = [(e.step, e.learning_rate, e.loss) for e in uninterrupted.of(ProgressEvent)][per_epoch:]
    assert [step for step, _, _ in steps] == list(range(per_epoch + 1, total + 1))
    # The scheduler goes on (the same learning rate at each step), and so do the model, optimizer and RNG
    # (the same loss, and in the end the same adapter).
    assert [step for step, _, _ in steps] == [step for step, _, _ in expected]
    assert [rate for _, rate, _ in steps] == pytest.approx([rate for _, rate, _ in expected])
    assert [loss for _, _, loss in steps] == pytest.approx([loss for _, _, loss in expected], rel=1e-5)
    resumed, straight = adapter_weights(restarted.destination), adapter_weights(uninterrupted.destination)
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "without",
    [("optimizer.pt", "scheduler.pt"), ("rng_state.pth",)],
    ids=["without-optimizer-and-scheduler", "without-rng-state"],
)
def test_the_resumed_run_depends_on_each_saved_state(
    without: tuple[str, ...], tiny_model_dir: Path, data: Path, uninterrupted: TrainerRun, tmp_path: Path
) -> None:
    """The check above can fail: a checkpoint missing a state ends elsewhere."""
    import torch

    restarted = _restarted(tiny_model_dir, data, uninterrupted, tmp_path, without)
    resumed, straight = adapter_weights(restarted.destination), adapter_weights(uninterrupted.destination)
    assert any(not torch.allclose(resumed[name], tensor, rtol=1e-5, atol=1e-6) for name, tensor in straight.items())
