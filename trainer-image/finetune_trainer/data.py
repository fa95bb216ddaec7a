"""Training data: fetch the JSONL files, check every row (with line numbers), split off the validation rows.

A row is a JSON object, either `{"text": ...}` (trained on every token) or `{"prompt": ..., "completion": ...}`
(trained on the completion only), with non-empty strings; one file holds one format. Other keys are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

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


@dataclass(frozen=True)
class Split:
    format: DataFormat
    train: list[Row]
    validation: list[Row]


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


def parse_rows(content: bytes, name: str) -> Rows:
    """Every row of a JSONL file, checked; `name` (train_data, validation_data) goes into error messages."""
    rows: list[Row] = []
    first: tuple[DataFormat, int] | None = None
    for number, raw_line in enumerate(content.split(b"\n"), start=1):
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _bad(name, number, f"not valid UTF-8 ({error.reason} at byte {error.start})") from error
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except ValueError as error:
            raise _bad(name, number, f"not valid JSON ({error})") from error
        kind, row = _row_format(name, number, value)
        if first is None:
            first = (kind, number)
        elif kind != first[0]:
            raise _bad(
                name,
                number,
                f"{_describe(kind)} row, but line {first[1]} is a {_describe(first[0])} row; use one format per file",
            )
        rows.append(row)
    if first is None:
        raise UserError(INVALID_TRAINING_DATA, f"{name}: no rows (the file is empty)")
    return Rows(first[0], rows)


def _describe(kind: DataFormat) -> str:
    return '{"text"}' if kind == "text" else '{"prompt", "completion"}'


def load_rows(uri: str, name: str) -> Rows:
    try:
        content = storage.read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError) as error:
        raise UserError(INVALID_TRAINING_DATA, f"{name}: cannot read {uri}: not found") from error
    except PermissionError as error:
        raise UserError(INVALID_TRAINING_DATA, f"{name}: cannot read {uri}: permission denied") from error
    return parse_rows(content, name)


def load_split(inputs: TrainingInput) -> Split:
    """Train and validation rows as Replicate takes them.

    Validation comes from the tail of train_data (removed from training), or from the head of validation_data
    when given; none when run_validation is off.
    """
    train = load_rows(inputs.train_data, "train_data")
    count = inputs.num_validation_samples if inputs.run_validation else 0
    if inputs.validation_data is not None:
        validation = load_rows(inputs.validation_data, "validation_data")
        if validation.format != train.format:
            raise UserError(
                INVALID_TRAINING_DATA,
                f"validation_data has {_describe(validation.format)} rows but train_data has "
                f"{_describe(train.format)} rows",
            )
        return Split(train.format, train.rows, validation.rows[:count])
    if count >= len(train.rows):
        raise UserError(
            INVALID_INPUT,
            f"num_validation_samples={count} leaves no training rows: train_data has {len(train.rows)} rows "
            "(lower num_validation_samples, give validation_data, or set run_validation: false)",
        )
    cut = len(train.rows) - count
    return Split(train.format, train.rows[:cut], train.rows[cut:])
