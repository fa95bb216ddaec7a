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

from finetune_contract.protocol import EXIT_USER_ERROR, ErrorEvent, ResolvedRun, ValidatedEvent, encode, parse_line
from finetune_contract.trainer_config import TRAINER_CONFIG_PATH
from finetune_trainer.config import load_config
from finetune_trainer.data import load_split
from finetune_trainer.errors import TRAINER_FAILED, USER_ERROR_REASONS, UserError
from finetune_trainer.events import log, read_termination_message, report_error, write_termination_message

WORKDIR_ENV = "FINETUNE_WORKDIR"
DEFAULT_WORKDIR = "/tmp/finetune-trainer"
DEFAULT_MASTER_PORT = "29500"


def validate(input_path: str) -> int:
    from finetune_trainer.model import TOKENIZER_FILES, load_tokenizer
    from finetune_trainer.storage import download_tokenizer
    from finetune_trainer.summary import summarize

    config = load_config(input_path)
    split = load_split(config.input)
    tokenizer = load_tokenizer(download_tokenizer(config.weights, TOKENIZER_FILES))
    summary = summarize(split, tokenizer, config.input, config.world_size)
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
    config = load_config(input_path)
    load_split(config.input)  # bad data fails here, before any training process starts
    nnodes = int(os.environ.get("NNODES") or config.nodes)
    nproc = int(os.environ.get("NPROC_PER_NODE") or config.processes_per_node)
    if nnodes * nproc == 1:
        return worker(input_path, workdir)
    if nnodes > 1 and "MASTER_ADDR" not in os.environ:
        raise UserError("InvalidInput", f"nodes={nnodes} needs MASTER_ADDR (the first pod's address) in the env")
    log(f"starting {nproc} training processes on this node ({nnodes} nodes)")
    process = subprocess.Popen(torchrun_command(input_path, workdir, nnodes, nproc))

    def forward(signum: int, frame: FrameType | None) -> None:
        process.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    code = process.wait()
    if code == 0:
        return 0
    event = parse_line(read_termination_message())
    if isinstance(event, ErrorEvent):
        return EXIT_USER_ERROR if event.reason in USER_ERROR_REASONS else 1
    report_error(ErrorEvent(reason=TRAINER_FAILED, message=f"training processes exited with code {code}"))
    return code if code > 0 else 128 - code


def _guarded(action: Callable[[], int]) -> int:
    try:
        return action()
    except UserError as error:
        report_error(ErrorEvent(reason=error.reason, message=error.message))
        return EXIT_USER_ERROR
    except Exception as error:
        traceback.print_exc()
        report_error(ErrorEvent(reason=TRAINER_FAILED, message=f"{type(error).__name__}: {error}"))
        return 1


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
    return _guarded(lambda: worker(args.input, args.workdir))


if __name__ == "__main__":
    sys.exit(main())
