"""One reconcile of one FineTuneJob: observe (from the watch cache), decide (lifecycle), act. Safe to repeat.

Reads come from the cache the watches keep; the API server sees only writes. A child is this FineTuneJob's only
when its controller ownerReference carries the FineTuneJob's UID (a pod: its Job's UID): a namesake is never
adopted. The status write is tied to the resourceVersion it was computed from, so it never lands on a newer
state or on a re-created namesake; a refused write is computed again from a fresh read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from finetune_operator import lifecycle, metrics
from finetune_operator.api.spec import FineTuneJobSpec
from finetune_operator.api.status import STATE_MACHINE_FIELDS, ErrorInfo, FineTuneJobStatus, Phase
from finetune_operator.cache import Cache
from finetune_operator.conventions import COMPONENT_LABEL, KUEUE_QUEUE_LABEL, TRAINER_CONTAINER, Component
from finetune_operator.kube import Conflict, KubeApi, Obj, Rejected
from finetune_operator.lifecycle import Action, Decision, Observation
from finetune_operator.lifecycle.lost_pods import failed_status_patch, lost_pods
from finetune_operator.lifecycle.observed import completion_index, disrupted_pods, newest_first
from finetune_operator.log_follower import LogFollowers, Stream
from finetune_operator.naming import WorkloadNames, workload_names
from finetune_operator.resolution import InvalidSpec, Owner, RunInfo, resolve_run
from finetune_operator.settings import Settings
from finetune_operator.timestamps import timestamp
from finetune_operator.workload import build_config_map, build_service, build_train_job, build_validation_job

log = logging.getLogger(__name__)
# A child's name held by another object is looked at again this often (its deletion may send no event to us).
NAME_CONFLICT_RETRY_SECONDS = 10.0
# A status write refused because the FineTuneJob changed is computed again this soon (the watch brings the change).
CONFLICT_RETRY_SECONDS = 1.0


def controlled_by(obj: Mapping[str, Any], uid: str) -> bool:
    """Whether `obj`'s controller ownerReference is the object with `uid`."""
    references = obj.get("metadata", {}).get("ownerReferences") or []
    return any(reference.get("controller") and reference.get("uid") == uid for reference in references)


def describe(obj: Mapping[str, Any], kind: str) -> str:
    metadata = obj.get("metadata", {})
    controllers = [ref for ref in metadata.get("ownerReferences") or [] if ref.get("controller")]
    owner = (
        f"{controllers[0]['kind']} {controllers[0].get('name')} ({controllers[0]['uid']})" if controllers else "none"
    )
    return f"{kind} {metadata.get('namespace')}/{metadata.get('name')} (controller: {owner})"


@dataclass
class _Outcome:
    """What acting found out that the state machine must hear about."""

    name_conflicts: list[str] = field(default_factory=list)
    rejected: ErrorInfo | None = None


