"""A coalescing work queue, as controller-runtime has: one key is never processed twice at once.

Watch events for a FineTuneJob, its Jobs and its Pods all become one key (namespace, name). Many events while a key
waits collapse into one run; an event that arrives while the key runs makes it run once more afterwards. Failures are
retried with exponential backoff; a run may ask to be repeated after a delay.

Keys are served first come, first served, and a key is in the queue at most once: a job whose objects change
constantly costs one run at a time and waits its turn like the others, so it cannot starve them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from finetune_operator import metrics

log = logging.getLogger(__name__)

Key = tuple[str, str]
Worker = Callable[[Key], Awaitable[float | None]]


class WorkQueue:
    def __init__(
        self,
        worker: Worker,
        concurrency: int = 4,
        max_backoff: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        transient: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._worker = worker
        self._transient = transient
        self._clock = clock
        self._enqueued_at: dict[Key, float] = {}
        self.last_progress = clock()
        self._concurrency = concurrency
        self._max_backoff = max_backoff
        self._ready: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: set[Key] = set()
        self._running: set[Key] = set()
        self._again: set[Key] = set()
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._failures: dict[Key, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks = [asyncio.create_task(self._run(), name=f"reconciler-{i}") for i in range(self._concurrency)]

    async def stop(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def add(self, key: Key) -> None:
        if key in self._running:
            self._again.add(key)
        elif key not in self._queued:
            if not self._queued and not self._running:
                self.last_progress = self._clock()  # an idle queue is not a wedged one
            self._queued.add(key)
            self._enqueued_at[key] = self._clock()
            self._ready.put_nowait(key)
            metrics.QUEUE_DEPTH.set(len(self._queued))

    def stalled(self, threshold: float) -> bool:
        """Work is waiting or running, and none has finished for `threshold` seconds: the queue is wedged."""
        busy = bool(self._queued or self._running)
        return busy and self._clock() - self.last_progress > threshold

    def add_threadsafe(self, key: Key) -> None:
        """`add` from another thread (the log followers')."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.add, key)

    def add_after(self, key: Key, delay: float) -> None:
        """Run `key` after `delay` seconds, unless an earlier run is already planned."""
        loop = asyncio.get_running_loop()
        existing = self._timers.get(key)
        if existing is not None and existing.when() <= loop.time() + delay:
            return
        if existing is not None:
            existing.cancel()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def _run(self) -> None:
        while True:
            key = await self._ready.get()
            self._queued.discard(key)
            metrics.QUEUE_DEPTH.set(len(self._queued))
            metrics.QUEUE_WAIT_SECONDS.observe(self._clock() - self._enqueued_at.pop(key, self._clock()))
            self._running.add(key)
            try:
                requeue = await self._worker(key)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                delay = min(self._max_backoff, 0.5 * 2**failures)
                if isinstance(error, self._transient):
                    # An outage (the API server restarting, a timeout): retried, and not a bug to trace.
                    log.warning(
                        "reconcile of %s/%s failed (attempt %d): %s; retrying in %.1fs", *key, failures, error, delay
                    )
                else:
                    log.exception("reconcile of %s/%s failed (attempt %d); retrying in %.1fs", *key, failures, delay)
                self.add_after(key, delay)
            else:
                self._failures.pop(key, None)
                if requeue is not None:
                    self.add_after(key, requeue)
            finally:
                self.last_progress = self._clock()
                self._running.discard(key)
                if key in self._again:
                    self._again.discard(key)
                    self.add(key)
