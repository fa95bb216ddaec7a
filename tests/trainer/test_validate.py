"""`finetune-trainer validate`: every row checked with its line number; bad data never reaches training.

The row rules themselves are the contract's (tests/unit/test_training_data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import events_in, learnable_rows, run_cli, text_rows, trainer_config, write_config, write_jsonl
from finetune_contract.protocol import EXIT_USER_ERROR, ErrorEvent, StartEvent, ValidatedEvent, parse_line

pytestmark = pytest.mark.trainer

CHUNK = 16  # text_rows(40) run from 6 to 22 tokens: 16 of 40 rows are longer
GOOD = '{"prompt": "a", "completion": "b"}\n'


def test_validate_exits_with_the_user_error_code_and_reports_the_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(GOOD * 16 + '{"prompt": "a"}\n')
    config = write_config(tmp_path / "in.json", trainer_config(tiny_model_dir, data, tmp_path / "dest"))
    code, out = run_cli(["validate", "--input", str(config)])
    assert code == EXIT_USER_ERROR
    [event] = events_in(out)
    assert event == ErrorEvent(reason="InvalidTrainingData", message='train_data line 17: missing "completion"')
    assert parse_line((tmp_path / "termination-log").read_text()) == event


def test_train_on_bad_data_never_starts_training(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(GOOD * 30 + "not json\n")
    config = write_config(tmp_path / "in.json", trainer_config(tiny_model_dir, data, tmp_path / "dest"))
    code, out = run_cli(["train", "--input", str(config), "--workdir", str(tmp_path / "work")])
    assert code == EXIT_USER_ERROR
    events = events_in(out)
    assert not any(isinstance(event, StartEvent) for event in events)
    assert isinstance(events[-1], ErrorEvent)
    assert "train_data line 31: not valid JSON" in events[-1].message
    assert not (tmp_path / "dest").exists()
    # Nothing was loaded, and the half-staged data is not taken for a checked copy by a later start.
    assert not (tmp_path / "work" / "weights").exists()
    assert not (tmp_path / "work" / "trainer").exists()
    assert not (tmp_path / "work" / "data" / "split.json").exists()


def test_bad_inputs_are_user_errors_too(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", learnable_rows(10))
    for inputs, expected in (
        ({"num_validation_samples": 10}, "num_validation_samples=10 leaves no training rows"),
        ({"micro_batch_size": 8}, "micro_batch_size must not exceed train_batch_size"),
    ):
        config = write_config(tmp_path / "in.json", trainer_config(tiny_model_dir, data, tmp_path / "d", **inputs))
        code, out = run_cli(["validate", "--input", str(config)])
        assert code == EXIT_USER_ERROR
        [event] = events_in(out)
        assert isinstance(event, ErrorEvent)
        assert event.reason == "InvalidInput"
        assert expected in event.message
    missing = write_config(tmp_path / "in.json", trainer_config(tiny_model_dir, tmp_path / "nope.jsonl", tmp_path))
    code, out = run_cli(["validate", "--input", str(missing)])
    assert code == EXIT_USER_ERROR
    assert "train_data: cannot read" in out


def test_validate_summarizes_good_data(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", text_rows(40))
    config = trainer_config(tiny_model_dir, data, tmp_path / "dest", num_validation_samples=8, chunk_size=CHUNK)
    config["gpus_per_node"] = 8  # the defaults 4/4 on 8 GPUs: 1 per GPU, global batch 8
    code, out = run_cli(["validate", "--input", str(write_config(tmp_path / "in.json", config))])
    assert code == 0, out
    summary = json.loads(out)
    assert summary["format"] == "text"
    assert (summary["rows"], summary["train_rows"], summary["validation_rows"]) == (40, 32, 8)
    assert summary["batch_plan"] == {
        "world_size": 8,
        "per_device_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "effective_batch_size": 8,
        "train_batch_size": 4,
    }
    assert summary["steps_per_epoch"] == 4
    assert summary["total_steps"] == 8
    validated = parse_line((tmp_path / "termination-log").read_text())
    assert isinstance(validated, ValidatedEvent)
    assert (validated.resolved.train_rows, validated.resolved.validation_rows) == (32, 8)
    assert validated.resolved.steps_per_epoch == 4
    assert validated.resolved.train_tokens == summary["train_tokens"]["total"]
    tokens = summary["train_tokens"]
    assert tokens["min"] < CHUNK < tokens["max"], tokens
    assert 0 < tokens["share_over_chunk_size"] < 1
    longer = summary["over_chunk_size"]
    assert longer["rows"] == round(tokens["share_over_chunk_size"] * 32)
    assert longer["handling"] == "truncated"
    assert longer["tokens_truncated"] > 0


def test_validate_counts_the_rows_packing_splits(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", text_rows(40))
    config = trainer_config(tiny_model_dir, data, tmp_path / "d", chunk_size=CHUNK, pack_sequences=True)
    code, out = run_cli(["validate", "--input", str(write_config(tmp_path / "in.json", config))])
    assert code == 0, out
    summary = json.loads(out)
    assert summary["over_chunk_size"]["rows"] > 0
    assert summary["over_chunk_size"]["handling"] == "split"
    assert summary["over_chunk_size"]["tokens_truncated"] == 0
    # Every token is packed: at least total / chunk_size sequences.
    assert summary["train_sequences"] >= summary["train_tokens"]["total"] / CHUNK


def test_validation_rows_come_from_the_head_of_validation_data(tmp_path: Path, tiny_model_dir: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", learnable_rows(20))
    validation = write_jsonl(tmp_path / "validation.jsonl", learnable_rows(10))
    config = trainer_config(tiny_model_dir, train, tmp_path / "d", num_validation_samples=3)
    config["input"]["validation_data"] = str(validation)
    code, out = run_cli(["validate", "--input", str(write_config(tmp_path / "in.json", config))])
    assert code == 0
    assert (json.loads(out)["train_rows"], json.loads(out)["validation_rows"]) == (20, 3)
    write_jsonl(validation, text_rows(5))
    code, out = run_cli(["validate", "--input", str(tmp_path / "in.json")])
    [event] = events_in(out)
    assert code == EXIT_USER_ERROR
    assert isinstance(event, ErrorEvent)
    assert event.message.startswith('validation_data has {"text"} rows but train_data has')


def test_pvc_uris_read_from_the_mounted_claim(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_contract import uris

    monkeypatch.setattr(uris, "PVC_MOUNT_ROOT", str(tmp_path / "mnt"))
    (tmp_path / "mnt" / "datasets" / "llama").mkdir(parents=True)
    write_jsonl(tmp_path / "mnt" / "datasets" / "llama" / "train.jsonl", learnable_rows(12))
    config = trainer_config(tiny_model_dir, "pvc://datasets/llama/train.jsonl", tmp_path / "d")
    code, out = run_cli(["validate", "--input", str(write_config(tmp_path / "in.json", config))])
    assert code == 0, out
    assert json.loads(out)["rows"] == 12


def test_the_launcher_runs_torchrun_with_static_rendezvous_across_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_trainer.cli import torchrun_command

    single = torchrun_command("/etc/finetune/input.json", "/workspace/run", nnodes=1, nproc_per_node=8)
    assert single[1:7] == ["-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=8", "--standalone", "-m"]
    monkeypatch.setenv("MASTER_ADDR", "llama-0.llama")
    monkeypatch.setenv("MASTER_PORT", "29400")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    multi = torchrun_command("/etc/finetune/input.json", "/workspace/run", nnodes=2, nproc_per_node=8)
    assert multi[3:8] == [
        "--nnodes=2",
        "--nproc-per-node=8",
        "--node-rank=1",
        "--master-addr=llama-0.llama",
        "--master-port=29400",
    ]
    assert multi[8:] == [
        "-m",
        "finetune_trainer",
        "worker",
        "--input",
        "/etc/finetune/input.json",
        "--workdir",
        "/workspace/run",
    ]
