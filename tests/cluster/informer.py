"""List, then watch, one kind of object, as client-go's reflector does: for harnesses that follow thousands of objects.

Objects are the API server's JSON as plain dicts; deserialising them into the client's model classes would cost
more than the watching itself when thousands of pods change. A stream that breaks, expires (410 Gone) or stays
silent past its timeout is listed again and watched from there, with a capped backoff while the API server is
away, so an informer outlives API server restarts and freezes. After each list, objects that vanished meanwhile
are reported as deleted.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger(__name__)

Obj = dict[str, Any]
# ADDED, MODIFIED or DELETED, and the object
EventHandler = Callable[[str, Obj], None]
# A list call of the kubernetes client with everything but the query bound (e.g. functools.partial of
# CoreV1Api.list_namespaced_pod with the namespace)
ListCall = Callable[..., Any]

WATCH_SECONDS = 30
# A frozen API server keeps the connection open and sends nothing; give up on it a little after the server's own
# timeout would have ended the stream.
READ_TIMEOUT_SECONDS = WATCH_SECONDS + 15
MAX_BACKOFF_SECONDS = 5.0


class _Expired(Exception):
    """The resourceVersion the watch started from is too old (410 Gone): list again."""


class Informer:
    """Calls `on_event` (on the informer's own thread) for each change of the objects `list_call` selects."""

    def __init__(self, name: str, list_call: ListCall, on_event: EventHandler, *, label_selector: str = "") -> None:
        self.name = name
        self._list_call = list_call
        self._on_event = on_event
        self._label_selector = label_selector
        self._store: dict[str, Obj] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.synced = threading.Event()
        self.relists = 0
        self._thread = threading.Thread(target=self._run, name=f"informer-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=READ_TIMEOUT_SECONDS + 5)

    def objects(self) -> list[Obj]:
        with self._lock:
            return list(self._store.values())

    def wait_synced(self, timeout: float = 60.0) -> None:
        if not self.synced.wait(timeout):
            raise TimeoutError(f"informer {self.name}: no list succeeded in {timeout:.0f}s")

    def _run(self) -> None:
        backoff = 0.25
        while not self._stop.is_set():
            try:
                version = self._relist()
                self.synced.set()
                backoff = 0.25
                while not self._stop.is_set():
                    version = self._watch(version)
            except _Expired:
                continue
            except Exception as error:  # the API server is away or answered badly: list again after a pause
                log.info("informer %s: %s; listing again in %.1fs", self.name, _short(error), backoff)
                self._stop.wait(backoff)
                backoff = min(MAX_BACKOFF_SECONDS, backoff * 2)

    def _relist(self) -> str:
        response = self._list_call(
            label_selector=self._label_selector,
            _preload_content=False,
            _request_timeout=(5, READ_TIMEOUT_SECONDS),
        )
        listed: Obj = json.loads(response.data)
        self.relists += 1
        current = {item["metadata"]["uid"]: item for item in listed.get("items", [])}
        with self._lock:
            gone = [self._store[uid] for uid in self._store.keys() - current.keys()]
            changes = [("MODIFIED" if uid in self._store else "ADDED", item) for uid, item in current.items()]
            self._store = dict(current)
        for item in gone:
            self._on_event("DELETED", item)
        for kind, item in changes:
            self._on_event(kind, item)
        return str(listed["metadata"]["resourceVersion"])

    def _watch(self, version: str) -> str:
        response = self._list_call(
            label_selector=self._label_selector,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _preload_content=False,
            _request_timeout=(5, READ_TIMEOUT_SECONDS),
        )
        try:
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    break
                if not line:
                    continue
                event: Obj = json.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Expired
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                version = obj["metadata"]["resourceVersion"]
                if kind == "BOOKMARK":
                    continue
                uid = obj["metadata"]["uid"]
                with self._lock:
                    if kind == "DELETED":
                        self._store.pop(uid, None)
                    else:
                        self._store[uid] = obj
                self._on_event(kind, obj)
        finally:
            response.close()
            response.release_conn()
        return version


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) < 200 else text[:200] + "..."
