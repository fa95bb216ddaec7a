"""The watch cache keeps each object in the form reconciles read: every field they read, few bytes per job.

The objects in tests/unit/objects are a FineTuneJob and its Jobs and pods as the API server returned them (a local
cluster run of the simulated trainer, `managedFields` included): once while it trained, once after it succeeded.
"""

from __future__ import annotations

import copy
import gc
import json
import tracemalloc
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from finetune_operator import cache as cache_module
from finetune_operator.cache import LAST_APPLIED_ANNOTATION, Cache, cached_form
from finetune_operator.kube import KubeApi
from finetune_operator.lifecycle import Observation, decide
from finetune_operator.lifecycle.lost_pods import lost_pods
from finetune_operator.log_follower import LogFollowers
from finetune_operator.reconciler import Reconciler
from finetune_operator.settings import Settings
from finetune_operator.timestamps import parse_timestamp, timestamp

OBJECTS = Path(__file__).parent / "objects"
STATES = ("running", "succeeded")
# Where the run that left these objects had its weights written (the operator's default destination then).
DESTINATION = "s3://sim"
# What the cache may hold per FineTuneJob (itself, its two Jobs, its two pods), in bytes: the objects kept whole
# take about 190 KB, the cached form about 50 KB.
MOST_BYTES_PER_JOB = 64 * 1024
_MISSING = object()
Path_ = tuple[str | int, ...]


def load(state: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads((OBJECTS / f"finetunejob-{state}.json").read_text())["items"]
    return items


def of_kind(items: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [item for item in items if item["kind"] == kind]


def train_pod(items: list[dict[str, Any]]) -> dict[str, Any]:
    return next(pod for pod in of_kind(items, "Pod") if pod["metadata"]["name"].startswith("ftj-1-train"))


def trainer_status(pod: dict[str, Any]) -> dict[str, Any]:
    return next(status for status in pod["status"]["containerStatuses"] if status["name"] == "trainer")


# --- states a reconcile meets, made from the real objects -------------------------------------------------


def oom_killed(items: list[dict[str, Any]]) -> None:
    pod = train_pod(items)
    pod["status"]["phase"] = "Failed"
    started = trainer_status(pod)["state"].get("running", {}).get("startedAt", "2026-11-28T11:56:00Z")
    trainer_status(pod)["state"] = {
        "terminated": {"exitCode": 137, "reason": "OOMKilled", "startedAt": started, "finishedAt": started}
    }
    job = next(job for job in of_kind(items, "Job") if job["metadata"]["name"].endswith("-train"))
    job["status"]["conditions"] = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]


def unschedulable(items: list[dict[str, Any]]) -> None:
    pod = train_pod(items)
    pod["spec"].pop("nodeName", None)
    pod["status"] = {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": '0/3 nodes are available: persistentvolumeclaim "data" not found.',
            }
        ],
    }
    pod["metadata"]["creationTimestamp"] = "2020-01-01T00:00:00Z"


def image_pull_backoff(items: list[dict[str, Any]]) -> None:
    pod = train_pod(items)
    pod["status"]["phase"] = "Pending"
    trainer_status(pod)["state"] = {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}
    pod["metadata"]["creationTimestamp"] = "2020-01-01T00:00:00Z"


def pulling_image(items: list[dict[str, Any]]) -> None:
    pod = train_pod(items)
    pod["status"]["phase"] = "Pending"
    trainer_status(pod)["state"] = {"waiting": {"reason": "ContainerCreating"}}


