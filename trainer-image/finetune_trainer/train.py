"""One training process (one per GPU under torchrun): inputs -> SFTConfig + LoraConfig -> SFTTrainer -> adapter.

A thin composition in the manner of TRL's `trl/scripts/sft.py`; the callbacks turn the Trainer's state into the
protocol's events, and the output is the PEFT adapter, the tokenizer and a metrics file at the destination.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_contract import protocol
from finetune_contract.batching import BatchPlan, plan_batches
from finetune_contract.inputs import TrainingInput
from finetune_contract.protocol import OutputEvent, OutputFile
from finetune_contract.trainer_config import TrainerConfig
from finetune_trainer import storage
from finetune_trainer.checkpoints import CheckpointCallback, fetch_checkpoint, latest_checkpoint, run_fingerprint
from finetune_trainer.data import StagedSplit, read_staged, write_staged
from finetune_trainer.errors import (
    DESTINATION_IN_USE,
    DESTINATION_NOT_WRITABLE,
    OUT_OF_MEMORY,
    WEIGHTS_NOT_FOUND,
    UserError,
)
from finetune_trainer.events import emit, local_rank, log, rank, world_size, write_termination_message
from finetune_trainer.memory import (
    NO_CHECKPOINTING,
    CheckpointingPlan,
    ModelShape,
    device_memory_bytes,
    plan_checkpointing,
)
from finetune_trainer.model import (
    check_chunk_size,
    has_cuda,
    load_base_model,
    load_tokenizer,
    lora_config,
    read_model_config,
)
from finetune_trainer.summary import packing_strategy

METRICS_FILE = "metrics.json"
# Written last, after every other output file: its presence means the output is complete (see _publish).
MANIFEST_FILE = "manifest.json"
# For tests and debugging: each rank writes its trainable (adapter) weights there at the end, so a test can check
# that DDP kept every replica identical.
RANK_WEIGHTS_DIR_ENV = "FINETUNE_TRAINER_RANK_WEIGHTS_DIR"


@dataclass
class TrainingRun:
    trainer: Any
    output: OutputEvent | None  # rank 0 only


def sft_config(
    inputs: TrainingInput,
    plan: BatchPlan,
    output_dir: Path,
    validate: bool,
    checkpointing: CheckpointingPlan | None = None,
) -> Any:
    from trl.trainer.sft_config import SFTConfig

    cuda = has_cuda()
    strategy = packing_strategy(inputs)
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=inputs.num_train_epochs,
        per_device_train_batch_size=plan.per_device_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        per_device_eval_batch_size=inputs.validation_batch_size,
        learning_rate=inputs.learning_rate,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        seed=inputs.seed,
        data_seed=inputs.seed,
        # Sequences: truncated at chunk_size, or packed into chunk_size sequences. "bfd_split" packing is
        # padding-free with per-example position ids and boundaries, so no token attends across examples, and
        # splits a row longer than chunk_size rather than cutting it off; "wrapped" cuts across examples into
        # constant-length sequences (padded to chunk_size so every batch has the same shape).
        max_length=inputs.chunk_size,
        packing=strategy is not None,
        packing_strategy=strategy or "bfd",
        pad_to_multiple_of=inputs.chunk_size if strategy == "wrapped" else None,
        eval_packing=False,
        completion_only_loss=None,  # prompt/completion rows: loss on the completion only; text rows: every token
        eval_strategy="epoch" if validate else "no",
        save_strategy="epoch",
        save_total_limit=1,
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        bf16=cuda,
        use_cpu=not cuda,
        **(checkpointing or NO_CHECKPOINTING).sft_config(),
        ddp_backend=("nccl" if cuda else "gloo") if world_size() > 1 else None,
        ddp_find_unused_parameters=False,
        dataloader_drop_last=False,
        remove_unused_columns=True,
    )


def build_trainer(
    inputs: TrainingInput,
    train: Any,
    validation: Any | None,
    model: Any,
    tokenizer: Any,
    *,
    output_dir: Path,
    callbacks: list[Any],
    checkpointing: CheckpointingPlan | None = None,
) -> Any:
    """An SFTTrainer over `train` and `validation` (datasets.Dataset, rows as in the data files)."""
    from transformers import PrinterCallback
    from trl.trainer.sft_trainer import SFTTrainer

    plan = plan_batches(inputs.train_batch_size, inputs.micro_batch_size, world_size())
    validate = validation is not None and len(validation) > 0 and inputs.run_validation
    trainer = SFTTrainer(
        model=model,
        args=sft_config(inputs, plan, output_dir, validate, checkpointing),
        train_dataset=train,
        eval_dataset=validation if validate else None,
        processing_class=tokenizer,
        peft_config=lora_config(inputs),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # our events replace its dict-per-log lines
    return trainer


def fetch_weights(uri: str, workdir: Path) -> Path:
    try:
        return storage.download_once(uri, workdir / "weights")
    except FileNotFoundError as error:
        raise UserError(WEIGHTS_NOT_FOUND, f"base weights not found at {uri}") from error


def probe_destination(uri: str, run_uid: str = "") -> None:
    """Write and delete a small file at the destination, so a destination that cannot take the output fails now,
    before the model loads, rather than after the first epoch; and refuse one that holds another run's output."""
    manifest_uri = storage.join(uri, MANIFEST_FILE)
    if run_uid and storage.exists(manifest_uri):
        try:
            owner = json.loads(storage.read_bytes(manifest_uri)).get("run")
        except ValueError:
            owner = None
        if owner and owner != run_uid:
            raise UserError(
                DESTINATION_IN_USE,
                f"destination {uri} holds the output of another run ({owner}); choose another spec.destination",
            )
    probe = storage.join(uri, f".write-probe-{os.getpid()}")
    try:
        storage.write_bytes(probe, b"finetune-trainer write probe\n")
        storage.delete(probe)
    except (OSError, ValueError) as error:
        raise UserError(
            DESTINATION_NOT_WRITABLE, f"destination {uri} cannot be written: {type(error).__name__}: {error}"
        ) from error


