"""Follows each job's rank-0 trainer log on a thread of its own and writes what it says into the status.

One thread a job: a slow or broken log stream only ever delays its own job. Patches are throttled to one every
`progress_interval_seconds` per job, and the last state is always written when the stream ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from finetune_operator import metrics
from finetune_operator.settings import Settings
from finetune_operator.trainer_log import TrainerLog

log = logging.getLogger(__name__)
_RETRIES = 5
# A follow stream that stays silent this long is checked: some kubelets (and kwok) keep it open after the
# container stopped. A trainer prints progress far more often than this.
IDLE_SECONDS = 60.0


class LogApi(Protocol):
    """The API calls a follower makes (kube.KubeApi has them)."""

    def follow_log(self, namespace: str, pod: str, container: str, idle_timeout: float) -> Iterator[str]: ...

    def container_terminated(self, namespace: str, pod: str, container: str) -> bool: ...

    def patch_finetunejob_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class Stream:
    namespace: str
    finetunejob: str
    uid: str
    pod: str
    container: str


class LogFollowers:
    def __init__(self, api: LogApi, settings: Settings, on_end: Callable[[Stream], None]) -> None:
        self._api = api
        self._settings = settings
        self._on_end = on_end
        self._lock = threading.Lock()
        self._active: dict[str, tuple[Stream, threading.Event]] = {}
        self._finished: set[Stream] = set()

    def follow(self, stream: Stream) -> None:
        """Follow `stream` unless it is followed already or was read to its end."""
        with self._lock:
            current = self._active.get(stream.uid)
            if stream in self._finished or (current is not None and current[0] == stream):
                return
            if current is not None:
                current[1].set()
            stop = threading.Event()
            self._active[stream.uid] = (stream, stop)
            metrics.LOG_STREAMS.set(len(self._active))
        thread = threading.Thread(target=self._run, args=(stream, stop), name=f"log-{stream.pod}", daemon=True)
        thread.start()

    def forget(self, uid: str) -> None:
        with self._lock:
            current = self._active.pop(uid, None)
            self._finished = {stream for stream in self._finished if stream.uid != uid}
            metrics.LOG_STREAMS.set(len(self._active))
        if current is not None:
            current[1].set()

    def stop_all(self) -> None:
        with self._lock:
            for _, stop in self._active.values():
                stop.set()
            self._active.clear()
            metrics.LOG_STREAMS.set(0)

    def _run(self, stream: Stream, stop: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                self._read(stream, stop)
                failures = 0
            except Exception as error:  # the stream broke or went quiet: read it again unless the trainer ended
                failures += 1
                log.info("log stream of pod %s ended (%s)", stream.pod, error)
            if failures > _RETRIES or self._stopped_for_good(stream):
                break
            if stop.wait(min(30.0, 2.0**failures)):
                break
        with self._lock:
            if self._active.get(stream.uid, (None, None))[1] is stop:
                del self._active[stream.uid]
                metrics.LOG_STREAMS.set(len(self._active))
                if not stop.is_set():
                    self._finished.add(stream)
        if not stop.is_set():
            self._on_end(stream)

    def _stopped_for_good(self, stream: Stream) -> bool:
        try:
            return self._api.container_terminated(stream.namespace, stream.pod, stream.container)
        except Exception as error:
            log.warning("cannot read pod %s: %s", stream.pod, error)
            return False

    def _read(self, stream: Stream, stop: threading.Event) -> None:
        report = TrainerLog(self._settings.log_tail_lines, self._settings.log_tail_bytes)
        patcher = _ThrottledPatch(lambda: self._patch(stream, report), self._settings.progress_interval_seconds)
        try:
            for line in self._api.follow_log(stream.namespace, stream.pod, stream.container, IDLE_SECONDS):
                if stop.is_set():
                    return
                with patcher.lock:
                    before = report.events
                    report.feed(line, datetime.now(UTC))
                    metrics.TRAINER_EVENTS.inc(report.events - before)
                patcher.request()
        finally:
            patcher.close()
        with patcher.lock:
            if report.changed:
                self._patch(stream, report)

    def _patch(self, stream: Stream, report: TrainerLog) -> None:
        self._api.patch_finetunejob_status(stream.namespace, stream.finetunejob, report.status_patch())
        report.changed = False
        metrics.STATUS_PATCHES.labels(source="log").inc()


class _ThrottledPatch:
    """Runs `patch` at once when the last run is `interval` old, else once when it is: never more often."""

    def __init__(self, patch: Callable[[], None], interval: float) -> None:
        self._patch = patch
        self._interval = interval
        self._last = float("-inf")
        self._timer: threading.Timer | None = None
        self.lock = threading.RLock()

    def request(self) -> None:
        with self.lock:
            if self._timer is not None:
                return
            wait = self._last + self._interval - time.monotonic()
            if wait <= 0:
                self._run()
            else:
                self._timer = threading.Timer(wait, self._due)
                self._timer.daemon = True
                self._timer.start()

    def _due(self) -> None:
        with self.lock:
            self._timer = None
            self._run()

    def _run(self) -> None:
        try:
            self._patch()
        except Exception as error:  # a failed patch is retried with the next one
            log.warning("status patch failed: %s", error)
        self._last = time.monotonic()

    def close(self) -> None:
        with self.lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
