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


def report_error(error: ErrorEvent) -> None:
    """The error event on stdout and as the pod's termination message (cut to fit 4096 bytes)."""
    message = protocol.error_termination_message(error)
    sys.stdout.write(message + "\n")
    sys.stdout.flush()
    write_termination_message(message)


# In the workdir, which a node's processes share: the first training process of the node to fail claims it, so the
# root cause is reported rather than the other ranks' follow-on errors (a collective that lost a peer).
FIRST_ERROR_FILE = "first-error.json"


def claim_first_error(workdir: Path, error: ErrorEvent) -> bool:
    """Record `error` as this node's first failure unless another process got there first."""
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with (workdir / FIRST_ERROR_FILE).open("x", encoding="utf-8") as handle:
            handle.write(protocol.encode(error))
    except FileExistsError:
        return False
    return True


def first_error(workdir: Path) -> ErrorEvent | None:
    try:
        event = protocol.parse_line((workdir / FIRST_ERROR_FILE).read_text(encoding="utf-8"))
    except OSError:
        return None
    return event if isinstance(event, ErrorEvent) else None


def forget_first_error(workdir: Path) -> None:
    """A restarted pod starts with no recorded failure (the workdir outlives the container)."""
    (workdir / FIRST_ERROR_FILE).unlink(missing_ok=True)
