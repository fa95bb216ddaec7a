"""The rows of a training data file: the rules that the trainer's validator and `kubectl ftj create` share.

A file is JSON Lines. A row is a JSON object, either `{"text": ...}` (trained on every token) or
`{"prompt": ..., "completion": ...}` (trained on the completion only), with non-empty strings; one file holds one
format. Other keys are ignored. Errors name the input (train_data, validation_data) and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

DataFormat = Literal["text", "prompt_completion"]
Row = dict[str, str]

_FIELDS: dict[DataFormat, tuple[str, ...]] = {"text": ("text",), "prompt_completion": ("prompt", "completion")}


class InvalidTrainingData(ValueError):
    """A file that breaks the row rules; the message names the input and the line."""


@dataclass(frozen=True)
class Rows:
    format: DataFormat
    rows: list[Row]


def _bad(name: str, line: int, problem: str) -> InvalidTrainingData:
    return InvalidTrainingData(f"{name} line {line}: {problem}")


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
                f"{describe(kind)} row, but line {first[1]} is a {describe(first[0])} row; use one format per file",
            )
        rows.append(row)
    if first is None:
        raise InvalidTrainingData(f"{name}: no rows (the file is empty)")
    return Rows(first[0], rows)


def describe(kind: DataFormat) -> str:
    return '{"text"}' if kind == "text" else '{"prompt", "completion"}'
