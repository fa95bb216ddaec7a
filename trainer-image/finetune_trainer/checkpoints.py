"""Checkpoints at the destination (`<destination>/checkpoints/step-<n>`), and resuming from the newest of this run.

The Trainer saves a full checkpoint (adapter, optimizer, scheduler, RNG states, trainer state) locally at each
epoch's end and every `checkpoint_every_minutes` in between; rank 0 copies it to the destination and writes a
COMPLETE marker last, so a pod killed mid-upload never resumes from half a checkpoint. The marker carries the
run's fingerprint (its inputs, the digests of its data, its base weights and the FineTuneJob's UID): a restarted
pod resumes only from a checkpoint of the very same run, never from one another run (or another input) left.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune_contract.protocol import CheckpointEvent
from finetune_contract.trainer_config import TrainerConfig
from finetune_trainer import storage
from finetune_trainer.events import emit, log, rank

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def run_fingerprint(config: TrainerConfig, data_digests: list[str]) -> str:
    """What a checkpoint was trained from: a checkpoint with another fingerprint is never resumed."""
    identity = {
        "input": config.input.model_dump(mode="json"),
        "model": config.model_name,
        "weights": config.weights,
        "run": config.run_uid,
        "data": data_digests,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def checkpoints_uri(destination: str) -> str:
    return storage.join(destination, "checkpoints")


def latest_checkpoint(destination: str, fingerprint: str) -> tuple[int, str] | None:
    """(step, URI) of the newest complete checkpoint of this run at the destination, if any."""
    root = checkpoints_uri(destination)
    steps = sorted(
        (int(match.group(1)) for name in storage.list_names(root) if (match := _STEP_DIR.match(name))),
        reverse=True,
    )
    for step in steps:
        uri = storage.join(root, f"step-{step}")
        marker = storage.join(uri, COMPLETE_MARKER)
        if not storage.exists(marker):
            continue  # an upload that did not finish
        try:
            made_by = json.loads(storage.read_bytes(marker)).get("fingerprint")
        except ValueError:
            made_by = None
        if made_by == fingerprint:
            return step, uri
        log(f"not resuming from {uri}: it was trained from other inputs, data or another run")
    return None


def fetch_checkpoint(uri: str, workdir: Path) -> Path:
    """A local copy of a checkpoint (each node downloads its own; see `main_process_first` in train)."""
    return storage.download_once(uri, workdir / "resume" / uri.rstrip("/").rsplit("/", 1)[-1])


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointCallback(TrainerCallback):
    """Saves every `every_minutes` besides each epoch's end; after each save rank 0 uploads the checkpoint."""

    def __init__(self, destination: str, fingerprint: str, every_minutes: float | None) -> None:
        self.destination = destination
        self.fingerprint = fingerprint
        self.every_seconds = None if every_minutes is None else every_minutes * 60
        self._last_save = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Every rank decides alike (the Trainer saves collectively): rank 0's clock decides for all.
        if self.every_seconds is not None and self._due():
            control.should_save = True

    def _due(self) -> bool:
        import torch
        import torch.distributed as dist

        due = time.monotonic() - self._last_save >= (self.every_seconds or 0)
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([1 if due else 0], dtype=torch.int32)
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _barrier()  # every rank has written its part (RNG state) of the checkpoint
        self._last_save = time.monotonic()
        if rank() == 0:
            step = state.global_step
            source = Path(args.output_dir) / f"checkpoint-{step}"
            uri = storage.join(checkpoints_uri(self.destination), f"step-{step}")
            storage.upload_dir(source, uri)
            marker = {"step": step, "epoch": state.epoch, "fingerprint": self.fingerprint}
            storage.write_bytes(storage.join(uri, COMPLETE_MARKER), json.dumps(marker).encode())
            log(f"checkpoint at step {step} (epoch {state.epoch:.2f}) written to {uri}")
            emit(CheckpointEvent(epoch=round(state.epoch or 0, 4), uri=uri))
        _barrier()
