"""Training data: stream the JSONL files, check every row (with line numbers), stage the split as local files.

The row rules live in the contract (`finetune_contract.training_data`), shared with `kubectl ftj create`.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from finetune_contract.inputs import TrainingInput
from finetune_contract.training_data import DataFormat, InvalidTrainingData, Row, RowReader, describe
from finetune_trainer import storage
from finetune_trainer.errors import INVALID_INPUT, INVALID_TRAINING_DATA, UserError


@contextmanager
def _lines(uri: str, name: str) -> Iterator[Iterator[bytes]]:
    """The lines of a data file, streamed; a missing or unreadable file is the user's error."""
    try:
        with storage.open_binary(uri) as handle:
            yield (line.rstrip(b"\r\n") for line in handle)
    except (FileNotFoundError, IsADirectoryError) as error:
        raise UserError(INVALID_TRAINING_DATA, f"{name}: cannot read {uri}: not found") from error
    except PermissionError as error:
        raise UserError(INVALID_TRAINING_DATA, f"{name}: cannot read {uri}: permission denied") from error


@dataclass(frozen=True)
class StagedSplit:
    """The checked rows as local JSONL files (one row per line): what the training processes of a node read."""

    format: DataFormat
    train: Path
    validation: Path | None
    train_rows: int
    validation_rows: int

    def train_rows_in(self) -> Iterator[Row]:
        return _read_jsonl(self.train)

    def validation_rows_in(self) -> Iterator[Row]:
        return _read_jsonl(self.validation) if self.validation is not None else iter(())


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            row: Row = json.loads(line)
            yield row


def _write_row(handle: IO[bytes], row: Row) -> int:
    line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
    handle.write(line)
    return len(line)


def stage_split(inputs: TrainingInput, directory: Path) -> StagedSplit:
    try:
        return _stage_split(inputs, directory)
    except InvalidTrainingData as error:
        raise UserError(INVALID_TRAINING_DATA, str(error)) from error


def _stage_split(inputs: TrainingInput, directory: Path) -> StagedSplit:
    """Stream train_data (and validation_data), check every row, and write the split into `directory`.

    The split is Replicate's: validation rows from the tail of train_data (removed from training), or from the head
    of validation_data when given; none when run_validation is off. Memory stays bounded by
    num_validation_samples rows, whatever the size of the files.
    """
    directory.mkdir(parents=True, exist_ok=True)
    count = inputs.num_validation_samples if inputs.run_validation else 0
    train_path, validation_path = directory / "train.jsonl", directory / "validation.jsonl"
    reader = RowReader("train_data")
    tail: deque[tuple[int, Row]] = deque(maxlen=count + 1)  # (offset in the train file, row) of the last rows
    rows = offset = 0
    with _lines(inputs.train_data, "train_data") as lines, train_path.open("wb") as train:
        for row in reader.rows(lines):
            tail.append((offset, row))
            offset += _write_row(train, row)
            rows += 1
    kind = reader.format
    if inputs.validation_data is not None:
        validation_reader = RowReader("validation_data")
        kept = 0
        with _lines(inputs.validation_data, "validation_data") as lines, validation_path.open("wb") as validation:
            for row in validation_reader.rows(lines):
                if kept < count:
                    _write_row(validation, row)
                    kept += 1
        if validation_reader.format != kind:
            raise UserError(
                INVALID_TRAINING_DATA,
                f"validation_data has {describe(validation_reader.format)} rows but train_data has "
                f"{describe(kind)} rows",
            )
        return StagedSplit(kind, train_path, validation_path if kept else None, rows, kept)
    if count >= rows:
        raise UserError(
            INVALID_INPUT,
            f"num_validation_samples={count} leaves no training rows: train_data has {rows} rows "
            "(lower num_validation_samples, give validation_data, or set run_validation: false)",
        )
    if count == 0:
        return StagedSplit(kind, train_path, None, rows, 0)
    last = list(tail)[-count:]
    with validation_path.open("wb") as validation:
        for _, row in last:
            _write_row(validation, row)
    with train_path.open("r+b") as train:
        train.truncate(last[0][0])
    return StagedSplit(kind, train_path, validation_path, rows - count, count)


# Written last by `write_staged`: a directory without it holds no complete split.
STAGED_SPLIT_FILE = "split.json"


def write_staged(inputs: TrainingInput, directory: Path) -> StagedSplit:
    """`stage_split`, then a record of it that `read_staged` finds (processes that start later reuse the copy)."""
    (directory / STAGED_SPLIT_FILE).unlink(missing_ok=True)
    staged = stage_split(inputs, directory)
    record = {
        "format": staged.format,
        "train_rows": staged.train_rows,
        "validation_rows": staged.validation_rows,
        "validation": staged.validation is not None,
    }
    (directory / STAGED_SPLIT_FILE).write_text(json.dumps(record), encoding="utf-8")
    return staged


def read_staged(directory: Path) -> StagedSplit | None:
    try:
        record = json.loads((directory / STAGED_SPLIT_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    return StagedSplit(
        format=record["format"],
        train=directory / "train.jsonl",
        validation=directory / "validation.jsonl" if record["validation"] else None,
        train_rows=record["train_rows"],
        validation_rows=record["validation_rows"],
    )
