"""What the rank-0 trainer log says: protocol events folded into status fields, plus a bounded log tail.

Pure: feed it lines, ask it for the status patch. The log follower owns the I/O and the throttling. These are
the log follower's status fields (api.status.LOG_FOLLOWER_FIELDS): progress, logs, validationSamples. The output
is not among them: the state machine reports it from the trainer's termination message, once the Job completed.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
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
from finetune_operator.api.status import (
    MAX_EVAL_POINTS,
    MAX_TRAIN_POINTS,
    FineTuneJobStatus,
    LossHistory,
    LossPoint,
    Progress,
    ValidationSample,
)
from finetune_operator.timestamps import timestamp

MAX_SAMPLES = 10
MAX_SAMPLE_CHARS = 2000
MAX_LINE_CHARS = 1000
# Longer lines are log output, never parsed as events: an event is a few hundred bytes (a sample a few KiB).
MAX_EVENT_CHARS = 16 * 1024
_PROGRESS_MARK = '"event":"progress"'


class EventBudget:
    """At most `per_second` events parsed per second (a token bucket that holds one second's worth)."""

    def __init__(self, per_second: float, now: float) -> None:
        self._rate = per_second
        self._tokens = per_second
        self._at = now

    def take(self, now: float) -> bool:
        self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class LossCurve:
    """One loss curve of at most `limit` points, evenly spaced by step.

    A point is kept when it is `spacing` steps past the last kept one; when the curve is full, every other point
    goes and the spacing doubles. The newest point is always shown, so the curve ends where the run is.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._kept: list[LossPoint] = []
        self._newest: LossPoint | None = None
        self._spacing = 1

    def add(self, point: LossPoint) -> None:
        if self._kept and point.step - self._kept[-1].step < self._spacing:
            self._newest = point
            return
        self._kept.append(point)
        self._newest = None
        if len(self._kept) >= self._limit:  # one place stays free for the newest point
            self._kept = self._kept[::2]
            self._spacing *= 2
            if self._kept[-1] is not point:
                self._newest = point

    @property
    def points(self) -> list[LossPoint]:
        return self._kept if self._newest is None else [*self._kept, self._newest]


class TrainerLog:
    """Accumulates one trainer log stream; `changed` says whether the status needs a patch.

    Parsing is bounded: a line longer than MAX_EVENT_CHARS is not parsed, and progress events beyond the
    budget are coalesced (the newest waits for the next token; progress is cumulative, so none is lost).
    """

    def __init__(
        self,
        tail_lines: int,
        tail_bytes: int,
        budget: EventBudget | None = None,
        on_event: Callable[[], object] = lambda: None,
    ) -> None:
        # Called for every event parsed, whether as it came or when a held progress event is read at last.
        self._on_event = on_event
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._tail_bytes = tail_bytes
        self._budget = budget
        self._deferred: str | None = None
        self.progress = Progress()
        self.samples: list[ValidationSample] = []
        self.train_loss = LossCurve(MAX_TRAIN_POINTS)
        self.eval_loss = LossCurve(MAX_EVAL_POINTS)
        self.events = 0
        self.changed = False

    def restore(self, status: FineTuneJobStatus) -> None:
        """Start from what an earlier follower (or operator) already wrote."""
        if status.progress is not None:
            self.progress = status.progress
        if status.loss_history is not None:
            for point in status.loss_history.train:
                self.train_loss.add(point)
            for point in status.loss_history.eval:
                self.eval_loss.add(point)
        self.samples = list(status.validation_samples)[-MAX_SAMPLES:]
        if status.logs:
            self._tail.extend(status.logs.split("\n"))

    def feed(self, line: str, now: datetime, clock: float = 0.0) -> None:
        """One log line; `clock` is a monotonic time for the event budget."""
        line = line.rstrip("\r\n")
        self._tail.append(line if len(line) <= MAX_LINE_CHARS else line[: MAX_LINE_CHARS - 1] + "…")
        self.changed = True
        if len(line) > MAX_EVENT_CHARS or '"ftj"' not in line:
            return
        is_progress = _PROGRESS_MARK in line.replace(" ", "")
        over_budget = self._budget is not None and not self._budget.take(clock)
        if over_budget and is_progress:
            self._deferred = line
            return
        if not is_progress:
            self.flush(now)  # events keep their order: an eval belongs after the progress before it
        self._parse(line, now)

    def flush(self, now: datetime) -> None:
        """Parse the newest progress event the budget held back."""
        if self._deferred is not None:
            line, self._deferred = self._deferred, None
            self._parse(line, now)

    def _parse(self, line: str, now: datetime) -> None:
        event = parse_line(line)
        if event is None:
            return
        if isinstance(event, ProgressEvent):
            self._deferred = None  # a newer progress supersedes a held one
        self.events += 1
        self._on_event()
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
            if event.loss is not None:
                self.train_loss.add(LossPoint(step=event.step, epoch=round(event.epoch, 3), loss=round(event.loss, 4)))
        elif isinstance(event, EvalEvent):
            self._update(eval_loss=_rounded(event.eval_loss), epoch=round(event.epoch, 3), last_heartbeat=heartbeat)
            point = LossPoint(step=self.progress.step or 0, epoch=round(event.epoch, 3), loss=round(event.eval_loss, 4))
            self.eval_loss.add(point)
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
        if self.train_loss.points or self.eval_loss.points:
            history = LossHistory(train=self.train_loss.points, eval=self.eval_loss.points)
            patch["lossHistory"] = history.model_dump(by_alias=True)
        if self.samples:
            patch["validationSamples"] = [sample.model_dump(by_alias=True) for sample in self.samples]
        return patch


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)
