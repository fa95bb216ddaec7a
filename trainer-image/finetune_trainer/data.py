"""Training data: fetch the JSONL files, check every row (with line numbers), split off the validation rows.

A row is a JSON object, either `{"text": ...}` (trained on every token) or `{"prompt": ..., "completion": ...}`
(trained on the completion only), with non-empty strings; one file holds one format. Other keys are ignored.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from finetune_contract.inputs import TrainingInput
from finetune_trainer import storage
from finetune_trainer.errors import INVALID_INPUT, INVALID_TRAINING_DATA, UserError

DataFormat = Literal["text", "prompt_completion"]
Row = dict[str, str]

_FIELDS: dict[DataFormat, tuple[str, ...]] = {"text": ("text",), "prompt_completion": ("prompt", "completion")}


@dataclass(frozen=True)
class Rows:
    format: DataFormat
    rows: list[Row]


def _bad(name: str, line: int, problem: str) -> UserError:
    return UserError(INVALID_TRAINING_DATA, f"{name} line {line}: {problem}")


def _row_format(name: str, line: int, row: object) -> tuple[DataFormat, Row]:
    if not isinstance(row, dict):
        raise _bad(name, line, f"expected a JSON object, got {type(row).__name__}")
    if "text" in row and ("prompt" in row or "completion" in row):
        raise _bad(name, line, 'has both "text" and "prompt"/"completion"; use one format')
    if "text" in row:
        kind: DataFormat = "text"
    elif "prompt" in row or "completion" in row:
        kind = "prompt_completion"
    else:
        raise _bad(name, line, 'expected "text" or "prompt" and "completion" keys')
    for field in _FIELDS[kind]:
        if field not in row:
            raise _bad(name, line, f'missing "{field}"')
        value = row[field]
        if not isinstance(value, str):
            raise _bad(name, line, f'"{field}" must be a string, got {type(value).__name__}')
        if not value.strip():
            raise _bad(name, line, f'"{field}" is empty')
    return kind, {field: row[field] for field in _FIELDS[kind]}


class RowReader:
    """Checks rows one line at a time, remembering the file's format; `name` (train_data, validation_data) goes
    into error messages."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.first: tuple[DataFormat, int] | None = None

    @property
    def format(self) -> DataFormat:
        if self.first is None:
            raise UserError(INVALID_TRAINING_DATA, f"{self.name}: no rows (the file is empty)")
        return self.first[0]

    def rows(self, lines: Iterable[bytes]) -> Iterator[Row]:
        for number, raw_line in enumerate(lines, start=1):
            row = self.row(number, raw_line)
            if row is not None:
                yield row

    def row(self, number: int, raw_line: bytes) -> Row | None:
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _bad(self.name, number, f"not valid UTF-8 ({error.reason} at byte {error.start})") from error
        if not text.strip():
            return None
        try:
            value = json.loads(text)
        except ValueError as error:
            raise _bad(self.name, number, f"not valid JSON ({error})") from error
        kind, row = _row_format(self.name, number, value)
        if self.first is None:
            self.first = (kind, number)
        elif kind != self.first[0]:
            raise _bad(
                self.name,
                number,
                f"{_describe(kind)} row, but line {self.first[1]} is a {_describe(self.first[0])} row; "
                "use one format per file",
            )
        return row


def parse_rows(content: bytes, name: str) -> Rows:
    """Every row of a JSONL file's content, checked."""
    reader = RowReader(name)
    rows = list(reader.rows(content.split(b"\n")))
    return Rows(reader.format, rows)


def _describe(kind: DataFormat) -> str:
    return '{"text"}' if kind == "text" else '{"prompt", "completion"}'


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
                f"validation_data has {_describe(validation_reader.format)} rows but train_data has "
                f"{_describe(kind)} rows",
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
