"""`finetune-trainer validate|train|worker`.

- `validate --input FILE`: CPU only, before any GPU is claimed. Checks the inputs and every data row; prints a
  JSON summary (rows, split, tokens, batch plan, steps).
- `train --input FILE`: the container's command. Checks the inputs and data the same way, then starts one worker
  per GPU with torchrun (static rendezvous across nodes) and maps a worker's user error to exit code 65.
- `worker --input FILE`: one training process; what torchrun runs.

Exit codes: 0 success, 65 (EX_DATAERR) user error (never retried), anything else retriable.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from finetune_contract.protocol import EXIT_USER_ERROR, ErrorEvent, ResolvedRun, ValidatedEvent, encode
from finetune_contract.trainer_config import TRAINER_CONFIG_PATH
from finetune_trainer.config import load_config
from finetune_trainer.errors import TRAINER_FAILED, USER_ERROR_REASONS, WEIGHTS_NOT_FOUND, UserError
from finetune_trainer.events import (
    claim_first_error,
    first_error,
    forget_first_error,
    log,
    rank,
    report_error,
    write_termination_message,
)

WORKDIR_ENV = "FINETUNE_WORKDIR"
DEFAULT_WORKDIR = "/tmp/finetune-trainer"
DEFAULT_MASTER_PORT = "29500"


def validate(input_path: str) -> int:
    import tempfile

    from finetune_trainer.data import stage_split
    from finetune_trainer.model import CONFIG_FILE, TOKENIZER_FILES, check_chunk_size, load_tokenizer, read_model_config
    from finetune_trainer.storage import download_files
    from finetune_trainer.summary import summarize

    config = load_config(input_path)
    try:
        model_files = download_files(config.weights, (CONFIG_FILE, *TOKENIZER_FILES))
    except FileNotFoundError as error:
        raise UserError(WEIGHTS_NOT_FOUND, f"base weights not found at {config.weights}") from error
    check_chunk_size(config.input, read_model_config(model_files))
    with tempfile.TemporaryDirectory(prefix="validate-") as scratch:
        split = stage_split(config.input, Path(scratch))
        summary = summarize(split, load_tokenizer(model_files), config.input, config.world_size)
    print(json.dumps(summary, indent=2), flush=True)
    # The operator reads the data's size from the validation pod's termination message into status.resolved.
    plan = summary["batch_plan"]
    validated = ValidatedEvent(
        resolved=ResolvedRun(
            world_size=plan["world_size"],
            per_device_batch_size=plan["per_device_batch_size"],
            gradient_accumulation_steps=plan["gradient_accumulation_steps"],
            effective_batch_size=plan["effective_batch_size"],
            train_rows=summary["train_rows"],
            validation_rows=summary["validation_rows"],
            train_tokens=summary["train_tokens"]["total"],
            steps_per_epoch=summary["steps_per_epoch"],
        )
    )
    write_termination_message(encode(validated))
    return 0


def worker(input_path: str, workdir: str) -> int:
    from finetune_trainer.train import run

    run(load_config(input_path), Path(workdir))
    return 0


def torchrun_command(input_path: str, workdir: str, nnodes: int, nproc_per_node: int) -> list[str]:
    """torchrun for this node: standalone on one node, static rendezvous at MASTER_ADDR:MASTER_PORT across nodes."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
    ]
    if nnodes == 1:
        command.append("--standalone")
    else:
        node_rank = os.environ.get("NODE_RANK") or os.environ.get("JOB_COMPLETION_INDEX") or "0"
        command += [
            f"--node-rank={node_rank}",
            f"--master-addr={os.environ['MASTER_ADDR']}",
            f"--master-port={os.environ.get('MASTER_PORT', DEFAULT_MASTER_PORT)}",
        ]
    return [*command, "-m", "finetune_trainer", "worker", "--input", input_path, "--workdir", workdir]


def launch(input_path: str, workdir: str) -> int:
    """Check the inputs, stage the data and probe the destination on this node, then start its training
    processes. Bad data and an unwritable destination fail here, before any model is loaded."""
    from finetune_trainer.data import write_staged
    from finetune_trainer.train import probe_destination

    config = load_config(input_path)
    scratch = Path(workdir)
    write_staged(config.input, scratch / "data")
    probe_destination(config.destination, config.run_uid)
    nnodes = int(os.environ.get("NNODES") or config.nodes)
    nproc = int(os.environ.get("NPROC_PER_NODE") or config.processes_per_node)
    if nnodes * nproc == 1:
        return worker(input_path, workdir)
    if nnodes > 1 and "MASTER_ADDR" not in os.environ:
        raise UserError("InvalidInput", f"nodes={nnodes} needs MASTER_ADDR (the first pod's address) in the env")
    forget_first_error(scratch)
    log(f"starting {nproc} training processes on this node ({nnodes} nodes)")
    process = subprocess.Popen(torchrun_command(input_path, workdir, nnodes, nproc))

    def forward(signum: int, frame: FrameType | None) -> None:
        process.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    code = process.wait()
    if code == 0:
        return 0
    error = first_error(scratch) or ErrorEvent(
        reason=TRAINER_FAILED, message=f"training processes exited with code {code}"
    )
    report_error(error)
    if error.reason in USER_ERROR_REASONS:
        return EXIT_USER_ERROR
    return code if code > 0 else 128 - code


def _error_event(error: Exception) -> ErrorEvent:
    if isinstance(error, UserError):
        return ErrorEvent(reason=error.reason, message=error.message)
    traceback.print_exc()
    return ErrorEvent(reason=TRAINER_FAILED, message=f"{type(error).__name__}: {error}")


def _exit_code(event: ErrorEvent) -> int:
    return EXIT_USER_ERROR if event.reason in USER_ERROR_REASONS else 1


def _guarded(action: Callable[[], int]) -> int:
    """Run a command; report its failure as the error event and the pod's termination message."""
    try:
        return action()
    except Exception as error:
        event = _error_event(error)
        report_error(event)
        return _exit_code(event)


def _guarded_worker(action: Callable[[], int], workdir: Path) -> int:
    """Run one of torchrun's training processes; the first of a node to fail records its error for the launcher,
    which reports it once the processes are gone."""
    try:
        return action()
    except Exception as error:
        event = _error_event(error)
        if claim_first_error(workdir, event):
            print(f"finetune-trainer: rank {rank()} failed first: {event.reason}: {event.message}", flush=True)
        return _exit_code(event)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="finetune-trainer", description=__doc__.splitlines()[0])
    commands = root.add_subparsers(dest="command", required=True)
    for name, text in (
        ("validate", "check the inputs and every data row (CPU only) and print a summary"),
        ("train", "check, then train on every GPU of this node (starts torchrun)"),
        ("worker", "one training process (started by torchrun)"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("--input", default=TRAINER_CONFIG_PATH, help="the inputs JSON (TrainerConfig)")
        if name != "validate":
            command.add_argument(
                "--workdir",
                default=os.environ.get(WORKDIR_ENV, DEFAULT_WORKDIR),
                help="scratch space: downloaded weights, local checkpoints, the output before upload",
            )
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' threads and DataLoader forks do not mix
    if args.command == "validate":
        return _guarded(lambda: validate(args.input))
    if args.command == "train":
        return _guarded(lambda: launch(args.input, args.workdir))
    if "LOCAL_WORLD_SIZE" in os.environ:  # under torchrun
        return _guarded_worker(lambda: worker(args.input, args.workdir), Path(args.workdir))
    return _guarded(lambda: worker(args.input, args.workdir))


if __name__ == "__main__":
    sys.exit(main())
