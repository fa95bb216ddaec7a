"""Packing: examples packed into one sequence see only themselves; wrapped packing gives constant-length batches."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from conftest import events_in, learnable_rows, run_cli, text_rows, trainer_config, write_config, write_jsonl

from finetune_contract.protocol import OutputEvent, ProgressEvent
from finetune_contract.trainer_config import TrainerConfig

pytestmark = pytest.mark.trainer


def _trainer(tiny_model_dir: Path, tmp_path: Path, rows: list[dict[str, str]], **inputs: Any) -> Any:
    from finetune_contract.training_data import DataFormat
    from finetune_trainer.data import Split
    from finetune_trainer.model import load_base_model, load_tokenizer
    from finetune_trainer.train import build_trainer

    config = TrainerConfig.model_validate(trainer_config(tiny_model_dir, "unused.jsonl", tmp_path / "out", **inputs))
    kind: DataFormat = "text" if "text" in rows[0] else "prompt_completion"
    model = load_base_model(tiny_model_dir, config.input, 0)
    return build_trainer(
        config.input, Split(kind, rows, []), model, load_tokenizer(tiny_model_dir), output_dir=tmp_path, callbacks=[]
    )


def test_packed_examples_give_the_same_logits_as_each_example_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    trainer = _trainer(tiny_model_dir, tmp_path, learnable_rows(16), pack_sequences=True, chunk_size=64)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    input_ids, position_ids = batch["input_ids"], batch["position_ids"]
    assert input_ids.shape[0] == 1
    assert "attention_mask" not in batch
    starts = [*(position_ids[0] == 0).nonzero().flatten().tolist(), input_ids.shape[1]]
    assert len(starts) - 1 >= 4, "expected several examples packed together"
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(input_ids=input_ids, position_ids=position_ids).logits[0]
        leaky = model(input_ids=input_ids).logits[0]  # plain causal attention over the whole row
        for start, end in itertools.pairwise(starts):
            alone = model(input_ids=input_ids[:, start:end]).logits[0]
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-4, atol=1e-4)
    # The check can see leakage: without the per-example positions, later examples attend to earlier ones.
    second = slice(starts[1], starts[2])
    assert not torch.allclose(leaky[second], packed[second], atol=1e-3)


def test_wrapped_packing_yields_constant_length_sequences(tiny_model_dir: Path, tmp_path: Path) -> None:
    chunk = 32
    trainer = _trainer(
        tiny_model_dir, tmp_path, text_rows(24), pack_sequences=True, wrap_packed_sequences=True, chunk_size=chunk
    )
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    assert all(length == chunk for length in lengths[:-1])
    assert 0 < lengths[-1] <= chunk
    total = sum(len(trainer.processing_class(row["text"] + "</s>")["input_ids"]) for row in text_rows(24))
    assert sum(lengths) == total  # wrapping cuts across examples but drops no token
    shapes = {tuple(batch["input_ids"].shape[1:]) for batch in trainer.get_train_dataloader()}
    assert shapes == {(chunk,)}


def test_wrapped_packing_trains_to_the_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", text_rows(24))
    config = trainer_config(
        tiny_model_dir,
        data,
        tmp_path / "dest",
        pack_sequences=True,
        wrap_packed_sequences=True,
        chunk_size=32,
        num_train_epochs=1,
    )
    code, out = run_cli(
        ["train", "--input", str(write_config(tmp_path / "in.json", config)), "--workdir", str(tmp_path / "w")]
    )
    events = events_in(out)
    assert code == 0, out[-3000:]
    assert any(isinstance(event, ProgressEvent) for event in events)
    assert isinstance(events[-1], OutputEvent)
    assert (tmp_path / "dest" / "adapter_model.safetensors").exists()
