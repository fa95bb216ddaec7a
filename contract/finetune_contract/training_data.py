"""The rows of a training data file: the rules that the trainer's validator and `kubectl ftj create` share.

A file is JSON Lines. A row is a JSON object, either `{"text": ...}` (trained on every token) or
`{"prompt": ..., "completion": ...}` (trained on the completion only), with non-empty strings; one file holds one
format. Other keys are ignored. Errors name the input (train_data, validation_data) and the line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
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


class RowReader:
    """Checks a file's rows one line at a time (a file of any size streams through it), remembering its format;
    `name` (train_data, validation_data) goes into error messages."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.first: tuple[DataFormat, int] | None = None

    @property
    def format(self) -> DataFormat:
        if self.first is None:
            raise InvalidTrainingData(f"{self.name}: no rows (the file is empty)")
        return self.first[0]

    def rows(self, lines: Iterable[bytes]) -> Iterator[Row]:
        """The rows of `lines` (one per physical line, without line ends), checked; blank lines are skipped."""
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
                f"{describe(kind)} row, but line {self.first[1]} is a {describe(self.first[0])} row; "
                "use one format per file",
            )
        return row


def parse_rows(content: bytes, name: str) -> Rows:
    """Every row of a JSONL file, checked; `name` (train_data, validation_data) goes into error messages."""
    reader = RowReader(name)
    rows = list(reader.rows(content.split(b"\n")))
    return Rows(reader.format, rows)


def describe(kind: DataFormat) -> str:
    return '{"text"}' if kind == "text" else '{"prompt", "completion"}'