@contextmanager
def out_of_memory_is_user_error(inputs: TrainingInput, plan: BatchPlan) -> Iterator[None]:
    """A device out of memory fails the same way on every retry: a user error that says which input to lower."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as error:
        raise UserError(
            OUT_OF_MEMORY,
            f"the GPU ran out of memory at {plan.per_device_batch_size} sequences of up to {inputs.chunk_size} "
            "tokens per device: lower micro_batch_size or chunk_size"
            + (", or use peft_method: qlora" if inputs.peft_method == "lora" else ""),
        ) from error


def stage_data(inputs: TrainingInput, workdir: Path) -> StagedSplit:
    """This node's copy of the checked data, made once (by the launcher, or the first local process)."""
    directory = workdir / "data"
    staged = read_staged(directory)
    return staged if staged is not None else write_staged(inputs, directory)


def datasets_of(staged: StagedSplit, cache: Path) -> tuple[Any, Any | None]:
    """The staged files as Arrow datasets cached under `cache`: the first process of a node tokenizes and packs
    (TRL prepares datasets local-main-first), the others load its cached results."""
    from datasets import Dataset

    train = Dataset.from_json(str(staged.train), cache_dir=str(cache))
    validation = (
        Dataset.from_json(str(staged.validation), cache_dir=str(cache)) if staged.validation is not None else None
    )
    return train, validation


def run(config: TrainerConfig, workdir: Path) -> TrainingRun:
    inputs = config.input
    plan = plan_batches(inputs.train_batch_size, inputs.micro_batch_size, world_size())
    with out_of_memory_is_user_error(inputs, plan):
        return _run(config, workdir, plan)


