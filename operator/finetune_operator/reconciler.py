"""One reconcile of one FineTuneJob: observe, decide (lifecycle), act. Safe to run any number of times."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from finetune_operator import lifecycle, metrics
from finetune_operator.api.spec import FineTuneJobSpec
from finetune_operator.api.status import STATE_MACHINE_FIELDS, FineTuneJobStatus, Phase
from finetune_operator.conventions import (
    COMPONENT_LABEL,
    JOB_NAME_LABEL,
    KUEUE_QUEUE_LABEL,
    TRAINER_CONTAINER,
    Component,
)
from finetune_operator.kube import KubeApi, Obj
from finetune_operator.lifecycle import Action, Decision, Observation
from finetune_operator.lifecycle.observed import completion_index, newest_first
from finetune_operator.log_follower import LogFollowers, Stream
from finetune_operator.naming import workload_names
from finetune_operator.resolution import InvalidSpec, Owner, RunInfo, resolve_run
from finetune_operator.settings import Settings
from finetune_operator.workload import build_config_map, build_service, build_train_job, build_validation_job

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self,
        api: KubeApi,
        settings: Settings,
        followers: LogFollowers,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._api = api
        self._settings = settings
        self._followers = followers
        self._clock = clock or (lambda: datetime.now(UTC))

    async def reconcile(self, key: tuple[str, str]) -> float | None:
        with metrics.RECONCILE_SECONDS.time():
            try:
                requeue = await asyncio.to_thread(self.reconcile_blocking, *key)
            except Exception:
                metrics.RECONCILES.labels(result="error").inc()
                raise
        metrics.RECONCILES.labels(result="ok").inc()
        return requeue

    def reconcile_blocking(self, namespace: str, name: str) -> float | None:
        finetunejob = self._api.get_finetunejob(namespace, name)
        if finetunejob is None or finetunejob["metadata"].get("deletionTimestamp"):
            if finetunejob is not None:
                self._followers.forget(finetunejob["metadata"]["uid"])
            return None
        observation, run = self._observe(finetunejob)
        decision = lifecycle.decide(observation)
        self._act(finetunejob, run, decision)
        self._write_status(finetunejob, observation.status, decision.status)
        for notice in decision.notices:
            self._api.record_event(finetunejob, notice.type, notice.reason, notice.message)
        if decision.status.phase is not observation.status.phase:
            metrics.PHASE_TRANSITIONS.labels(phase=decision.status.phase.value).inc()
        if decision.status.phase is not Phase.CANCELED:
            self._follow_rank0_log(finetunejob, observation)
        return decision.requeue_after

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
        pods = self._api.list_pods(owner.namespace, f"{JOB_NAME_LABEL}={owner.name}")
        observation = Observation(
            spec=spec,
            status=_parse_status(finetunejob.get("status")),
            generation=int(metadata.get("generation", 1)),
            created_at=metadata.get("creationTimestamp", ""),
            now=self._clock(),
            names=names,
            kueue_managed=KUEUE_QUEUE_LABEL in owner.labels,
            spec_error=spec_error,
            validation_job=self._api.get_job(owner.namespace, names.validation_job),
            validation_pods=[p for p in pods if _component(p) == Component.VALIDATION],
            train_job=self._api.get_job(owner.namespace, names.train_job),
            train_pods=[p for p in pods if _component(p) == Component.TRAINING],
        )
        return observation, run

    def _act(self, finetunejob: Obj, run: RunInfo | None, decision: Decision) -> None:
        metadata = finetunejob["metadata"]
        namespace, name, uid = metadata["namespace"], metadata["name"], metadata["uid"]
        names = workload_names(name)
        for action in decision.actions:
            log.info("%s/%s: %s", namespace, name, action.value)
            if action is Action.CREATE_VALIDATION and run is not None:
                self._api.create(build_config_map(run))
                self._api.create(build_validation_job(run))
            elif action is Action.CREATE_TRAINING and run is not None:
                self._api.create(build_config_map(run))
                service = build_service(run)
                if service is not None:
                    self._api.create(service)
                self._api.create(build_train_job(run))
            elif action in (Action.SUSPEND_TRAINING, Action.RESUME_TRAINING):
                self._api.set_job_suspend(namespace, names.train_job, action is Action.SUSPEND_TRAINING)
            elif action is Action.DELETE_WORKLOAD:
                self._followers.forget(uid)
                self._api.delete_children(
                    namespace,
                    jobs=[names.train_job, names.validation_job],
                    services=[names.service],
                    config_maps=[names.config_map],
                )
            elif action is Action.DELETE_FINETUNEJOB:
                self._followers.forget(uid)
                self._api.delete_finetunejob(namespace, name)

    def _write_status(self, finetunejob: Obj, before: FineTuneJobStatus, after: FineTuneJobStatus) -> None:
        """One merge patch of the fields the state machine owns that changed; nothing when none did."""
        old = _owned(before)
        new = _owned(after)
        patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
        patch.update({k: None for k in old if k not in new})
        if patch:
            metadata = finetunejob["metadata"]
            self._api.patch_finetunejob_status(metadata["namespace"], metadata["name"], patch)
            metrics.STATUS_PATCHES.labels(source="reconcile").inc()

    def _follow_rank0_log(self, finetunejob: Obj, obs: Observation) -> None:
        started = ("Running", "Succeeded", "Failed")
        rank0 = [
            pod
            for pod in newest_first(obs.train_pods)
            if completion_index(pod) == 0 and pod.get("status", {}).get("phase") in started
        ]
        if not rank0:
            return
        metadata = finetunejob["metadata"]
        self._followers.follow(
            Stream(
                namespace=metadata["namespace"],
                finetunejob=metadata["name"],
                uid=metadata["uid"],
                pod=rank0[0]["metadata"]["name"],
                container=TRAINER_CONTAINER,
            )
        )


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


def _component(pod: Obj) -> str | None:
    labels: dict[str, str] = pod.get("metadata", {}).get("labels") or {}
    return labels.get(COMPONENT_LABEL)


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    return f"{location}: {first['msg']}"
