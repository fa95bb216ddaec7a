"""The API server's audit log read back: what one user (the operator) asked of the API server, per FineTuneJob.

`devcluster.py up --audit` writes the log (policy: devcluster.AUDIT_POLICY): every request on FineTuneJobs, Jobs,
pods, Events, Services, ConfigMaps and Leases at level Metadata, and FineTuneJob status writes and Events with
their body (level Request). From it, `operator_usage` counts for each FineTuneJob:

- creates (its Jobs, ConfigMap, Service), deletes, Events, other writes (e.g. a Job's suspend), each only when
  the API server accepted it; refused writes (a 409 Conflict or AlreadyExists, a 404) are counted apart;
- status writes split by writer, told by the field manager each writer sends (`fieldManager` in the request URI,
  kube.STATE_MACHINE_MANAGER and kube.LOG_FOLLOWER_MANAGER): the log follower's are progress writes, the state
  machine's (phase, conditions, ...) status writes, the webhook dispatcher's other writes. A write without a
  known field manager is told by its body: one that touches only the log follower's fields (progress, logs,
  validationSamples, ...) is a progress write;
- no-op writes: status writes that left the status as it was, found by replaying each FineTuneJob's status
  writes in order (JSON merge patches and JSON patches); an operator whose own writes cause more writes shows
  them here;
- reads (get, list) and watches.

Requests are tied to a FineTuneJob by the object's name (the FineTuneJob, or a child named by `naming`), an Event's
involvedObject, or a `finetune.dev/job-name=<name>` label selector; the rest (cluster-wide lists and watches, the
leader-election Lease) are counted apart.
"""

from __future__ import annotations

import json
import urllib.parse
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from finetune_operator.api.status import LOG_FOLLOWER_FIELDS
from finetune_operator.conventions import JOB_NAME_LABEL
from finetune_operator.kube import LOG_FOLLOWER_MANAGER, STATE_MACHINE_MANAGER
from finetune_operator.naming import workload_names

Obj = dict[str, Any]
READ_VERBS = frozenset(("get", "list"))
WRITE_VERBS = frozenset(("create", "update", "patch", "delete", "deletecollection"))
FINAL_STAGES = ("ResponseComplete", "Panic")


@dataclass(frozen=True)
class AuditMark:
    """Where the audit log stood: its file (by inode: the API server renames it `audit-<time>.log` when it rotates
    it at --audit-log-maxsize) and its size."""

    path: Path
    inode: int
    offset: int


def mark_audit_log(path: Path) -> AuditMark:
    stat = path.stat()
    return AuditMark(path, stat.st_ino, stat.st_size)


def audit_files_since(mark: AuditMark) -> list[tuple[Path, int]]:
    """The files that hold what was logged since `mark`, oldest first, each with the offset to read it from: the
    file that was current at the mark (renamed since if the log rotated), the ones rotated after it, the current."""
    # Rotated files are named by the time of their rotation, so their names sort in order.
    files = [*sorted(mark.path.parent.glob(f"{mark.path.stem}-*{mark.path.suffix}")), mark.path]
    for index, candidate in enumerate(files):
        if candidate.stat().st_ino == mark.inode:
            return [(candidate, mark.offset), *((later, 0) for later in files[index + 1 :])]
    raise FileNotFoundError(f"the audit log file current at the mark (inode {mark.inode}) is gone")


def read_audit_events(path: Path, offset: int = 0) -> list[Obj]:
    """The requests logged in `path` from byte `offset` on, one event per request (its last stage)."""
    return _read_events([(path, offset)])


def read_audit_events_since(mark: AuditMark) -> list[Obj]:
    """The requests logged since `mark`, across rotations of the log."""
    return _read_events(audit_files_since(mark))


def _read_events(files: Iterable[tuple[Path, int]]) -> list[Obj]:
    events: dict[str, Obj] = {}
    for path, offset in files:
        with path.open("rb") as handle:
            handle.seek(offset)
            for raw in handle:
                try:
                    event: Obj = json.loads(raw)
                except ValueError:  # a line being written as we read
                    continue
                audit_id = event.get("auditID", "")
                if audit_id not in events or event.get("stage") in FINAL_STAGES:
                    events[audit_id] = event
    return list(events.values())


