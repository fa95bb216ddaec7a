"""Shared fixtures: a tiny Llama with a tokenizer trained on the test data, data files, trainer configs, the one
way to train in this process, and an S3-compatible server."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from s3server import S3ServerFailed, s3_server

from finetune_contract.protocol import Event, parse_line

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
FRUITS = ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum")
REPO_ROOT = Path(__file__).resolve().parents[2]


def learnable_rows(count: int = 48) -> list[dict[str, str]]:
    """Prompt/completion rows with a fixed name -> fruit mapping: easy for even a tiny model to learn."""
    return [
        {"prompt": f"what does {NAMES[i % 8]} eat? answer:", "completion": f" {NAMES[i % 8]} eats {FRUITS[i % 8]}"}
        for i in range(count)
    ]


def text_rows(count: int = 24) -> list[dict[str, str]]:
    return [
        {"text": " ".join(f"{NAMES[(i + j) % 8]} eats {FRUITS[(i * j) % 8]}." for j in range(1 + i % 5))}
        for i in range(count)
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def trainer_config(
    weights: Path | str, train_data: Path | str, destination: Path | str, **inputs: Any
) -> dict[str, Any]:
    """A TrainerConfig for the tiny model: small batches, few epochs, a high learning rate."""
    return {
        "model_name": "tiny-llama",
        "weights": str(weights),
        "destination": str(destination),
        "nodes": 1,
        "gpus_per_node": 1,
        "job": "test/tiny",
        "input": {
            "train_data": str(train_data),
            "num_train_epochs": 2,
            "train_batch_size": 4,
            "micro_batch_size": 4,
            "num_validation_samples": 4,
            "learning_rate": 5e-3,
            "chunk_size": 64,
            "lora_rank": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            **inputs,
        },
    }


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def events_in(output: str) -> list[Event]:
    """The protocol events among stdout lines; fails on a line that looks like an event but does not parse."""
    events = []
    for line in output.splitlines():
        if line.startswith('{"ftj"'):
            event = parse_line(line)
            assert event is not None, f"trainer line does not parse with the operator's protocol: {line}"
            events.append(event)
    return events


def run_cli(args: list[str]) -> tuple[int, str]:
    """finetune-trainer in this process (no torch start-up cost); returns the exit code and stdout."""
    from finetune_trainer.cli import main

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = main(args)
    return code, buffer.getvalue()


def trainer_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "FINETUNE_TERMINATION_LOG": str(tmp_path / "termination-log"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
    return env


def start_trainer(config_path: Path, tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """`finetune-trainer train` as the container runs it, as a separate process."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "finetune_trainer",
            "train",
            "--input",
            str(config_path),
            "--workdir",
            str(tmp_path / "work"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune_trainer.tiny_model import save_tiny_llama

    corpus = [row["prompt"] + row["completion"] for row in learnable_rows()] + [row["text"] for row in text_rows()]
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), corpus * 4, hidden_size=64, layers=2, vocab_size=400)


@pytest.fixture(autouse=True)
def _isolated_termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@dataclass
class TrainerRun:
    """A training run in this process: what `finetune_trainer.train.run` returned, its events, its termination."""

    result: Any
    events: list[Event]
    termination: str
    destination: Path

    def of(self, kind: type[Event]) -> list[Any]:
        """The events of one kind, in order."""
        return [event for event in self.events if isinstance(event, kind)]


def train_in_process(config: dict[str, Any], workdir: Path) -> TrainerRun:
    """`finetune-trainer worker` in this process (no interpreter or torch start-up): the one way tests train."""
    from finetune_contract.trainer_config import TrainerConfig
    from finetune_trainer.train import run

    termination_log = workdir / "termination-log"
    workdir.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_TERMINATION_LOG", str(termination_log))
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            result = run(TrainerConfig.model_validate(config), workdir / "work")
    return TrainerRun(result, events_in(buffer.getvalue()), termination_log.read_text(), Path(config["destination"]))


def build_tiny_trainer(
    tiny_model_dir: Path,
    tmp_path: Path,
    rows: list[dict[str, str]],
    attention: str = "sdpa",
    checkpointing: Any = None,
    **inputs: Any,
) -> Any:
    """The SFTTrainer the worker builds for these rows and inputs (and activation checkpointing plan), on the tiny
    Llama, without training."""
    from datasets import Dataset

    from finetune_contract.trainer_config import TrainerConfig
    from finetune_trainer.model import load_base_model, load_tokenizer
    from finetune_trainer.train import build_trainer

    config = TrainerConfig.model_validate(trainer_config(tiny_model_dir, "unused.jsonl", tmp_path / "out", **inputs))
    model = load_base_model(tiny_model_dir, config.input, 0, attention)
    return build_trainer(
        config.input,
        Dataset.from_list(rows),
        None,
        model,
        load_tokenizer(tiny_model_dir),
        output_dir=tmp_path,
        callbacks=[],
        checkpointing=checkpointing,
    )


def adapter_weights(directory: Path) -> dict[str, Any]:
    """The tensors of the adapter saved in `directory`."""
    from safetensors.torch import load_file

    return dict(load_file(directory / "adapter_model.safetensors"))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3-compatible server (moto) on loopback for the session; its URL."""
    try:
        with s3_server() as endpoint:
            yield endpoint
    except S3ServerFailed as error:
        pytest.fail(str(error))
