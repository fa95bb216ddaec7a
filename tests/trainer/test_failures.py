"""Failure classes: what can only fail again is a user error (exit 65, never retried) with a reason to search for;
the first process to fail is the one reported; every termination message fits Kubernetes' 4096 bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import events_in, learnable_rows, run_cli, trainer_config, write_config, write_jsonl
from finetune_contract.batching import plan_batches
from finetune_contract.inputs import TrainingInput
from finetune_contract.protocol import EXIT_USER_ERROR, ErrorEvent, StartEvent, parse_line
from finetune_trainer.errors import UserError

pytestmark = pytest.mark.trainer


@pytest.mark.parametrize("text", ["é", "日本語", "😀", 'quote " and \\ backslash', "\n"])
def test_an_error_termination_message_fits_4096_bytes_whatever_the_text(text: str, tmp_path: Path) -> None:
    from finetune_trainer.cli import _guarded

    long = text * 5000

    def fail() -> int:
        raise UserError("InvalidTrainingData", f"train_data line 1: {long}")

    assert _guarded(fail) == EXIT_USER_ERROR
    message = (tmp_path / "termination-log").read_bytes()
    assert len(message) <= 4096
    event = parse_line(message.decode())
    assert isinstance(event, ErrorEvent)
    assert event.reason == "InvalidTrainingData"
    assert event.message.startswith(f"train_data line 1: {text}")
    assert event.message.endswith(" ...")
    assert len(message) > 4000  # cut to fit, not emptied


def test_an_unwritable_destination_fails_before_the_model_loads(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", learnable_rows(12))
    (tmp_path / "a-file").write_text("not a directory")
    destination = tmp_path / "a-file" / "out"
    config = write_config(tmp_path / "in.json", trainer_config(tiny_model_dir, data, destination))
    code, out = run_cli(["train", "--input", str(config), "--workdir", str(tmp_path / "work")])
    assert code == EXIT_USER_ERROR
    event = events_in(out)[-1]
    assert isinstance(event, ErrorEvent)
    assert event.reason == "DestinationNotWritable"
    assert str(destination) in event.message
    assert not any(isinstance(event, StartEvent) for event in events_in(out))
    assert not (tmp_path / "work" / "weights").exists()


def test_missing_base_weights_are_a_user_error(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", learnable_rows(12))
    config = write_config(tmp_path / "in.json", trainer_config(tmp_path / "no-weights", data, tmp_path / "dest"))
    for command in (["validate"], ["train", "--workdir", str(tmp_path / "work")]):
        code, out = run_cli([*command, "--input", str(config)])
        assert code == EXIT_USER_ERROR, out
        event = events_in(out)[-1]
        assert isinstance(event, ErrorEvent)
        assert event.reason == "WeightsNotFound"


def test_chunk_size_beyond_the_models_context_is_refused_before_training(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", learnable_rows(12))
    config = write_config(tmp_path / "in.json", trainer_config(tiny_model_dir, data, tmp_path / "d", chunk_size=8192))
    code, out = run_cli(["validate", "--input", str(config)])
    assert code == EXIT_USER_ERROR
    [event] = events_in(out)
    assert isinstance(event, ErrorEvent)
    assert event.reason == "InvalidInput"
    assert event.message.startswith("chunk_size=8192 exceeds the base model's context length of 4096 tokens")


def test_out_of_memory_is_a_user_error_that_says_what_to_lower() -> None:
    import torch

    from finetune_trainer.train import out_of_memory_is_user_error

    inputs = TrainingInput(train_data="s3://data/train.jsonl", micro_batch_size=4, chunk_size=4096)
    with pytest.raises(UserError) as caught, out_of_memory_is_user_error(inputs, plan_batches(4, 4, 1)):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert caught.value.reason == "OutOfMemory"
    assert "4 sequences of up to 4096 tokens per device" in caught.value.message
    assert "lower micro_batch_size or chunk_size, or use peft_method: qlora" in caught.value.message


def test_the_first_process_of_a_node_to_fail_is_the_one_reported(tmp_path: Path) -> None:
    from finetune_trainer.events import claim_first_error, first_error, forget_first_error

    root_cause = ErrorEvent(reason="OutOfMemory", message="rank 5 ran out of memory")
    follow_on = ErrorEvent(reason="TrainerFailed", message="DistBackendError: NCCL communicator was aborted")
    assert claim_first_error(tmp_path, root_cause)
    assert not claim_first_error(tmp_path, follow_on)
    assert first_error(tmp_path) == root_cause
    forget_first_error(tmp_path)  # a restarted pod
    assert first_error(tmp_path) is None


def test_a_workers_first_error_becomes_the_launchers_report(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun a failing worker records its error; the launcher reports it with exit code 65."""
    data = write_jsonl(tmp_path / "train.jsonl", learnable_rows(12))
    config = write_config(tmp_path / "in.json", trainer_config(tiny_model_dir, data, tmp_path / "dest"))
    config_json = json.loads(config.read_text())
    config_json["gpus_per_node"] = 2
    config.write_text(json.dumps(config_json))
    workdir = tmp_path / "work"
    oom = ErrorEvent(reason="OutOfMemory", message="the GPU ran out of memory: lower micro_batch_size")

    class FailedTorchrun:
        def __init__(self, command: list[str]) -> None:
            from finetune_trainer.events import claim_first_error

            assert "worker" in command
            claim_first_error(workdir, oom)  # as rank 3 would, before the others fail after it

        def wait(self) -> int:
            return 1

        def send_signal(self, signum: int) -> None:
            raise AssertionError("no signal expected")

    monkeypatch.setattr("subprocess.Popen", FailedTorchrun)
    code, out = run_cli(["train", "--input", str(config), "--workdir", str(workdir)])
    assert code == EXIT_USER_ERROR
    assert events_in(out)[-1] == oom
    assert parse_line((tmp_path / "termination-log").read_text()) == oom