def _run(config: TrainerConfig, workdir: Path, plan: BatchPlan) -> TrainingRun:
    from transformers import set_seed

    inputs = config.input
    output_dir = workdir / "trainer"
    args_probe = sft_config(inputs, plan, output_dir, validate=False)  # sets up torch.distributed
    with args_probe.main_process_first(local=True, desc="staging the data and fetching the base weights"):
        staged = stage_data(inputs, workdir)  # every row checked before any model is loaded
        weights = fetch_weights(config.weights, workdir)
        train_data, validation_data = datasets_of(staged, workdir / "datasets")
    model_config = read_model_config(weights)
    check_chunk_size(inputs, model_config)
    checkpointing = plan_checkpointing(
        ModelShape.of(model_config),
        device_bytes=device_memory_bytes(f"cuda:{local_rank()}" if has_cuda() else "cpu"),
        micro_batch=plan.per_device_batch_size,
        chunk_size=inputs.chunk_size,
        quantized=inputs.peft_method == "qlora",
        lora_rank=inputs.lora_rank,
        choice=config.activation_checkpointing,
    )
    log(f"memory plan: {checkpointing.describe()}")
    tokenizer = load_tokenizer(weights)
    set_seed(inputs.seed)
    model = load_base_model(weights, inputs, local_rank())

    from finetune_trainer.callbacks import ProgressCallback, SampleCallback

    validate = staged.validation_rows > 0 and inputs.run_validation
    digests = [storage.sha256_of(path) for path in (staged.train, staged.validation) if path is not None]
    fingerprint = run_fingerprint(config, digests)
    callbacks: list[Any] = [CheckpointCallback(config.destination, fingerprint, config.checkpoint_every_minutes)]
    if inputs.validation_prompt:
        callbacks.append(SampleCallback(inputs.validation_prompt, with_validation=validate))
    trainer = build_trainer(
        inputs,
        train_data,
        validation_data,
        model,
        tokenizer,
        output_dir=output_dir,
        callbacks=callbacks,
        checkpointing=checkpointing,
    )
    trainer.add_callback(ProgressCallback(plan.world_size))

    resume: str | None = None
    latest = latest_checkpoint(config.destination, fingerprint)
    if latest is not None:
        step, uri = latest
        with args_probe.main_process_first(local=True, desc="fetching the checkpoint"):
            resume = str(fetch_checkpoint(uri, workdir))
        log(f"resuming from the step {step} checkpoint at {uri}")
    result = trainer.train(resume_from_checkpoint=resume)

    _write_rank_weights(trainer)
    output = _publish(trainer, config, workdir, result.training_loss) if rank() == 0 else None
    trainer.accelerator.wait_for_everyone()
    return TrainingRun(trainer=trainer, output=output)


def final_metrics(trainer: Any, training_loss: float) -> dict[str, float]:
    metrics: dict[str, float] = {"train_loss": float(training_loss)}
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    if losses:
        metrics["final_step_loss"] = float(losses[-1])
    evals = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    if evals:
        metrics["eval_loss"] = float(evals[-1])
    for entry in history:
        if "train_runtime" in entry:
            metrics["train_runtime_seconds"] = float(entry["train_runtime"])
        if "num_tokens" in entry:
            metrics["train_tokens"] = float(entry["num_tokens"])
    metrics["global_step"] = float(trainer.state.global_step)
    metrics["epochs"] = float(trainer.state.epoch or 0)
    return metrics


def _publish(trainer: Any, config: TrainerConfig, workdir: Path, training_loss: float) -> OutputEvent:
    """Adapter + tokenizer + metrics to the destination; the output event and the termination message."""
    output = workdir / "output"
    shutil.rmtree(output, ignore_errors=True)
    trainer.save_model(str(output))
    (output / "training_args.bin").unlink(missing_ok=True)
    metrics = final_metrics(trainer, training_loss)
    (output / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    files = [
        OutputFile(path=file.relative_to(output).as_posix(), size=file.stat().st_size, sha256=storage.sha256_of(file))
        for file in sorted(output.rglob("*"))
        if file.is_file()
    ]
    storage.upload_dir(output, config.destination)
    # The manifest goes last: a reader that finds it finds every file it names, with their sizes and digests.
    manifest = {
        "run": config.run_uid,
        "job": config.job,
        "files": [file.model_dump() for file in files],
        "metrics": metrics,
    }
    storage.write_bytes(storage.join(config.destination, MANIFEST_FILE), json.dumps(manifest, indent=2).encode())
    event = OutputEvent(weights=config.destination, files=files, metrics=metrics)
    log(f"adapter, tokenizer and metrics written to {config.destination}")
    emit(event)
    write_termination_message(protocol.termination_message(event))
    return event


def _write_rank_weights(trainer: Any) -> None:
    directory = os.environ.get(RANK_WEIGHTS_DIR_ENV)
    if not directory:
        return
    from safetensors.torch import save_file

    weights = {
        name: parameter.detach().cpu().contiguous()
        for name, parameter in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
        if parameter.requires_grad
    }
    Path(directory).mkdir(parents=True, exist_ok=True)
    save_file(weights, str(Path(directory) / f"rank-{rank()}.safetensors"))
