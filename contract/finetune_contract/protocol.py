"""The trainer -> operator event protocol, shared by both sides.

The trainer prints one JSON object per line on stdout for each machine event; every other line is ordinary log
output and passes through untouched. An event line carries `"ftj": <protocol version>` and an `"event"` name.
The operator ignores lines without `ftj`, lines it cannot parse, and event names it does not know, so a newer
trainer never breaks an older operator.

    {"ftj": 1, "event": "start", "world_size": 8, "total_steps": 300, "epochs": 3}
    {"ftj": 1, "event": "progress", "step": 40, "total_steps": 300, "epoch": 0.4, "loss": 1.93, ...}
    {"ftj": 1, "event": "eval", "epoch": 1, "eval_loss": 1.71, "perplexity": 5.5}
    {"ftj": 1, "event": "sample", "epoch": 1, "prompt": "...", "completion": "..."}
    {"ftj": 1, "event": "checkpoint", "epoch": 1, "uri": "s3://.../checkpoints/epoch-1"}
    {"ftj": 1, "event": "output", "weights": "s3://...", "files": [...], "metrics": {...}}
    {"ftj": 1, "event": "validated", "resolved": {...}}       (finetune-trainer validate)
    {"ftj": 1, "event": "error", "reason": "InvalidTrainingData", "message": "train_data line 17: ..."}

At exit the trainer also writes a termination message (`/dev/termination-log`, at most 4096 bytes): one event
line. `train` writes its output event (shortened to fit, see `termination_message`), `validate` its validated
event, and either writes its error event when it fails.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1
# sysexits.h EX_DATAERR: the trainer's exit code for user errors (bad data, bad inputs). Never retried.
EXIT_USER_ERROR = 65
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT = 4096


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    ftj: int = PROTOCOL_VERSION
    # Each event narrows this to its Literal name; declared here so that every line reads {"ftj": 1, "event": ...}.
    event: str


class ResolvedRun(BaseModel):
    """What the trainer resolved from the inputs and the data before training."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    world_size: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    train_rows: int | None = None
    validation_rows: int | None = None
    train_tokens: int | None = None
    steps_per_epoch: int | None = None


class StartEvent(_Event):
    event: Literal["start"] = "start"
    world_size: int
    total_steps: int
    epochs: int


class ProgressEvent(_Event):
    event: Literal["progress"] = "progress"
    step: int
    total_steps: int
    epoch: float
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None


class EvalEvent(_Event):
    event: Literal["eval"] = "eval"
    epoch: float
    eval_loss: float
    perplexity: float | None = None


class SampleEvent(_Event):
    event: Literal["sample"] = "sample"
    epoch: float
    prompt: str
    completion: str


class CheckpointEvent(_Event):
    event: Literal["checkpoint"] = "checkpoint"
    epoch: float
    uri: str


class OutputFile(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    path: str
    size: int
    sha256: str


class Output(BaseModel):
    """The published output: the weights URI, each file with its size and sha256, and the final metrics."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    weights: str
    files: list[OutputFile] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)


class OutputEvent(Output, _Event):
    event: Literal["output"] = "output"


class ValidatedEvent(_Event):
    """`finetune-trainer validate` succeeded; also its termination message."""

    event: Literal["validated"] = "validated"
    resolved: ResolvedRun


class ErrorEvent(_Event):
    event: Literal["error"] = "error"
    reason: str
    message: str


Event = Annotated[
    StartEvent | ProgressEvent | EvalEvent | SampleEvent | CheckpointEvent | OutputEvent | ValidatedEvent | ErrorEvent,
    Field(discriminator="event"),
]
_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
_EVENT_NAMES = frozenset(("start", "progress", "eval", "sample", "checkpoint", "output", "validated", "error"))


def encode(event: Event) -> str:
    """One event as one line of JSON (no newline)."""
    return event.model_dump_json(exclude_none=True)


def parse_line(line: str) -> Event | None:
    """The event a log line carries, or None for ordinary log lines and events this operator does not know."""
    text = line.strip()
    if not text.startswith("{") or '"ftj"' not in text:
        return None
    try:
        raw = json.loads(text)
    except ValueError:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("ftj"), int) or raw.get("event") not in _EVENT_NAMES:
        return None
    try:
        return _EVENT_ADAPTER.validate_python(raw)
    except ValidationError:
        return None


def termination_message(output: OutputEvent, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """The output event as a termination message of at most `limit` bytes.

    Kubernetes truncates longer messages, which would leave invalid JSON; the file list goes first, then the
    metrics, so the weights URI always survives.
    """
    for candidate in (
        output,
        output.model_copy(update={"files": []}),
        output.model_copy(update={"files": [], "metrics": {}}),
    ):
        message = encode(candidate)
        if len(message.encode()) <= limit:
            return message
    raise ValueError(f"weights URI too long for a {limit}-byte termination message")


def error_termination_message(error: ErrorEvent, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """The error event as a termination message of at most `limit` bytes (UTF-8), its message cut to fit."""
    message = encode(error)
    if len(message.encode()) <= limit:
        return message

    def cut(characters: int) -> str:
        return encode(error.model_copy(update={"message": error.message[:characters] + " ..."}))

    # The longest prefix that fits, found by bisection: JSON escapes and multi-byte characters make a character's
    # encoded size vary, so sizes are measured rather than computed.
    shortest, longest = 0, len(error.message)
    while shortest < longest:
        middle = (shortest + longest + 1) // 2
        if len(cut(middle).encode()) <= limit:
            shortest = middle
        else:
            longest = middle - 1
    return cut(shortest)


def parse_termination_message(message: str) -> Event | None:
    """The event a container left as its termination message (the last line that is one, if several)."""
    for line in reversed(message.strip().splitlines()):
        event = parse_line(line)
        if event is not None:
            return event
    return None
