"""What `validate` reports about good data: rows, split, token counts, the batch plan and steps per epoch."""

from __future__ import annotations

import math
from typing import Any

from finetune_contract.batching import plan_batches
from finetune_contract.inputs import TrainingInput
from finetune_contract.training_data import Row
from finetune_trainer.data import Split


def token_lengths(rows: list[Row], tokenizer: Any) -> list[int]:
    """Tokens per row as the trainer sees them: BOS + prompt + completion (or text) + EOS."""
    texts = [(row.get("text") or row["prompt"] + row["completion"]) + tokenizer.eos_token for row in rows]
    return [len(ids) for ids in tokenizer(texts)["input_ids"]]


def packed_sequences(lengths: list[int], chunk_size: int, wrap: bool) -> int:
    """How many chunk_size sequences TRL's packing makes of these lengths (the same packing code the trainer runs)."""
    if wrap:
        return max(1, math.ceil(sum(lengths) / chunk_size))
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    fake = Dataset.from_dict({"input_ids": [[0] * min(length, chunk_size) for length in lengths]})
    return len(pack_dataset(fake, chunk_size, "bfd"))


def summarize(split: Split, tokenizer: Any, inputs: TrainingInput, world_size: int) -> dict[str, Any]:
    plan = plan_batches(inputs.train_batch_size, inputs.micro_batch_size, world_size)
    lengths = token_lengths(split.train, tokenizer)
    if inputs.pack_sequences:
        sequences = packed_sequences(lengths, inputs.chunk_size, inputs.wrap_packed_sequences)
    else:
        sequences = len(lengths)
    steps = plan.steps_per_epoch(sequences)
    return {
        "format": split.format,
        "rows": len(split.train) + len(split.validation),
        "train_rows": len(split.train),
        "validation_rows": len(split.validation),
        "train_tokens": {
            "total": sum(lengths),
            "min": min(lengths),
            "mean": round(sum(lengths) / len(lengths), 1),
            "max": max(lengths),
            "share_over_chunk_size": round(sum(length > inputs.chunk_size for length in lengths) / len(lengths), 4),
        },
        "chunk_size": inputs.chunk_size,
        "train_sequences": sequences,
        "batch_plan": {
            "world_size": plan.world_size,
            "per_device_batch_size": plan.per_device_batch_size,
            "gradient_accumulation_steps": plan.gradient_accumulation_steps,
            "effective_batch_size": plan.effective_batch_size,
            "train_batch_size": inputs.train_batch_size,
        },
        "steps_per_epoch": steps,
        "total_steps": steps * inputs.num_train_epochs,
    }
