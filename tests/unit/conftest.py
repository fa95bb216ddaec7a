"""What the unit tests share: the one way to build a FineTuneJobSpec, and an event loop on virtual time."""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from finetune_operator.api import FineTuneJobSpec

TRAIN_DATA = "s3://bucket/train.jsonl"
T = TypeVar("T")


def make_spec(**fields: Any) -> FineTuneJobSpec:
    """A spec with `TRAIN_DATA` as its only input, changed by `fields` (wire or Python names, dicts or models);
    an `input` dict is merged into the default input."""
    inputs = {"train_data": TRAIN_DATA, **fields.pop("input", {})}
    return FineTuneJobSpec.model_validate({"input": inputs, **fields})


class _VirtualTimeSelector(selectors.DefaultSelector):
    """Never waits: when nothing is ready, the loop's clock jumps to the timeout, as if it had passed."""

    def __init__(self, clock: list[float]) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if not ready and timeout is not None:
            self._clock[0] += timeout
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: `loop.time()` starts at 0 and moves only when every task waits, straight to
    the next timer. Backoffs and delays are then exact and cost no real time."""

    def __init__(self) -> None:
        self._virtual_now = [0.0]
        super().__init__(_VirtualTimeSelector(self._virtual_now))

    def time(self) -> float:
        return self._virtual_now[0]


def run_in_virtual_time(scenario: Callable[[], Awaitable[T]]) -> T:
    """Run `scenario()` to its end on a VirtualTimeLoop."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(scenario())  # type: ignore[arg-type]
