"""What a run prints and leaves, as trainer-image/README.md promises: PEFT's model card beside the adapter, a
greedy completion of the validation prompt (128 new tokens at most) at each epoch's end when there is no
validation set, the same adapter again from the same seed, and sequences cut at chunk_size without packing."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import (
    TrainerRun,
    adapter_weights,
    build_tiny_trainer,
    events_in,
    learnable_rows,
    text_rows,
    train_in_process,
    trainer_config,
    write_jsonl,
)
from finetune_contract.protocol import EvalEvent, OutputEvent, ProgressEvent, SampleEvent

pytestmark = pytest.mark.trainer

PROMPT = "what does bob eat? answer:"


def _config(tiny_model_dir: Path, data: Path, destination: Path, **inputs: Any) -> dict[str, Any]:
    # No validation set: the samples come at each epoch's end.
    return trainer_config(
        tiny_model_dir, data, destination, num_validation_samples=0, validation_prompt=PROMPT, **inputs
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("outputs-data") / "train.jsonl", learnable_rows(16))


@pytest.fixture(scope="module")
def first_run(tiny_model_dir: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainerRun:
    tmp = tmp_path_factory.mktemp("first-run")
    return train_in_process(_config(tiny_model_dir, data, tmp / "destination"), tmp)


def _greedy(model: Any, tokenizer: Any, max_new_tokens: int) -> tuple[str, int]:
    """The greedy completion of PROMPT, and how many tokens it has."""
    import torch

    model.eval()
    encoded = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
    new = output[0, encoded["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def test_the_output_has_pefts_model_card_beside_the_adapter(first_run: TrainerRun) -> None:
    [output] = first_run.of(OutputEvent)
    files = {file.path: file for file in output.files}
    assert "README.md" in files
    card = (first_run.destination / "README.md").read_text()
    assert card.startswith("---\n")  # a Hugging Face model card: YAML metadata, then text
    assert "library_name: peft" in card
    assert files["README.md"].size == len(card.encode())


def test_without_a_validation_set_each_epoch_ends_with_a_greedy_sample_of_the_validation_prompt(
    first_run: TrainerRun,
) -> None:
    assert first_run.of(EvalEvent) == []
    samples = first_run.of(SampleEvent)
    assert [(sample.epoch, sample.prompt) for sample in samples] == [(1.0, PROMPT), (2.0, PROMPT)]
    trainer = first_run.result.trainer
    expected, _ = _greedy(trainer.model, trainer.processing_class, max_new_tokens=128)
    assert samples[-1].completion == expected


def test_samples_are_greedy_and_128_new_tokens_at_most(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_trainer.callbacks import SampleCallback
    from finetune_trainer.model import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    tokenizer = load_tokenizer(tiny_model_dir)
    state = SimpleNamespace(epoch=1.0)
    emitted = io.StringIO()
    with redirect_stdout(emitted):
        for with_validation in (False, True):
            callback = SampleCallback(PROMPT, with_validation=with_validation)
            callback.on_epoch_end(None, state, None, model=model, processing_class=tokenizer)
            callback.on_evaluate(None, state, None, model=model, processing_class=tokenizer)
    # One sample at the epoch's end without a validation set, one at the validation with it: never both.
    first, second = events_in(emitted.getvalue())
    assert isinstance(first, SampleEvent)
    assert first == second
    # The untrained model never says EOS here: the completion runs to the limit, and is the greedy one.
    expected, length = _greedy(model, tokenizer, max_new_tokens=128)
    assert length == 128
    assert first.completion == expected
    assert first.completion != _greedy(model, tokenizer, max_new_tokens=127)[0]


def test_the_same_seed_trains_the_same_adapter_and_another_seed_another(
    first_run: TrainerRun, tiny_model_dir: Path, data: Path, tmp_path: Path
) -> None:
    import torch

    again = train_in_process(_config(tiny_model_dir, data, tmp_path / "again"), tmp_path / "again-work")
    other = train_in_process(_config(tiny_model_dir, data, tmp_path / "other", seed=7), tmp_path / "other-work")
    losses = [event.loss for event in first_run.of(ProgressEvent)]
    assert [event.loss for event in again.of(ProgressEvent)] == losses
    assert [event.loss for event in other.of(ProgressEvent)] != losses
    first, same, different = (adapter_weights(run.destination) for run in (first_run, again, other))
    assert all(torch.equal(first[name], same[name]) for name in first)
    assert not all(torch.equal(first[name], different[name]) for name in first)


def test_without_packing_sequences_are_cut_at_chunk_size(tiny_model_dir: Path, tmp_path: Path) -> None:
    chunk = 12
    rows = text_rows(24)
    trainer = build_tiny_trainer(tiny_model_dir, tmp_path, rows, chunk_size=chunk)
    tokenizer = trainer.processing_class
    cut = 0
    for row, example in zip(rows, trainer.train_dataset, strict=True):
        full = tokenizer(row["text"] + tokenizer.eos_token)["input_ids"]
        assert example["input_ids"] == full[:chunk]
        cut += len(full) > chunk
    assert 0 < cut < len(rows), "some rows longer than chunk_size, some shorter"
