"""A piece of the benchmark or the fault run that looks at something every few seconds, on a thread of its own."""

from __future__ import annotations

import threading
from typing import Self


class Periodic:
    """Calls `tick` every `interval` seconds while its `with` block runs, until `tick` returns False."""

    def __init__(self, name: str, interval: float) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def tick(self) -> bool:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self._interval) and self.tick():
            pass

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
