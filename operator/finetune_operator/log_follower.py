"""Follows each running job's rank-0 trainer log and writes what it says into the status (progress, logs, samples).

Each followed log is one asyncio task: no thread of its own. A stream that breaks (an API server or kubelet
outage of any length) is opened again from where it stopped (`LogCursor`), with backoff, until the container has
stopped; it is never given up for good and never read twice. A follower started by a new operator (a restart, a
new leader) begins where the status says the last one got to. Patches are throttled to one every
`progress_interval_seconds` per job, and the last state is always written when the stream ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from finetune_operator import metrics
from finetune_operator.api.status import FineTuneJobStatus
from finetune_operator.kube import Conflict
from finetune_operator.log_cursor import LogCursor, split_timestamp
from finetune_operator.settings import Settings
from finetune_operator.trainer_log import EventBudget, TrainerLog

log = logging.getLogger(__name__)
# A follow stream that stays silent this long is checked: some kubelets (and kwok) keep it open after the
# container stopped. A trainer prints progress far more often than this.
IDLE_SECONDS = 20.0
MAX_BACKOFF_SECONDS = 30.0


class LogSource(Protocol):
    """Where logs come from (pod_logs.PodLogs)."""

    def lines(
        self,
        namespace: str,
        pod: str,
        container: str,
        since_time: str | None,
        idle_timeout: float,
        *,
        follow: bool = True,
    ) -> AsyncIterator[str]: ...

    async def container_terminated(self, namespace: str, pod: str, container: str) -> bool: ...


class StatusSink(Protocol):
    """Where the follower's fields go (kube.KubeApi); raises kube.Conflict when the FineTuneJob is gone."""

    def patch_log_fields(self, namespace: str, name: str, uid: str, fields: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class Stream:
    namespace: str
    finetunejob: str
    uid: str
    pod: str
    container: str


class LogFollowers:
    """Starts, restarts and stops the followers. `follow` and `forget` may be called from any thread."""

    def __init__(
        self,
        source: LogSource,
        sink: StatusSink,
        settings: Settings,
        on_end: Callable[[Stream], None],
        loop: asyncio.AbstractEventLoop,
        *,
        backoff: Callable[[int], float] = lambda failures: min(MAX_BACKOFF_SECONDS, 0.5 * 2**failures),
    ) -> None:
        self._backoff = backoff
        self._source = source
        self._sink = sink
        self._settings = settings
        self._on_end = on_end
        self._loop = loop
        self._active: dict[str, tuple[Stream, asyncio.Task[None]]] = {}
        self._finished: set[Stream] = set()

    def follow(self, stream: Stream, status: FineTuneJobStatus) -> None:
        """Follow `stream` unless it is followed already or was read to its end; `status` is where to resume."""
        self._loop.call_soon_threadsafe(self._follow, stream, status)

    def forget(self, uid: str) -> None:
        self._loop.call_soon_threadsafe(self._forget, uid)

    @property
    def active(self) -> int:
        return len(self._active)

    async def stop_all(self) -> None:
        tasks = [task for _, task in self._active.values()]
        self._active.clear()
        metrics.LOG_STREAMS.set(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _follow(self, stream: Stream, status: FineTuneJobStatus) -> None:
        current = self._active.get(stream.uid)
        if stream in self._finished or (current is not None and current[0] == stream):
            return
        if current is not None:
            current[1].cancel()  # a newer rank-0 pod (a retry) replaces the old stream
        task = self._loop.create_task(self._run(stream, status), name=f"log-{stream.namespace}/{stream.pod}")
        self._active[stream.uid] = (stream, task)
        metrics.LOG_STREAMS.set(len(self._active))

    def _forget(self, uid: str) -> None:
        current = self._active.pop(uid, None)
        self._finished = {stream for stream in self._finished if stream.uid != uid}
        metrics.LOG_STREAMS.set(len(self._active))
        if current is not None:
            current[1].cancel()

    async def _run(self, stream: Stream, status: FineTuneJobStatus) -> None:
        settings = self._settings
        report = TrainerLog(
            settings.log_tail_lines,
            settings.log_tail_bytes,
            EventBudget(settings.log_events_per_second, time.monotonic()),
            on_event=metrics.TRAINER_EVENTS.inc,
        )
        report.restore(status)
        report.changed = False
        progress = status.progress
        cursor = LogCursor.starting_at(progress.last_heartbeat if progress is not None else None)
        throttle = _Throttle(lambda: self._patch(stream, report), settings.progress_interval_seconds)
        failures = 0
        follow = True
        try:
            while True:
                try:
                    await self._read(stream, report, cursor, throttle, follow=follow)
                except (asyncio.CancelledError, _Gone):
                    raise
                except Exception as error:  # the stream broke or went quiet: read on
                    failures += 1
                    log.info("log stream of pod %s/%s ended (%s)", stream.namespace, stream.pod, error or type(error))
                    if follow and await self._stopped_for_good(stream):
                        # It may have broken before the end of a log that is now complete: read the rest once,
                        # without following, so that it ends at the end of the log.
                        follow = False
                else:
                    failures = 0
                    if not follow or await self._stopped_for_good(stream):
                        break
                cursor.rewind()
                await asyncio.sleep(self._backoff(failures))
            report.flush(datetime.now(UTC))
            if report.changed:
                await self._patch(stream, report)
        except _Gone:
            log.info("FineTuneJob %s/%s is gone: its log is no longer followed", stream.namespace, stream.finetunejob)
            return
        finally:
            throttle.close()
            if self._active.get(stream.uid, (None, None))[0] == stream:
                del self._active[stream.uid]
                metrics.LOG_STREAMS.set(len(self._active))
        self._finished.add(stream)
        self._on_end(stream)

    async def _read(
        self, stream: Stream, report: TrainerLog, cursor: LogCursor, throttle: _Throttle, *, follow: bool
    ) -> None:
        lines = self._source.lines(
            stream.namespace, stream.pod, stream.container, cursor.since_time(), IDLE_SECONDS, follow=follow
        )
        async for raw in lines:
            stamp, text = split_timestamp(raw)
            if not cursor.admit(stamp):
                continue
            report.feed(text, datetime.now(UTC), time.monotonic())
            throttle.request()
        throttle.request()

    async def _stopped_for_good(self, stream: Stream) -> bool:
        try:
            return await self._source.container_terminated(stream.namespace, stream.pod, stream.container)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.info("cannot read pod %s/%s: %s", stream.namespace, stream.pod, error)
            return False

    async def _patch(self, stream: Stream, report: TrainerLog) -> None:
        report.flush(datetime.now(UTC))
        fields = report.status_patch()
        report.changed = False
        try:
            await asyncio.to_thread(
                self._sink.patch_log_fields, stream.namespace, stream.finetunejob, stream.uid, fields
            )
        except Conflict as error:
            raise _Gone() from error
        except Exception as error:  # an outage: the next patch carries the same state
            report.changed = True
            log.warning("status patch of %s/%s failed: %s", stream.namespace, stream.finetunejob, error)
            return
        metrics.STATUS_PATCHES.labels(source="log").inc()


class _Gone(Exception):
    """The FineTuneJob this stream belonged to was deleted or re-created."""


class _Throttle:
    """Runs `patch` when asked, at most once per `interval`; a request during the wait is served by that run."""

    def __init__(self, patch: Callable[[], Awaitable[None]], interval: float) -> None:
        self._patch = patch
        self._interval = interval
        self._last = float("-inf")
        self._dirty = False
        self._pending: asyncio.Task[None] | None = None
        self._failure: _Gone | None = None

    def request(self) -> None:
        if self._failure is not None:
            raise self._failure
        self._dirty = True
        if self._pending is None or self._pending.done():
            self._pending = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._dirty:
            wait = self._last + self._interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._dirty = False
            self._last = time.monotonic()
            try:
                await self._patch()
            except _Gone as gone:
                self._failure = gone
                return

    def close(self) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
        self._pending = None
