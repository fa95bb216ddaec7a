"""One training process (one per GPU under torchrun): inputs -> SFTConfig + LoraConfig -> SFTTrainer -> adapter.

A thin composition in the manner of TRL's `trl/scripts/sft.py`; the callbacks turn the Trainer's state into the
protocol's events, and the output is the PEFT adapter, the tokenizer and a metrics file at the destination.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_contract import protocol
from finetune_contract.batching import BatchPlan, plan_batches
from finetune_contract.inputs import TrainingInput
from finetune_contract.protocol import OutputEvent, OutputFile
from finetune_contract.trainer_config import TrainerConfig
from finetune_trainer import storage
from finetune_trainer.checkpoints import CheckpointCallback, fetch_checkpoint, latest_checkpoint
from finetune_trainer.data import Split, load_split
from finetune_trainer.errors import WEIGHTS_NOT_FOUND, UserError
from finetune_trainer.events import emit, local_rank, log, rank, world_size, write_termination_message
from finetune_trainer.model import has_cuda, load_base_model, load_tokenizer, lora_config

METRICS_FILE = "metrics.json"
# For tests and debugging: each rank writes its trainable (adapter) weights there at the end, so a test can check
# that DDP kept every replica identical.
RANK_WEIGHTS_DIR_ENV = "FINETUNE_TRAINER_RANK_WEIGHTS_DIR"


@dataclass
class TrainingRun:
    trainer: Any
    output: OutputEvent | None  # rank 0 only


def sft_config(inputs: TrainingInput, plan: BatchPlan, output_dir: Path, validate: bool) -> Any:
    from trl.trainer.sft_config import SFTConfig

    cuda = has_cuda()
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
        # Sequences: truncated at chunk_size, or packed into chunk_size sequences. "bfd" packing is padding-free
        # with per-example position ids, so no token attends across examples; "wrapped" cuts across examples into
        # constant-length sequences (padded to chunk_size so every batch has the same shape).
        max_length=inputs.chunk_size,
        packing=inputs.pack_sequences,
        packing_strategy="wrapped" if inputs.wrap_packed_sequences else "bfd",
        pad_to_multiple_of=inputs.chunk_size if inputs.wrap_packed_sequences else None,
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
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
        ddp_backend=("nccl" if cuda else "gloo") if world_size() > 1 else None,
        ddp_find_unused_parameters=False,
        dataloader_drop_last=False,
        remove_unused_columns=True,
    )


def build_trainer(
    inputs: TrainingInput, split: Split, model: Any, tokenizer: Any, *, output_dir: Path, callbacks: list[Any]
) -> Any:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl.trainer.sft_trainer import SFTTrainer

    plan = plan_batches(inputs.train_batch_size, inputs.micro_batch_size, world_size())
    validate = bool(split.validation) and inputs.run_validation
    trainer = SFTTrainer(
        model=model,
        args=sft_config(inputs, plan, output_dir, validate),
        train_dataset=Dataset.from_list(split.train),
        eval_dataset=Dataset.from_list(split.validation) if validate else None,
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


def run(config: TrainerConfig, workdir: Path) -> TrainingRun:
    from transformers import set_seed

    inputs = config.input
    split = load_split(inputs)  # every row checked before any model is loaded
    plan = plan_batches(inputs.train_batch_size, inputs.micro_batch_size, world_size())
    output_dir = workdir / "trainer"
    args_probe = sft_config(inputs, plan, output_dir, validate=False)  # sets up torch.distributed
    with args_probe.main_process_first(local=True, desc="fetching base weights"):
        weights = fetch_weights(config.weights, workdir)
    tokenizer = load_tokenizer(weights)
    set_seed(inputs.seed)
    model = load_base_model(weights, inputs, local_rank())

    from finetune_trainer.callbacks import ProgressCallback, SampleCallback

    validate = bool(split.validation) and inputs.run_validation
    callbacks: list[Any] = [CheckpointCallback(config.destination)]
    if inputs.validation_prompt:
        callbacks.append(SampleCallback(inputs.validation_prompt, with_validation=validate))
    trainer = build_trainer(inputs, split, model, tokenizer, output_dir=output_dir, callbacks=callbacks)
    trainer.add_callback(ProgressCallback(plan.world_size))

    resume: str | None = None
    latest = latest_checkpoint(config.destination)
    if latest is not None:
        epoch, uri = latest
        with args_probe.main_process_first(local=True, desc="fetching the checkpoint"):
            resume = str(fetch_checkpoint(uri, workdir))
        log(f"resuming from the epoch {epoch} checkpoint at {uri}")
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
    storage.upload_dir(output, config.destination)
    files = [
        OutputFile(path=file.relative_to(output).as_posix(), size=file.stat().st_size, sha256=storage.sha256_of(file))
        for file in sorted(output.rglob("*"))
        if file.is_file()
    ]
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
