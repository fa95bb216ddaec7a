"""What `validate` reports about good data: rows, split, token counts, long documents, the batch plan and steps.

Rows are tokenized in batches as they are read from the staged files, so memory grows with the number of rows (one
length each), not with the size of the data.
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections.abc import Iterator
from typing import Any

from finetune_contract.batching import plan_batches
from finetune_contract.inputs import TrainingInput
from finetune_contract.training_data import Row
from finetune_trainer.data import StagedSplit

# TRL packs (and the summary counts) within batches of this many rows: `Dataset.map`'s default batch size.
PACK_BATCH_ROWS = 1000


def packing_strategy(inputs: TrainingInput) -> str | None:
    """TRL's packing strategy for the inputs. Packed rows longer than chunk_size are split into chunk_size pieces
    ("bfd_split"), never cut off; "wrapped" cuts across rows anyway. None: no packing (rows are truncated)."""
    if not inputs.pack_sequences:
        return None
    return "wrapped" if inputs.wrap_packed_sequences else "bfd_split"


def _batches(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    while batch := list(itertools.islice(rows, size)):
        yield batch


def token_lengths(rows: list[Row], tokenizer: Any) -> list[int]:
    """Tokens per row as the trainer sees them: BOS + prompt + completion (or text) + EOS."""
    texts = [(row.get("text") or row["prompt"] + row["completion"]) + tokenizer.eos_token for row in rows]
    return [len(ids) for ids in tokenizer(texts)["input_ids"]]


def packed_sequences(lengths: array[int], chunk_size: int, strategy: str) -> int:
    """How many chunk_size sequences TRL's packing makes of these lengths: the trainer's own packing code, run on
    placeholder tokens one map batch at a time."""
    if strategy == "wrapped":
        return max(1, math.ceil(sum(lengths) / chunk_size))
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    total = 0
    for start in range(0, len(lengths), PACK_BATCH_ROWS):
        batch = lengths[start : start + PACK_BATCH_ROWS]
        placeholder = Dataset.from_dict({"input_ids": [[0] * length for length in batch]})
        total += len(pack_dataset(placeholder, chunk_size, strategy))
    return total


def summarize(split: StagedSplit, tokenizer: Any, inputs: TrainingInput, world_size: int) -> dict[str, Any]:
    plan = plan_batches(inputs.train_batch_size, inputs.micro_batch_size, world_size)
    chunk = inputs.chunk_size
    strategy = packing_strategy(inputs)
    lengths: array[int] = array("L")
    # Unpacked prompt/completion rows whose prompt alone fills chunk_size have no completion token left to train on.
    prompt_fills_chunk = 0
    for batch in _batches(split.train_rows_in(), PACK_BATCH_ROWS):
        lengths.extend(token_lengths(batch, tokenizer))
        if strategy is None and split.format == "prompt_completion":
            prompts = tokenizer([row["prompt"] for row in batch])["input_ids"]
            prompt_fills_chunk += sum(len(ids) >= chunk for ids in prompts)
    unpacked = len(lengths) - prompt_fills_chunk
    sequences = unpacked if strategy is None else packed_sequences(lengths, chunk, strategy)
    steps = plan.steps_per_epoch(sequences)
    longer = [length for length in lengths if length > chunk]
    return {
        "format": split.format,
        "rows": split.train_rows + split.validation_rows,
        "train_rows": split.train_rows,
        "validation_rows": split.validation_rows,
        "train_tokens": {
            "total": sum(lengths),
            "min": min(lengths),
            "mean": round(sum(lengths) / len(lengths), 1),
            "max": max(lengths),
            "share_over_chunk_size": round(len(longer) / len(lengths), 4),
        },
        "chunk_size": chunk,
        # Rows longer than chunk_size: split into chunk_size pieces when packed (no token lost), truncated at
        # chunk_size when not (the tokens past it are not trained on); a prompt/completion row whose prompt fills
        # chunk_size is left out, having nothing to train on.
        "over_chunk_size": {
            "rows": len(longer),
            "handling": "truncated" if strategy is None else "split",
            "tokens_truncated": sum(length - chunk for length in longer) if strategy is None else 0,
            "rows_left_out": prompt_fills_chunk,
        },
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