def evicted(items: list[dict[str, Any]]) -> None:
    pod = train_pod(items)
    pod["status"]["conditions"].append(
        {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI", "message": "Eviction API"}
    )


def lost_node(items: list[dict[str, Any]]) -> None:
    pod = train_pod(items)
    pod["metadata"]["deletionTimestamp"] = "2020-01-01T00:00:00Z"
    pod["metadata"]["deletionGracePeriodSeconds"] = 30


def suspended(items: list[dict[str, Any]]) -> None:
    job = next(job for job in of_kind(items, "Job") if job["metadata"]["name"].endswith("-train"))
    job["spec"]["suspend"] = True


def applied_with_kubectl(items: list[dict[str, Any]]) -> None:
    finetunejob = of_kind(items, "FineTuneJob")[0]
    finetunejob["metadata"].setdefault("annotations", {})[LAST_APPLIED_ANNOTATION] = json.dumps(finetunejob)


CHANGES: dict[str, Callable[[list[dict[str, Any]]], None]] = {
    "as-is": lambda items: None,
    "oom-killed": oom_killed,
    "unschedulable": unschedulable,
    "image-pull-backoff": image_pull_backoff,
    "pulling-image": pulling_image,
    "evicted": evicted,
    "lost-node": lost_node,
    "suspended": suspended,
    "applied-with-kubectl": applied_with_kubectl,
}
SCENARIOS = [(state, change) for state in ("running", "trainer-finished") for change in CHANGES]


def scenario(state: str, change: str) -> list[dict[str, Any]]:
    """The objects of `state` changed by `change`; "trainer-finished": the children succeeded, and the
    FineTuneJob's status is still the running one (the reconcile that sees the end)."""
    if state == "trainer-finished":
        items = load("succeeded")
        of_kind(items, "FineTuneJob")[0]["status"] = of_kind(load("running"), "FineTuneJob")[0]["status"]
    else:
        items = load(state)
    CHANGES[change](items)
    return items


# --- what a reconcile reads --------------------------------------------------------------------------------


class Reads(Mapping[str, Any]):
    """An object that writes down each field read from it (its path and what it held) into `log`."""

    def __init__(self, data: Mapping[str, Any], log: list[tuple[Path_, Any]], path: Path_ = ()) -> None:
        self._data = data
        self._log = log
        self._path = path

    def __getitem__(self, key: str) -> Any:
        path = (*self._path, key)
        if key not in self._data:
            self._log.append((path, _MISSING))
            raise KeyError(key)
        return _wrapped(self._data[key], self._log, path)

    def __iter__(self) -> Iterator[str]:
        self._log.append(((*self._path, "<keys>"), sorted(self._data)))
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def _wrapped(value: Any, log: list[tuple[Path_, Any]], path: Path_) -> Any:
    if isinstance(value, Mapping):
        return Reads(value, log, path)
    if isinstance(value, list):
        log.append(((*path, "<len>"), len(value)))
        return [_wrapped(item, log, (*path, index)) for index, item in enumerate(value)]
    log.append((path, value))
    return value


def _at(obj: Any, path: Path_) -> Any:
    for step in path:
        if step == "<len>":
            return len(obj)
        if step == "<keys>":
            return sorted(obj)
        if isinstance(step, int):
            obj = obj[step] if step < len(obj) else _MISSING
        else:
            obj = obj.get(step, _MISSING) if isinstance(obj, Mapping) else _MISSING
        if obj is _MISSING:
            return _MISSING
    return obj


def observe(items: list[dict[str, Any]], now: datetime, keep_whole: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The Observation a reconcile of the FineTuneJob makes from a cache filled with `items`."""
    with monkeypatch.context() as patched:
        if keep_whole:
            patched.setattr(cache_module, "cached_form", lambda kind, obj: obj)
        cache = Cache()
        for item in copy.deepcopy(items):
            {"FineTuneJob": cache.upsert_finetunejob, "Job": cache.upsert_job, "Pod": cache.upsert_pod}[item["kind"]](
                item
            )
    reconciler = Reconciler(
        cast(KubeApi, None),
        cache,
        Settings(default_destination=DESTINATION),
        cast(LogFollowers, None),
        clock=lambda: now,
    )
    metadata = items[0]["metadata"]
    finetunejob = cache.finetunejob(metadata["namespace"], metadata["name"])
    assert finetunejob is not None
    observation, _ = reconciler._observe(finetunejob)  # the reconcile's own first step
    return observation


def children_read(observation: Observation, log: list[tuple[Path_, Any]]) -> Observation:
    """`observation` with its Jobs and pods writing down what is read from them (by the lifecycle, and by the
    reconciler's look for pods lost with their node)."""

    def wrap(obj: Any, name: str) -> Any:
        return None if obj is None else Reads(obj, log, (name,))

    return replace(
        observation,
        validation_job=wrap(observation.validation_job, "validation_job"),
        train_job=wrap(observation.train_job, "train_job"),
        validation_pods=[wrap(pod, f"validation_pods[{i}]") for i, pod in enumerate(observation.validation_pods)],
        train_pods=[wrap(pod, f"train_pods[{i}]") for i, pod in enumerate(observation.train_pods)],
    )


def observe_both_forms(
    state: str, change: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[Observation, Observation, datetime]:
    """A scenario's observation from the whole objects and from their cached form, 20 minutes into the job."""
    items = scenario(state, change)
    now = parse_timestamp(items[0]["metadata"]["creationTimestamp"]) + timedelta(minutes=20)
    whole = observe(items, now, keep_whole=True, monkeypatch=monkeypatch)
    return whole, observe(items, now, keep_whole=False, monkeypatch=monkeypatch), now


@pytest.mark.parametrize(("state", "change"), SCENARIOS)
def test_a_reconcile_decides_the_same_from_the_cached_form_as_from_the_whole_objects(
    state: str, change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole, cached, _ = observe_both_forms(state, change, monkeypatch)
    assert whole.train_pods  # the children were found
    assert whole.validation_job is not None
    assert decide(cached) == decide(whole)


@pytest.mark.parametrize(("state", "change"), SCENARIOS)
def test_the_cached_form_keeps_every_field_the_lifecycle_and_the_lost_pod_check_read(
    state: str, change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole, cached, now = observe_both_forms(state, change, monkeypatch)
    log: list[tuple[Path_, Any]] = []
    read = children_read(whole, log)
    decide(read)
    lost_pods([*read.validation_pods, *read.train_pods], now)
    assert log, "the lifecycle read nothing of the children"
    for path, value in log:
        head, *rest = path
        name, _, index = str(head).partition("[")
        obj = getattr(cached, name)
        if index:
            obj = obj[int(index.rstrip("]"))]
        assert _at(obj, tuple(rest)) == value, f"{state}/{change}: {path} is not kept as it was"


def test_the_cached_form_drops_managed_fields_and_the_last_applied_configuration() -> None:
    items = load("succeeded")
    applied_with_kubectl(items)
    for item in items:
        assert item["metadata"]["managedFields"]
        kept = cached_form(item["kind"], item)
        assert "managedFields" not in kept["metadata"]
        assert LAST_APPLIED_ANNOTATION not in (kept["metadata"].get("annotations") or {})
    finetunejob = of_kind(items, "FineTuneJob")[0]
    kept = cached_form("FineTuneJob", finetunejob)
    assert (kept["spec"], kept["status"]) == (finetunejob["spec"], finetunejob["status"])


def test_a_cached_finetunejob_with_its_jobs_and_pods_takes_a_bounded_number_of_bytes() -> None:
    jobs = 100
    texts = {state: (OBJECTS / f"finetunejob-{state}.json").read_text() for state in STATES}
    for state, text in texts.items():
        cache = Cache()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(jobs):
                # Each job parsed on its own, as each watch event is: no string is shared between two jobs.
                for item in json.loads(text.replace('"ml-team"', f'"ml-team-{i}"'))["items"]:
                    {"FineTuneJob": cache.upsert_finetunejob, "Job": cache.upsert_job, "Pod": cache.upsert_pod}[
                        item["kind"]
                    ](item)
            gc.collect()
            per_job = (tracemalloc.get_traced_memory()[0] - before) / jobs
        finally:
            tracemalloc.stop()
        assert cache.sizes() == {"finetunejobs": jobs, "jobs": 2 * jobs, "pods": 2 * jobs}
        assert per_job <= MOST_BYTES_PER_JOB, f"{state}: {per_job:.0f} bytes per cached job"


def test_what_is_kept_for_a_finetunejob_goes_with_it_even_when_its_children_go_later() -> None:
    items = load("succeeded")
    cache = Cache()
    finetunejob = of_kind(items, "FineTuneJob")[0]
    cache.upsert_finetunejob(finetunejob)
    for item in of_kind(items, "Job"):
        cache.upsert_job(item)
    for item in of_kind(items, "Pod"):
        cache.upsert_pod(item)
    pod = train_pod(items)
    namespace, name = finetunejob["metadata"]["namespace"], finetunejob["metadata"]["name"]
    stamp = timestamp(datetime(2026, 11, 28, 12, 0, tzinfo=UTC))
    warning = {
        "reason": "FailedMount",
        "message": "volume not found",
        "firstTimestamp": stamp,
        "metadata": {"creationTimestamp": stamp},
        "involvedObject": {
            "kind": "Pod",
            "namespace": namespace,
            "name": pod["metadata"]["name"],
            "uid": pod["metadata"]["uid"],
        },
    }
    # The FineTuneJob goes first; the garbage collector removes its children after it.
    cache.remove_finetunejob(finetunejob)
    assert cache.add_warning(warning) is None
    for item in of_kind(items, "Pod"):
        cache.remove_pod(item)
    for item in of_kind(items, "Job"):
        cache.remove_job(item)
    assert cache.pods_of(namespace, name) == []
    assert cache.warnings_of(namespace, name) == []
    assert cache.sizes() == {"finetunejobs": 0, "jobs": 0, "pods": 0}
