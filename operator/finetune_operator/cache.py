"""What the watches have told the operator: FineTuneJobs, their Jobs and their pods, indexed for reconciles.

A reconcile reads only from here, never from the API server (controller-runtime's informer cache). The watches
stream only the operator's own children (a server-side label selector), so unrelated pods never reach memory.
An object is replaced only by a newer resourceVersion, so a late watch event never undoes the response of the
operator's own write. A periodic relist (`replace_children`) drops what a watch missed while it was down.

Each object is kept in the form reconciles read (`cached_form`, controller-runtime's cache transform): never its
`managedFields` or last-applied annotation, and of a Job or pod only the fields the lifecycle reads, not the pod
template or the container specs. A FineTuneJob keeps its spec and status whole: the state machine, the log
follower and the webhooks start from them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune_operator.conventions import JOB_NAME_LABEL, TRAINER_CONTAINER
from finetune_operator.lifecycle.observation import ChildWarning
from finetune_operator.timestamps import parse_timestamp

Obj = dict[str, Any]
Key = tuple[str, str]
# Warning Events kept per FineTuneJob: the newest few say what is wrong now.
MAX_WARNINGS = 10
MAX_DEPARTED = 8
# The Warning Events that tell a user why a child is stuck and that nothing else shows: the Job controller
# cannot create pods, a volume cannot be attached or mounted. (The scheduler's and the kubelet's other news is
# in the pods' own conditions and container states.)
_TELLING_WARNINGS = frozenset(("FailedCreate", "FailedMount", "FailedAttachVolume"))
# Written by kubectl apply: the whole object again, as a string.
LAST_APPLIED_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration"
# Of a Job and a pod, the fields reconciles read (lifecycle.observed, lifecycle.phase, reconciler).
_JOB_SPEC_FIELDS = ("suspend",)
_POD_SPEC_FIELDS = ("nodeName",)
_POD_STATUS_FIELDS = ("phase", "conditions")
_CONTAINER_STATUS_FIELDS = ("name", "state")


def _picked(obj: Mapping[str, Any], fields: Iterable[str]) -> Obj:
    return {name: obj[name] for name in fields if name in obj}


def _cached_metadata(metadata: Mapping[str, Any]) -> Obj:
    kept = {name: value for name, value in metadata.items() if name != "managedFields"}
    annotations = kept.get("annotations")
    if annotations and LAST_APPLIED_ANNOTATION in annotations:
        kept["annotations"] = {key: value for key, value in annotations.items() if key != LAST_APPLIED_ANNOTATION}
    return kept


def cached_form(kind: str, obj: Mapping[str, Any]) -> Obj:
    """What the cache keeps of a FineTuneJob, Job or Pod (`kind`) as the API server returned it."""
    metadata = _cached_metadata(obj.get("metadata") or {})
    if kind == "FineTuneJob":
        return {**obj, "metadata": metadata}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    if kind == "Job":
        return {"metadata": metadata, "spec": _picked(spec, _JOB_SPEC_FIELDS), "status": status}
    if kind == "Pod":
        kept_status = _picked(status, _POD_STATUS_FIELDS)
        if "containerStatuses" in status:
            kept_status["containerStatuses"] = [
                _picked(container, _CONTAINER_STATUS_FIELDS)
                for container in status["containerStatuses"] or []
                if container.get("name") == TRAINER_CONTAINER
            ]
        return {"metadata": metadata, "spec": _picked(spec, _POD_SPEC_FIELDS), "status": kept_status}
    raise ValueError(f"the cache keeps no {kind}")


def _resource_version(obj: Mapping[str, Any]) -> int:
    # resourceVersions are opaque to clients, but etcd's are increasing integers; one that is not compares lowest.
    value = str(obj.get("metadata", {}).get("resourceVersion", ""))
    return int(value) if value.isdigit() else -1


def _key(obj: Mapping[str, Any]) -> Key:
    metadata = obj["metadata"]
    return metadata.get("namespace", ""), metadata["name"]


def finetunejob_key(child: Mapping[str, Any]) -> Key | None:
    """The FineTuneJob a child of ours belongs to, by its job-name label."""
    metadata = child.get("metadata", {})
    name = (metadata.get("labels") or {}).get(JOB_NAME_LABEL)
    return None if name is None else (metadata.get("namespace", ""), name)


@dataclass
class _Store:
    objects: dict[Key, Obj] = field(default_factory=dict)

    def upsert(self, obj: Obj) -> bool:
        key = _key(obj)
        current = self.objects.get(key)
        if current is not None and _resource_version(current) > _resource_version(obj):
            return False
        self.objects[key] = obj
        return True

    def remove(self, obj: Mapping[str, Any]) -> None:
        key = _key(obj)
        current = self.objects.get(key)
        # A re-created namesake may already be here: remove only the object that was deleted.
        if current is not None and current["metadata"].get("uid") == obj.get("metadata", {}).get("uid"):
            del self.objects[key]


class Cache:
    """Thread-safe: kopf's event loop writes, the reconcile workers read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._finetunejobs = _Store()
        self._jobs = _Store()
        self._pods = _Store()
        # The pods of each FineTuneJob, by its key: a reconcile lists them without scanning every pod.
        self._pods_by_owner: dict[Key, set[Key]] = {}
        self._warnings: dict[Key, list[ChildWarning]] = {}
        # Succeeded pods that were deleted (an eviction racing the exit): their termination message holds the
        # output, which must not vanish with them. Kept until their FineTuneJob goes; like the warnings, kept only
        # for a FineTuneJob in the cache (its children outlive it while the garbage collector removes them).
        self._departed: dict[Key, dict[Key, Obj]] = {}

    # --- writes, from the watches and from the operator's own responses --------------------------------------

    def upsert_finetunejob(self, obj: Obj) -> None:
        kept = cached_form("FineTuneJob", obj)
        with self._lock:
            self._finetunejobs.upsert(kept)

    def remove_finetunejob(self, obj: Mapping[str, Any]) -> None:
        with self._lock:
            self._finetunejobs.remove(obj)
            if _key(obj) not in self._finetunejobs.objects:
                self._departed.pop(_key(obj), None)
                self._warnings.pop(_key(obj), None)

    def replace_finetunejobs(self, finetunejobs: Iterable[Obj]) -> set[Key]:
        """A fresh list of every FineTuneJob: drop what is gone, keep what is newer. Returns the keys touched."""
        listed = {_key(obj): cached_form("FineTuneJob", obj) for obj in finetunejobs}
        with self._lock:
            gone = set(self._finetunejobs.objects) - set(listed)
            for key in gone:
                del self._finetunejobs.objects[key]
                self._departed.pop(key, None)
                self._warnings.pop(key, None)
            changed = {key for key, obj in listed.items() if self._finetunejobs.upsert(obj)}
        return gone | changed

    def phase_counts(self) -> dict[str, int]:
        """FineTuneJobs by status.phase (Pending for those without one yet)."""
        counts: dict[str, int] = {}
        with self._lock:
            for obj in self._finetunejobs.objects.values():
                phase = str((obj.get("status") or {}).get("phase") or "Pending")
                counts[phase] = counts.get(phase, 0) + 1
        return counts

    def upsert_job(self, obj: Obj) -> None:
        kept = cached_form("Job", obj)
        with self._lock:
            self._jobs.upsert(kept)

    def remove_job(self, obj: Mapping[str, Any]) -> None:
        with self._lock:
            self._jobs.remove(obj)

    def upsert_pod(self, obj: Obj) -> None:
        kept = cached_form("Pod", obj)
        with self._lock:
            if self._pods.upsert(kept):
                owner = finetunejob_key(kept)
                if owner is not None:
                    self._pods_by_owner.setdefault(owner, set()).add(_key(kept))

    def remove_pod(self, obj: Mapping[str, Any]) -> None:
        with self._lock:
            last = self._pods.objects.get(_key(obj))
            self._pods.remove(obj)
            owner = finetunejob_key(obj)
            if (
                owner is not None
                and owner in self._finetunejobs.objects
                and last is not None
                and last["status"].get("phase") == "Succeeded"
            ):
                departed = self._departed.setdefault(owner, {})
                departed[_key(last)] = last
                while len(departed) > MAX_DEPARTED:
                    departed.pop(next(iter(departed)))
            if owner is not None and _key(obj) not in self._pods.objects:
                members = self._pods_by_owner.get(owner)
                if members is not None:
                    members.discard(_key(obj))
                    if not members:
                        del self._pods_by_owner[owner]

    def replace_children(self, jobs: Iterable[Obj], pods: Iterable[Obj]) -> set[Key]:
        """A fresh list of every child: drop what is gone, keep what is newer. Returns the FineTuneJobs touched."""
        listed_jobs = {_key(job): cached_form("Job", job) for job in jobs}
        listed_pods = {_key(pod): cached_form("Pod", pod) for pod in pods}
        touched: set[Key] = set()
        with self._lock:
            for store, listed in ((self._jobs, listed_jobs), (self._pods, listed_pods)):
                for key, obj in list(store.objects.items()):
                    if key not in listed:
                        del store.objects[key]
                        owner = finetunejob_key(obj)
                        if owner is not None:
                            touched.add(owner)
                for obj in listed.values():
                    if store.upsert(obj):
                        owner = finetunejob_key(obj)
                        if owner is not None:
                            touched.add(owner)
            self._pods_by_owner = {}
            for key, pod in self._pods.objects.items():
                owner = finetunejob_key(pod)
                if owner is not None:
                    self._pods_by_owner.setdefault(owner, set()).add(key)
        return touched

    def add_warning(self, event: Mapping[str, Any]) -> Key | None:
        """A Warning Event: kept for the FineTuneJob whose Job or pod it is about. Returns that FineTuneJob."""
        if event.get("reason") not in _TELLING_WARNINGS:
            return None
        involved = event.get("involvedObject") or {}
        kind, namespace, name = involved.get("kind"), involved.get("namespace", ""), involved.get("name", "")
        with self._lock:
            store = {"Job": self._jobs, "Pod": self._pods}.get(str(kind))
            child = None if store is None else store.objects.get((namespace, name))
            if child is None or child["metadata"].get("uid") != involved.get("uid"):
                return None
            owner = finetunejob_key(child)
            if owner is None or owner not in self._finetunejobs.objects:
                return None
            stamp = event.get("firstTimestamp") or event.get("eventTime") or event["metadata"]["creationTimestamp"]
            warning = ChildWarning(
                kind=str(kind),
                name=name,
                reason=str(event.get("reason", "")),
                message=str(event.get("message", ""))[:1024],
                first_seen=parse_timestamp(str(stamp)),
            )
            kept = [
                w for w in self._warnings.get(owner, []) if (w.kind, w.name, w.reason) != (kind, name, warning.reason)
            ]
            self._warnings[owner] = [*kept, warning][-MAX_WARNINGS:]
        return owner

    def forget_warnings(self, namespace: str, finetunejob: str) -> None:
        with self._lock:
            self._warnings.pop((namespace, finetunejob), None)

    # --- reads, for the reconcilers ------------------------------------------------------------------------

    def finetunejob(self, namespace: str, name: str) -> Obj | None:
        with self._lock:
            return self._finetunejobs.objects.get((namespace, name))

    def job(self, namespace: str, name: str) -> Obj | None:
        with self._lock:
            return self._jobs.objects.get((namespace, name))

    def pods_of(self, namespace: str, finetunejob: str) -> list[Obj]:
        """The FineTuneJob's pods, and those of them that succeeded before they were deleted."""
        with self._lock:
            keys = self._pods_by_owner.get((namespace, finetunejob), set())
            live = [self._pods.objects[key] for key in sorted(keys) if key in self._pods.objects]
            departed = self._departed.get((namespace, finetunejob), {})
            return live + [pod for key, pod in departed.items() if key not in keys]

    def warnings_of(self, namespace: str, finetunejob: str) -> list[ChildWarning]:
        with self._lock:
            return list(self._warnings.get((namespace, finetunejob), []))

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {
                "finetunejobs": len(self._finetunejobs.objects),
                "jobs": len(self._jobs.objects),
                "pods": len(self._pods.objects),
            }
