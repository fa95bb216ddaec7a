"""Packing: examples packed into one sequence see only themselves; wrapped packing gives constant-length batches."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    build_tiny_trainer,
    events_in,
    learnable_rows,
    run_cli,
    text_rows,
    trainer_config,
    write_config,
    write_jsonl,
)
from finetune_contract.protocol import OutputEvent, ProgressEvent

pytestmark = pytest.mark.trainer


def per_document_varlen_attention(
    query: Any,
    key: Any,
    value: Any,
    cu_seq_q: Any,
    cu_seq_k: Any,
    *lengths: int,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
) -> Any:
    """torch's varlen_attn contract (CUDA only) computed on the CPU one document at a time, so that the `varlen`
    implementation's handling of the packed row is tested here; the kernel itself runs in `make bench-gpu`."""
    import torch
    import torch.nn.functional as F

    assert window_size == (-1, 0), "packed documents must attend causally"
    assert torch.equal(cu_seq_q, cu_seq_k)
    output = torch.empty_like(query)
    for start, end in itertools.pairwise(cu_seq_q.tolist()):
        q, k, v = (tensor[start:end].transpose(0, 1) for tensor in (query, key, value))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
        output[start:end] = attended.transpose(0, 1)
    return output


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flex_attention", "varlen"])
def test_packed_examples_give_the_same_logits_as_each_example_alone(
    tiny_model_dir: Path, tmp_path: Path, attention: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from torch.nn.attention import varlen

    if attention == "varlen":
        monkeypatch.setattr(varlen, "varlen_attn", per_document_varlen_attention)
    trainer = build_tiny_trainer(
        tiny_model_dir, tmp_path, learnable_rows(16), attention, pack_sequences=True, chunk_size=64
    )
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    input_ids, position_ids = batch["input_ids"], batch["position_ids"]
    assert input_ids.shape[0] == 1
    assert "attention_mask" not in batch
    starts = [*(position_ids[0] == 0).nonzero().flatten().tolist(), input_ids.shape[1]]
    assert len(starts) - 1 >= 4, "expected several examples packed together"
    assert batch["cu_seq_lens_q"].tolist() == starts
    model = trainer.model.eval()
    packed_inputs = {key: value for key, value in batch.items() if key not in ("labels", "seq_idx")}
    with torch.no_grad():
        packed = model(**packed_inputs, use_cache=False).logits[0]
        leaky = model(input_ids=input_ids, use_cache=False).logits[0]  # plain causal attention over the whole row
        for start, end in itertools.pairwise(starts):
            alone = model(input_ids=input_ids[:, start:end], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-4, atol=1e-4)
    # The check can see leakage: without the document boundaries, later examples attend to earlier ones.
    second = slice(starts[1], starts[2])
    assert not torch.allclose(leaky[second], packed[second], atol=1e-3)


def test_packing_splits_a_row_longer_than_chunk_size_and_keeps_every_token(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    chunk = 16
    rows = text_rows(24)
    trainer = build_tiny_trainer(tiny_model_dir, tmp_path, rows, pack_sequences=True, chunk_size=chunk)
    tokenizer = trainer.processing_class
    lengths = [len(tokenizer(row["text"] + tokenizer.eos_token)["input_ids"]) for row in rows]
    assert max(lengths) > chunk, "the data must hold rows longer than the chunk"
    packed = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    assert max(packed) <= chunk
    assert sum(packed) == sum(lengths)  # split into pieces, none cut off


def test_wrapped_packing_yields_constant_length_sequences(tiny_model_dir: Path, tmp_path: Path) -> None:
    chunk = 32
    trainer = build_tiny_trainer(
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
