"""What the rank-0 trainer log says: protocol events folded into status fields, plus a bounded log tail.

Pure: feed it lines, ask it for the status patch. The log follower owns the I/O and the throttling. These are
the log follower's status fields (api.status.LOG_FOLLOWER_FIELDS): progress, logs, validationSamples. The output
is not among them: the state machine reports it from the trainer's termination message, once the Job completed.
"""

from __future__ import annotations

import math
from collections import deque
from datetime import datetime
from typing import Any

from finetune_contract.protocol import (
    EvalEvent,
    OutputEvent,
    ProgressEvent,
    SampleEvent,
    StartEvent,
    parse_line,
)
from finetune_operator.api.status import Progress, ValidationSample
from finetune_operator.timestamps import timestamp

MAX_SAMPLES = 10
MAX_SAMPLE_CHARS = 2000
MAX_LINE_CHARS = 1000


class TrainerLog:
    """Accumulates one trainer log stream; `changed` says whether the status needs a patch."""

    def __init__(self, tail_lines: int, tail_bytes: int) -> None:
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._tail_bytes = tail_bytes
        self.progress = Progress()
        self.samples: list[ValidationSample] = []
        self.events = 0
        self.changed = False

    def feed(self, line: str, now: datetime) -> None:
        line = line.rstrip("\r\n")
        self._tail.append(line if len(line) <= MAX_LINE_CHARS else line[: MAX_LINE_CHARS - 1] + "…")
        self.changed = True
        event = parse_line(line)
        if event is None:
            return
        self.events += 1
        heartbeat = timestamp(now)
        if isinstance(event, StartEvent):
            self._update(
                total_steps=event.total_steps,
                total_epochs=event.epochs,
                step=0,
                percent=0,
                last_heartbeat=heartbeat,
            )
        elif isinstance(event, ProgressEvent):
            total = max(event.total_steps, 1)
            self._update(
                step=event.step,
                total_steps=event.total_steps,
                epoch=round(event.epoch, 3),
                percent=min(100, math.floor(100 * event.step / total)),
                train_loss=_rounded(event.loss),
                learning_rate=event.learning_rate,
                tokens_per_second=_rounded(event.tokens_per_second, 1),
                eta_seconds=None if event.eta_seconds is None else math.ceil(event.eta_seconds),
                last_heartbeat=heartbeat,
            )
        elif isinstance(event, EvalEvent):
            self._update(eval_loss=_rounded(event.eval_loss), epoch=round(event.epoch, 3), last_heartbeat=heartbeat)
        elif isinstance(event, SampleEvent):
            sample = ValidationSample(
                epoch=event.epoch,
                prompt=event.prompt[:MAX_SAMPLE_CHARS],
                completion=event.completion[:MAX_SAMPLE_CHARS],
            )
            self.samples = [*self.samples, sample][-MAX_SAMPLES:]
        elif isinstance(event, OutputEvent):
            # The weights are written: training is complete whether or not the last step logged progress.
            self._update(percent=100, step=self.progress.total_steps, last_heartbeat=heartbeat)

    def _update(self, **fields: Any) -> None:
        present = {key: value for key, value in fields.items() if value is not None}
        self.progress = self.progress.model_copy(update=present)

    @property
    def tail(self) -> str:
        """The last lines, at most `tail_bytes` of UTF-8, cut at a line boundary."""
        kept: list[str] = []
        size = 0
        for line in reversed(self._tail):
            size += len(line.encode()) + 1
            if size > self._tail_bytes:
                break
            kept.append(line)
        return "\n".join(reversed(kept))

    def status_patch(self) -> dict[str, Any]:
        """The status fields this log owns, as a JSON merge patch (camelCase)."""
        patch: dict[str, Any] = {"logs": self.tail}
        progress = self.progress.model_dump(by_alias=True, exclude_none=True)
        if progress:
            patch["progress"] = progress
        if self.samples:
            patch["validationSamples"] = [sample.model_dump(by_alias=True) for sample in self.samples]
        return patch


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)
