"""Epoch checkpoints at the destination (`<destination>/checkpoints/epoch-<n>`), and resuming from the latest.

The Trainer saves a full checkpoint (adapter, optimizer, scheduler, RNG states, trainer state) locally at each
epoch's end; rank 0 copies it to the destination and writes a COMPLETE marker last, so a pod killed mid-upload
never resumes from half a checkpoint. A restarted pod downloads the newest complete one and resumes there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune_contract.protocol import CheckpointEvent
from finetune_trainer import storage
from finetune_trainer.events import emit, log, rank

COMPLETE_MARKER = "COMPLETE"
_EPOCH_DIR = re.compile(r"^epoch-(\d+)$")


def checkpoints_uri(destination: str) -> str:
    return storage.join(destination, "checkpoints")


def latest_checkpoint(destination: str) -> tuple[int, str] | None:
    """(epoch, URI) of the newest complete checkpoint at the destination, if any."""
    root = checkpoints_uri(destination)
    epochs = sorted(
        (int(match.group(1)) for name in storage.list_names(root) if (match := _EPOCH_DIR.match(name))),
        reverse=True,
    )
    for epoch in epochs:
        uri = storage.join(root, f"epoch-{epoch}")
        if storage.exists(storage.join(uri, COMPLETE_MARKER)):
            return epoch, uri
    return None


def fetch_checkpoint(uri: str, workdir: Path) -> Path:
    """A local copy of a checkpoint (each node downloads its own; see `main_process_first` in train)."""
    local = storage.local_path(uri)
    if local is not None:
        return local
    return storage.download_once(uri, workdir / "resume" / uri.rstrip("/").rsplit("/", 1)[-1])


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointCallback(TrainerCallback):
    """After each save: rank 0 uploads the checkpoint to the destination and emits a checkpoint event."""

    def __init__(self, destination: str) -> None:
        self.destination = destination

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _barrier()  # every rank has written its part (RNG state) of the checkpoint
        if rank() == 0:
            epoch = round(state.epoch or 0)
            source = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            uri = storage.join(checkpoints_uri(self.destination), f"epoch-{epoch}")
            storage.upload_dir(source, uri)
            storage.write_bytes(storage.join(uri, COMPLETE_MARKER), f"step {state.global_step}\n".encode())
            log(f"checkpoint for epoch {epoch} (step {state.global_step}) written to {uri}")
            emit(CheckpointEvent(epoch=epoch, uri=uri))
        _barrier()
