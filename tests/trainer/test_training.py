"""A LoRA run on the tiny Llama, end to end in this process: it learns, masks exactly, emits valid events,
and its saved adapter reloads with PEFT to the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import (
    TrainerRun,
    build_tiny_trainer,
    learnable_rows,
    text_rows,
    train_in_process,
    trainer_config,
    write_jsonl,
)
from finetune_contract.protocol import (
    CheckpointEvent,
    EvalEvent,
    OutputEvent,
    ProgressEvent,
    SampleEvent,
    StartEvent,
    parse_termination_message,
)

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainerRun:
    tmp = tmp_path_factory.mktemp("lora-run")
    train_data = write_jsonl(tmp / "train.jsonl", learnable_rows(48))
    config = trainer_config(
        tiny_model_dir,
        train_data,
        tmp / "destination",
        num_train_epochs=3,
        learning_rate=2e-2,
        validation_prompt="what does bob eat? answer:",
    )
    return train_in_process(config, tmp)


def test_loss_falls_on_a_learnable_prompt_completion_set(lora_run: TrainerRun) -> None:
    progress = lora_run.of(ProgressEvent)
    evals = lora_run.of(EvalEvent)
    assert len(evals) == 3
    first, last = progress[0].loss, sum(event.loss for event in progress[-3:]) / 3
    assert last < 0.7 * first, f"loss did not fall enough: {first} -> {last}"
    assert evals[-1].eval_loss < evals[0].eval_loss


def test_prompt_completion_rows_train_on_the_completion_only_exactly(lora_run: TrainerRun) -> None:
    trainer = lora_run.result.trainer
    tokenizer = trainer.processing_class
    rows = learnable_rows(48)[:44]  # the training rows, in file order (the tail went to validation)
    dataset = trainer.train_dataset
    assert len(dataset) == len(rows)
    for row, example in zip(rows, dataset, strict=True):
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        full_ids = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
        assert example["input_ids"] == full_ids
        cut = len(prompt_ids)
        assert example["labels"][:cut] == [-100] * cut
        assert example["labels"][cut:] == full_ids[cut:]
        assert example["labels"][-1] == tokenizer.eos_token_id  # the model learns to stop
    batch = trainer.data_collator([dataset[0], dataset[1]])
    assert ((batch["labels"] == -100) | (batch["labels"] == batch["input_ids"])).all()


def test_text_rows_train_on_every_token(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = text_rows(8)
    trainer = build_tiny_trainer(tiny_model_dir, tmp_path, rows)
    tokenizer = trainer.processing_class
    for row, example in zip(rows, trainer.train_dataset, strict=True):
        assert example["input_ids"] == tokenizer(row["text"] + tokenizer.eos_token)["input_ids"]
        assert example["labels"] == example["input_ids"]


def test_every_event_parses_with_the_operators_protocol(lora_run: TrainerRun) -> None:
    kinds = {type(event) for event in lora_run.events}
    assert {StartEvent, ProgressEvent, EvalEvent, SampleEvent, CheckpointEvent, OutputEvent} <= kinds
    start = lora_run.of(StartEvent)[0]
    assert start.total_steps == 33  # 44 rows / batch 4 = 11 steps x 3 epochs
    progress = lora_run.of(ProgressEvent)
    assert [event.step for event in progress] == list(range(1, 34))
    assert all(event.tokens_per_second for event in progress[1:])
    assert [event.epoch for event in lora_run.of(CheckpointEvent)] == [1, 2, 3]
    assert [event.prompt for event in lora_run.of(SampleEvent)] == ["what does bob eat? answer:"] * 3


def test_output_is_the_adapter_tokenizer_and_metrics_with_checksums(lora_run: TrainerRun) -> None:
    from finetune_trainer.storage import sha256_of

    output = lora_run.of(OutputEvent)[-1]
    assert output.weights == str(lora_run.destination)
    names = {file.path for file in output.files}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "metrics.json"} <= names
    for file in output.files:
        local = lora_run.destination / file.path
        assert local.stat().st_size == file.size
        assert sha256_of(local) == file.sha256
    metrics = json.loads((lora_run.destination / "metrics.json").read_text())
    assert metrics == output.metrics
    assert {"train_loss", "eval_loss"} <= set(metrics)
    # The termination message is the output event, within Kubernetes' 4096 bytes.
    assert len(lora_run.termination.encode()) <= 4096
    assert parse_termination_message(lora_run.termination) == output
    adapter_config = json.loads((lora_run.destination / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8
    assert adapter_config["lora_alpha"] == 16
    assert set(adapter_config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_saved_adapter_reloads_with_peft_and_reproduces_the_trained_model(
    lora_run: TrainerRun, tiny_model_dir: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained = lora_run.result.trainer.model.eval()
    tokenizer = lora_run.result.trainer.processing_class
    inputs = tokenizer(["what does carol eat? answer: carol eats"], return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(lora_run.destination)).eval()
    with torch.no_grad():
        expected = trained(input_ids=inputs["input_ids"]).logits
        actual = reloaded(input_ids=inputs["input_ids"]).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # ...and the adapter changed the model: it is not the base model.
    with torch.no_grad(), reloaded.disable_adapter():
        untouched = reloaded(input_ids=inputs["input_ids"]).logits
    assert not torch.allclose(untouched, expected, atol=1e-3)
