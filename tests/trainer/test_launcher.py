"""The launcher (`finetune-trainer train`): torchrun's node count, processes and rank from the config and the env,
and a worker's user error coming back as exit code 65 through torchrun."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import (
    events_in,
    learnable_rows,
    run_cli,
    start_trainer,
    trainer_config,
    trainer_env,
    write_config,
    write_jsonl,
)
from finetune_contract.protocol import EXIT_USER_ERROR, ErrorEvent, parse_termination_message

pytestmark = pytest.mark.trainer

INPUT, WORKDIR = "/etc/finetune/input.json", "/workspace/run"


def _flags(command: list[str]) -> dict[str, str]:
    """torchrun's `--name=value` flags, before the module it runs."""
    flags = command[: command.index("finetune_trainer")]
    return dict(flag.removeprefix("--").split("=", 1) for flag in flags if flag.startswith("--") and "=" in flag)


@pytest.mark.parametrize(
    ("env", "node_rank"),
    [
        ({"NODE_RANK": "1", "JOB_COMPLETION_INDEX": "0"}, "1"),  # NODE_RANK first
        ({"JOB_COMPLETION_INDEX": "1"}, "1"),  # then the Indexed Job's completion index
        ({}, "0"),
    ],
    ids=["node-rank-wins", "job-completion-index", "neither"],
)
def test_node_rank_comes_from_node_rank_then_the_job_completion_index(
    env: dict[str, str], node_rank: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_trainer.cli import torchrun_command

    for name in ("NODE_RANK", "JOB_COMPLETION_INDEX", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "llama-train-0.llama-workers")
    flags = _flags(torchrun_command(INPUT, WORKDIR, nnodes=2, nproc_per_node=8))
    assert flags == {
        "nnodes": "2",
        "nproc-per-node": "8",
        "node-rank": node_rank,
        "master-addr": "llama-train-0.llama-workers",
        "master-port": "29500",  # the default when MASTER_PORT is unset
    }


@pytest.mark.parametrize(
    ("nodes", "env"),
    [(2, {}), (1, {"NNODES": "2"})],  # from the config, or NNODES overriding the config's one node
    ids=["config", "nnodes-env"],
)
def test_more_than_one_node_without_master_addr_is_a_user_error(
    nodes: int, env: dict[str, str], tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    data = write_jsonl(tmp_path / "train.jsonl", learnable_rows(12))
    config = trainer_config(tiny_model_dir, data, tmp_path / "dest")
    config["nodes"] = nodes
    code, out = run_cli(["train", "--input", str(write_config(tmp_path / "in.json", config))])
    assert code == EXIT_USER_ERROR
    [event] = events_in(out)
    assert isinstance(event, ErrorEvent)
    assert event.reason == "InvalidInput"
    assert event.message == "nodes=2 needs MASTER_ADDR (the first pod's address) in the env"
    assert parse_termination_message((tmp_path / "termination-log").read_text()) == event


def test_a_workers_user_error_under_torchrun_exits_65_with_its_reason(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two worker processes (NPROC_PER_NODE overrides the config's one GPU) fail on missing base weights: torchrun
    exits 1, and the launcher turns the workers' WeightsNotFound back into the user error it is."""
    data = write_jsonl(tmp_path / "train.jsonl", learnable_rows(12))
    missing = tmp_path / "no-such-weights"
    config = write_config(tmp_path / "in.json", trainer_config(missing, data, tmp_path / "dest"))
    process = start_trainer(config, tmp_path, trainer_env(tmp_path, NPROC_PER_NODE="2"))
    out, _ = process.communicate(timeout=300)
    assert process.returncode == EXIT_USER_ERROR, out[-4000:]
    assert "starting 2 training processes on this node (1 nodes)" in out
    expected = ErrorEvent(reason="WeightsNotFound", message=f"base weights not found at {missing}")
    assert parse_termination_message((tmp_path / "termination-log").read_text()) == expected
    assert expected in events_in(out)
