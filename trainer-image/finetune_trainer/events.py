"""The protocol's events on stdout (rank 0 only), the termination message, and which process this is."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from finetune_contract import protocol
from finetune_contract.protocol import ErrorEvent, Event

# Where the termination message goes; the env override is for running outside Kubernetes (and for tests).
TERMINATION_LOG_ENV = "FINETUNE_TERMINATION_LOG"
# Keeps an error event well inside the 4096-byte termination message.
ERROR_MESSAGE_LIMIT = 3000


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def emit(event: Event) -> None:
    """Print one event line, from global rank 0 only (the operator follows rank 0's log)."""
    if rank() == 0:
        sys.stdout.write(protocol.encode(event) + "\n")
        sys.stdout.flush()


def log(message: str) -> None:
    """An ordinary log line (rank 0 only), passed through by the operator as it is."""
    if rank() == 0:
        print(f"finetune-trainer: {message}", flush=True)


def write_termination_message(message: str) -> None:
    """The pod's termination message (at most 4096 bytes); silently skipped where the file cannot be written."""
    path = Path(os.environ.get(TERMINATION_LOG_ENV, protocol.TERMINATION_MESSAGE_PATH))
    with contextlib.suppress(OSError):
        path.write_text(message, encoding="utf-8")


def read_termination_message() -> str:
    path = Path(os.environ.get(TERMINATION_LOG_ENV, protocol.TERMINATION_MESSAGE_PATH))
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def report_error(error: ErrorEvent) -> None:
    """An error event on stdout and, from each pod's first process, as the pod's termination message."""
    if len(error.message) > ERROR_MESSAGE_LIMIT:
        error = error.model_copy(update={"message": error.message[:ERROR_MESSAGE_LIMIT] + " ..."})
    emit(error)
    if local_rank() == 0:
        write_termination_message(protocol.encode(error))