@dataclass
class Requests:
    """What one FineTuneJob's lifecycle cost in API requests."""

    creates: int = 0
    status_writes: int = 0
    progress_writes: int = 0
    events: int = 0
    deletes: int = 0
    other_writes: int = 0
    reads: int = 0
    watches: int = 0
    # writes the API server refused (409 Conflict, AlreadyExists, 404, ...): not counted in the kinds above
    refused_writes: int = 0
    # status writes that changed nothing: the status was the same before and after
    noop_status_writes: int = 0

    @property
    def writes(self) -> int:
        return self.creates + self.status_writes + self.progress_writes + self.events + self.deletes + self.other_writes

    def add(self, other: Requests) -> None:
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))


@dataclass
class Usage:
    """One user's requests: per FineTuneJob, and those that name none."""

    per_job: dict[str, Requests]
    unattributed: Requests = field(default_factory=Requests)
    lease_writes: int = 0
    lease_reads: int = 0
    # (verb, resource[/subresource], HTTP code) -> count
    by_verb: Counter[tuple[str, str, int]] = field(default_factory=Counter)

    def total(self) -> Requests:
        total = Requests()
        for requests in self.per_job.values():
            total.add(requests)
        total.add(self.unattributed)
        return total

    def most(self, name: str) -> int:
        """The largest count of one kind (a field of Requests) over the FineTuneJobs."""
        return max((getattr(requests, name) for requests in self.per_job.values()), default=0)


class _Attribution:
    """Which FineTuneJob a request is about."""

    def __init__(self, finetunejobs: Iterable[str]) -> None:
        self.finetunejobs = set(finetunejobs)
        self.children: dict[str, str] = {}
        self.pod_prefixes: list[tuple[str, str]] = []
        for name in self.finetunejobs:
            names = workload_names(name)
            for child in (names.config_map, names.validation_job, names.train_job, names.service):
                self.children[child] = name
            # a Job's pods are named <job>-<random> or, Indexed, <job>-<index>-<random>
            self.pod_prefixes += [(f"{names.train_job}-", name), (f"{names.validation_job}-", name)]

    def of(self, event: Obj) -> str | None:
        ref: Obj = event.get("objectRef") or {}
        resource, name = ref.get("resource", ""), ref.get("name") or ""
        if resource == "finetunejobs":
            return name if name in self.finetunejobs else self._from_selector(event)
        if resource == "events":
            involved = (event.get("requestObject") or {}).get("involvedObject") or {}
            owner = involved.get("name") or name.rsplit(".", 1)[0]
            return owner if owner in self.finetunejobs else None
        if resource == "pods" and name:
            return next((ftj for prefix, ftj in self.pod_prefixes if name.startswith(prefix)), None)
        if name:
            return self.children.get(name)
        return self._from_selector(event)

    def _from_selector(self, event: Obj) -> str | None:
        query = urllib.parse.urlsplit(event.get("requestURI", "")).query
        for selector in urllib.parse.parse_qs(query).get("labelSelector", []):
            for term in selector.split(","):
                key, _, value = term.partition("=")
                if key == JOB_NAME_LABEL and value.lstrip("=") in self.finetunejobs:
                    return value.lstrip("=")
        return None