class Reconciler:
    def __init__(
        self,
        api: KubeApi,
        cache: Cache,
        settings: Settings,
        followers: LogFollowers,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._api = api
        self._cache = cache
        self._settings = settings
        self._followers = followers
        self._clock = clock or (lambda: datetime.now(UTC))
        # Disrupted trainer pods already counted and announced, per FineTuneJob (its UID, the pods' UIDs), kept
        # while it runs: dropped when it finishes or goes, so a deleted job leaves nothing behind.
        self._disruptions: dict[tuple[str, str], tuple[str, frozenset[str]]] = {}
        # Reconciles block on API calls: they get threads of their own, as many as run at once (settings.workers),
        # not asyncio's default pool (a few threads on a small node, shared with the log followers' writes).
        self._executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="reconcile")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def reconcile(self, key: tuple[str, str]) -> float | None:
        with metrics.RECONCILE_SECONDS.time():
            try:
                loop = asyncio.get_running_loop()
                requeue = await loop.run_in_executor(self._executor, self.reconcile_blocking, *key)
            except Exception:
                metrics.RECONCILES.labels(result="error").inc()
                raise
        metrics.RECONCILES.labels(result="ok").inc()
        return requeue

    def reconcile_blocking(self, namespace: str, name: str) -> float | None:
        finetunejob = self._cache.finetunejob(namespace, name)
        if finetunejob is None or finetunejob["metadata"].get("deletionTimestamp"):
            self._disruptions.pop((namespace, name), None)
            if finetunejob is not None:
                self._followers.forget(finetunejob["metadata"]["uid"])
            return None
        with self._api.counting() as requests:
            requeue = self._reconcile(finetunejob)
        metrics.RECONCILE_API_REQUESTS.observe(requests.count)
        return requeue

    def _reconcile(self, finetunejob: Obj) -> float | None:
        observation, run = self._observe(finetunejob)
        self._release_lost_pods(finetunejob, observation)
        decision = lifecycle.decide(observation)
        outcome = self._act(finetunejob, observation, run, decision)
        if outcome.name_conflicts or outcome.rejected:
            # Acting found what the observation could not see: decide again with it, before anything is written.
            observation = replace(observation, name_conflicts=outcome.name_conflicts, rejected=outcome.rejected)
            decision = lifecycle.decide(observation)
        try:
            self._write_status(finetunejob, observation.status, decision.status)
        except Conflict:
            metrics.WRITE_CONFLICTS.labels(source="reconcile").inc()
            return CONFLICT_RETRY_SECONDS
        metadata = finetunejob["metadata"]
        key, uid = (metadata["namespace"], metadata["name"]), metadata["uid"]
        disrupted = observation.known_disruptions | disrupted_pods(observation.train_pods)
        if disrupted and not decision.status.phase.finished:
            self._disruptions[key] = (uid, disrupted)
        else:
            self._disruptions.pop(key, None)
        for notice in decision.notices:
            self._api.record_event(finetunejob, notice.type, notice.reason, notice.message)
        if decision.status.phase is not observation.status.phase:
            metrics.PHASE_TRANSITIONS.labels(phase=decision.status.phase.value).inc()
        self._follow_rank0_log(finetunejob, observation, decision.status)
        if observation.name_conflicts and not decision.status.phase.finished:
            return NAME_CONFLICT_RETRY_SECONDS
        return decision.requeue_after

    # --- observe -----------------------------------------------------------------------------------------

    def _observe(self, finetunejob: Obj) -> tuple[Observation, RunInfo | None]:
        """What the state machine needs, and the FineTuneJob resolved for the builders (None if it cannot be)."""
        metadata = finetunejob["metadata"]
        owner = Owner(
            name=metadata["name"],
            namespace=metadata["namespace"],
            uid=metadata["uid"],
            labels=metadata.get("labels") or {},
        )
        names = workload_names(owner.name)
        run: RunInfo | None = None
        spec_error: str | None = None
        try:
            spec: FineTuneJobSpec | None = FineTuneJobSpec.model_validate(finetunejob.get("spec") or {})
        except ValidationError as error:
            # The CRD schema normally stops this; an object stored before a schema change may still get here.
            spec = None
            spec_error = f"spec.{_first_error(error)}"
        if spec is not None:
            try:
                run = resolve_run(owner, spec, self._settings)
            except InvalidSpec as error:
                spec_error = str(error)
        conflicts: list[str] = []
        validation_job = self._owned_job(owner, names.validation_job, conflicts)
        train_job = self._owned_job(owner, names.train_job, conflicts)
        pods = self._cache.pods_of(owner.namespace, owner.name)
        known_uid, known_disruptions = self._disruptions.get((owner.namespace, owner.name), ("", frozenset()))
        observation = Observation(
            spec=spec,
            status=_parse_status(finetunejob.get("status")),
            generation=int(metadata.get("generation", 1)),
            created_at=metadata.get("creationTimestamp", ""),
            now=self._clock(),
            names=names,
            kueue_managed=KUEUE_QUEUE_LABEL in owner.labels,
            spec_error=spec_error,
            validation_job=validation_job,
            validation_pods=_pods_of(validation_job, pods, Component.VALIDATION),
            train_job=train_job,
            train_pods=_pods_of(train_job, pods, Component.TRAINING),
            name_conflicts=conflicts,
            warnings=self._cache.warnings_of(owner.namespace, owner.name),
            stuck_timeout_seconds=self._settings.stuck_pod_seconds,
            known_disruptions=known_disruptions if known_uid == owner.uid else frozenset(),
        )
        return observation, run

    def _owned_job(self, owner: Owner, name: str, conflicts: list[str]) -> Obj | None:
        job = self._cache.job(owner.namespace, name)
        if job is None:
            return None
        if not controlled_by(job, owner.uid):
            conflicts.append(describe(job, "Job"))
            return None
        return job

    def _release_lost_pods(self, finetunejob: Obj, obs: Observation) -> None:
        """Fail and remove the pods whose node stopped reporting (lifecycle.lost_pods says why). An active job's
        resync brings the reconcile that finds them."""
        for pod in lost_pods([*obs.validation_pods, *obs.train_pods], obs.now):
            log.info("%s: releasing pod %s, %ds past its grace", obs.names.train_job, pod.name, pod.overdue_seconds)
            if pod.needs_failing:
                self._api.patch_pod_status(pod.namespace, pod.name, failed_status_patch(pod, timestamp(obs.now)))
            self._api.force_delete_pod(pod.namespace, pod.name, pod.uid)
            self._api.record_event(
                finetunejob,
                "Warning",
                "LostPodReleased",
                f"pod {pod.name} was still terminating {int(pod.overdue_seconds)}s past its grace period (its node "
                "stopped reporting): set Failed as a disruption and removed, so that its replacement can start",
            )

    # --- act ---------------------------------------------------------------------------------------------

    def _act(self, finetunejob: Obj, obs: Observation, run: RunInfo | None, decision: Decision) -> _Outcome:
        metadata = finetunejob["metadata"]
        namespace, name, uid = metadata["namespace"], metadata["name"], metadata["uid"]
        outcome = _Outcome()
        for action in decision.actions:
            log.info("%s/%s: %s", namespace, name, action.value)
            try:
                if action is Action.CREATE_VALIDATION and run is not None:
                    self._create_all(uid, [build_config_map(run), build_validation_job(run)], outcome)
                elif action is Action.CREATE_TRAINING and run is not None:
                    service = build_service(run)
                    manifests = [build_config_map(run), *([service] if service else []), build_train_job(run)]
                    self._create_all(uid, manifests, outcome)
                elif action in (Action.SUSPEND_TRAINING, Action.RESUME_TRAINING) and obs.train_job is not None:
                    job_uid = obs.train_job["metadata"]["uid"]
                    suspend = action is Action.SUSPEND_TRAINING
                    self._api.set_job_suspend(namespace, obs.names.train_job, job_uid, suspend)
                elif action is Action.RESTART_TRAINING and obs.train_job is not None:
                    metadata_of_job = obs.train_job["metadata"]
                    self._api.delete_job(namespace, metadata_of_job["name"], metadata_of_job["uid"], foreground=True)
                elif action is Action.DELETE_WORKLOAD:
                    self._followers.forget(uid)
                    self._delete_workload(namespace, uid, obs)
                elif action is Action.DELETE_FINETUNEJOB:
                    self._followers.forget(uid)
                    self._api.delete_finetunejob(namespace, name, uid)
            except Rejected as error:
                outcome.rejected = ErrorInfo(
                    reason="CreateRejected",
                    message=f"the API server refused {error.kind} {namespace}/{error.name}: {error.message}",
                )
                break
        return outcome

    def _create_all(self, uid: str, manifests: list[Obj], outcome: _Outcome) -> None:
        """Create each child in order; stop at the first name held by an object that is not ours."""
        for manifest in manifests:
            created = self._api.create(manifest)
            if created.existed and not controlled_by(created.object, uid):
                outcome.name_conflicts.append(describe(created.object, manifest["kind"]))
                return
            if manifest["kind"] == "Job":
                self._cache.upsert_job(created.object)

    def _delete_workload(self, namespace: str, uid: str, obs: Observation) -> None:
        """Delete this FineTuneJob's own children, each by its UID: a namesake's are never touched."""
        for job in (obs.train_job, obs.validation_job):
            if job is not None:
                self._api.delete_job(namespace, job["metadata"]["name"], job["metadata"]["uid"])
        names: WorkloadNames = obs.names
        for kind, name in (("Service", names.service), ("ConfigMap", names.config_map)):
            child = self._api.get_child(kind, namespace, name)
            if child is not None and controlled_by(child, uid):
                self._api.delete_child(kind, namespace, name, child["metadata"]["uid"])

    # --- write -------------------------------------------------------------------------------------------

    def _write_status(self, finetunejob: Obj, before: FineTuneJobStatus, after: FineTuneJobStatus) -> None:
        """One merge patch of the fields the state machine owns that changed; nothing when none did."""
        old = _owned(before)
        new = _owned(after)
        patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
        patch.update({k: None for k in old if k not in new})
        if not patch:
            return
        metadata = finetunejob["metadata"]
        updated = self._api.patch_finetunejob_status(
            metadata["namespace"], metadata["name"], patch, metadata["resourceVersion"]
        )
        # The watch brings this too, later: until then the next reconcile must not compute from the old state.
        self._cache.upsert_finetunejob(updated)
        metrics.STATUS_PATCHES.labels(source="reconcile").inc()

    # --- logs --------------------------------------------------------------------------------------------

    def _follow_rank0_log(self, finetunejob: Obj, obs: Observation, status: FineTuneJobStatus) -> None:
        if status.phase is Phase.CANCELED:
            return
        complete = status.progress is not None and status.progress.percent == 100
        if status.phase.finished and status.logs and (status.phase is Phase.FAILED or complete):
            return  # read to its end already, by this operator or an earlier one
        started = ("Running", "Succeeded", "Failed")
        rank0 = [
            pod
            for pod in newest_first(obs.train_pods)
            if completion_index(pod) == 0 and pod.get("status", {}).get("phase") in started
        ]
        if not rank0:
            return
        metadata = finetunejob["metadata"]
        stream = Stream(
            namespace=metadata["namespace"],
            finetunejob=metadata["name"],
            uid=metadata["uid"],
            pod=rank0[0]["metadata"]["name"],
            container=TRAINER_CONTAINER,
        )
        self._followers.follow(stream, status)


def _pods_of(job: Obj | None, pods: list[Obj], component: Component) -> list[Obj]:
    """The pods of `component` that `job` controls: never a namesake Job's pods."""
    if job is None:
        return []
    uid = job["metadata"]["uid"]
    return [
        pod
        for pod in pods
        if (pod.get("metadata", {}).get("labels") or {}).get(COMPONENT_LABEL) == component and controlled_by(pod, uid)
    ]


def _parse_status(raw: Any) -> FineTuneJobStatus:
    try:
        return FineTuneJobStatus.model_validate(raw or {})
    except ValidationError:
        log.warning("unreadable status %r: starting from an empty one", raw)
        return FineTuneJobStatus()


def _owned(status: FineTuneJobStatus) -> dict[str, Any]:
    """The state machine's fields of `status`, as JSON (camelCase)."""
    dumped = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return {key: value for key, value in dumped.items() if key in STATE_MACHINE_FIELDS}


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    return f"{location}: {first['msg']}"