def operator_usage(events: Iterable[Obj], username: str, namespace: str, finetunejobs: Iterable[str]) -> Usage:
    """Count `username`'s requests in `namespace` (and its cluster-wide ones) per FineTuneJob."""
    attribution = _Attribution(finetunejobs)
    usage = Usage(per_job={name: Requests() for name in attribution.finetunejobs})
    status_writes: dict[str, list[Obj]] = {name: [] for name in attribution.finetunejobs}
    mine = [
        event
        for event in events
        if (event.get("user") or {}).get("username") == username
        and (event.get("objectRef") or {}).get("namespace") in (None, namespace)
    ]
    for event in sorted(mine, key=lambda e: e.get("requestReceivedTimestamp", "")):
        ref: Obj = event.get("objectRef") or {}
        verb, resource = event.get("verb", ""), ref.get("resource", "")
        subresource = ref.get("subresource") or ""
        code = int((event.get("responseStatus") or {}).get("code", 0))
        usage.by_verb[(verb, f"{resource}/{subresource}" if subresource else resource, code)] += 1
        if resource == "leases":
            if verb in WRITE_VERBS:
                usage.lease_writes += 1
            else:
                usage.lease_reads += 1
            continue
        owner = attribution.of(event)
        requests = usage.per_job[owner] if owner is not None else usage.unattributed
        if verb in WRITE_VERBS and code >= 400:
            requests.refused_writes += 1
        elif verb in READ_VERBS:
            requests.reads += 1
        elif verb == "watch":
            requests.watches += 1
        elif verb in ("delete", "deletecollection"):
            requests.deletes += 1
        elif resource == "events":
            requests.events += 1
        elif verb == "create":
            requests.creates += 1
        elif resource == "finetunejobs" and subresource == "status":
            writer = status_writer(event)
            if writer == "progress":
                requests.progress_writes += 1
            elif writer == "status":
                requests.status_writes += 1
            else:
                requests.other_writes += 1
            if owner is not None:
                status_writes[owner].append(event)
        else:
            requests.other_writes += 1
    for name, writes in status_writes.items():
        usage.per_job[name].noop_status_writes = count_noop_writes(writes)
    return usage


def field_manager(event: Obj) -> str | None:
    query = urllib.parse.urlsplit(event.get("requestURI", "")).query
    managers = urllib.parse.parse_qs(query).get("fieldManager")
    return managers[0] if managers else None


def status_writer(event: Obj) -> str:
    """ "status" (the state machine), "progress" (the log follower) or "other" (another writer of status)."""
    manager = field_manager(event)
    if manager == STATE_MACHINE_MANAGER:
        return "status"
    if manager == LOG_FOLLOWER_MANAGER:
        return "progress"
    if manager is not None and manager.startswith(STATE_MACHINE_MANAGER):
        return "other"
    fields = _status_fields(event.get("requestObject"))
    return "progress" if fields and fields <= LOG_FOLLOWER_FIELDS else "status"


def _status_fields(body: Any) -> set[str]:
    """The status fields a write's body sets: a merge patch's status keys, or a JSON patch's /status/<key> paths."""
    if isinstance(body, dict) and isinstance(body.get("status"), dict):
        return set(body["status"])
    if isinstance(body, list):
        return {
            op["path"].split("/")[2]
            for op in body
            if isinstance(op, dict) and str(op.get("path", "")).startswith("/status/") and op.get("op") != "test"
        }
    return set()


def count_noop_writes(writes: Iterable[Obj]) -> int:
    """Status writes (in order, with their bodies) that left the status unchanged. Failed writes change nothing
    and are not counted; a write whose body was not logged counts as a change."""
    status: Any = {}
    noop = 0
    for event in writes:
        code = int((event.get("responseStatus") or {}).get("code", 0))
        body = event.get("requestObject")
        if not 200 <= code < 300 or body is None:
            continue
        if isinstance(body, list):
            after = json_patch_status(status, body)
        elif isinstance(body, dict) and isinstance(body.get("status"), dict):
            after = merge_patch(status, body["status"]) if event.get("verb") == "patch" else body["status"]
        else:
            continue
        if after == status:
            noop += 1
        status = after
    return noop


def json_patch_status(status: Obj, operations: list[Any]) -> Obj:
    """RFC 6902 add / replace / remove under /status (tests are the API server's business)."""
    result: Obj = json.loads(json.dumps(status))
    for op in operations:
        path = str(op.get("path", "")) if isinstance(op, dict) else ""
        if not path.startswith("/status/") or op.get("op") not in ("add", "replace", "remove"):
            continue
        *parents, leaf = [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[2:]]
        target = result
        for part in parents:
            target = target.setdefault(part, {})
        if op["op"] == "remove":
            target.pop(leaf, None)
        else:
            target[leaf] = op.get("value")
    return result


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: what the API server does with a merge patch of the status."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
