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
from finetune_operator.api.status import FineTuneJobStatus, Phase, Workload
from finetune_operator.kube import KubeApi, Obj
from finetune_operator.lifecycle import Action, Decision, Observation
from finetune_operator.log_follower import LogFollowers, Stream
from finetune_operator.resolution import InvalidSpec, resolve_trainer_config
from finetune_operator.settings import Settings
from finetune_operator.workload import (
    COMPONENT_LABEL,
    JOB_NAME_LABEL,
    KUEUE_QUEUE_LABEL,
    TRAINER_CONTAINER,
    Owner,
    WorkloadNames,
    build_config_map,
    build_service,
    build_train_job,
    build_validation_job,
    workload_names,
)

log = logging.getLogger(__name__)
# The log follower owns these status fields; a reconcile never writes them back from its (older) read.
_LOG_OWNED = frozenset(("progress", "logs", "validationSamples", "lossHistory"))


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
        observation, names = self._observe(finetunejob)
        decision = lifecycle.decide(observation)
        self._act(finetunejob, observation, decision, names)
        self._write_status(finetunejob, observation, decision.status, names)
        for notice in decision.notices:
            self._api.record_event(finetunejob, notice.type, notice.reason, notice.message)
        if decision.status.phase is not observation.status.phase:
            metrics.PHASE_TRANSITIONS.labels(phase=decision.status.phase.value).inc()
        if decision.status.phase is not Phase.CANCELED:
            self._follow_rank0_log(finetunejob, observation)
        return decision.requeue_after

    def _observe(self, finetunejob: Obj) -> tuple[Observation, WorkloadNames]:
        metadata = finetunejob["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        names = workload_names(name)
        status = _parse_status(finetunejob.get("status"))
        try:
            spec: FineTuneJobSpec | None = FineTuneJobSpec.model_validate(finetunejob.get("spec") or {})
        except ValidationError as error:
            # The CRD schema normally stops this; an object stored before a schema change may still get here.
            spec = None
            spec_error: str | None = f"spec.{_first_error(error)}"
        else:
            spec_error = None
        if spec is not None:
            try:
                resolve_trainer_config(name, namespace, spec, self._settings)
            except InvalidSpec as error:
                spec_error = str(error)
        selector = f"{JOB_NAME_LABEL}={name}"
        pods = self._api.list_pods(namespace, selector)
        return (
            Observation(
                spec=spec,
                status=status,
                generation=int(metadata.get("generation", 1)),
                created_at=metadata.get("creationTimestamp", ""),
                now=self._clock(),
                kueue_managed=KUEUE_QUEUE_LABEL in (metadata.get("labels") or {}),
                spec_error=spec_error,
                validation_job=self._api.get_job(namespace, names.validation_job),
                validation_pods=[p for p in pods if _component(p) == "validation"],
                train_job=self._api.get_job(namespace, names.train_job),
                train_pods=[p for p in pods if _component(p) == "training"],
            ),
            names,
        )

    def _act(self, finetunejob: Obj, obs: Observation, decision: Decision, names: WorkloadNames) -> None:
        metadata = finetunejob["metadata"]
        namespace = metadata["namespace"]
        owner = Owner(
            name=metadata["name"],
            namespace=namespace,
            uid=metadata["uid"],
            labels=metadata.get("labels") or {},
        )
        spec = obs.spec
        for action in decision.actions:
            log.info("%s/%s: %s", namespace, owner.name, action.value)
            if action is Action.CREATE_VALIDATION and spec is not None:
                config = resolve_trainer_config(owner.name, namespace, spec, self._settings)
                self._api.create(build_config_map(owner, config))
                self._api.create(build_validation_job(owner, spec, self._settings, names))
            elif action is Action.CREATE_TRAINING and spec is not None:
                config = resolve_trainer_config(owner.name, namespace, spec, self._settings)
                self._api.create(build_config_map(owner, config))
                service = build_service(owner, spec, self._settings, names)
                if service is not None:
                    self._api.create(service)
                self._api.create(build_train_job(owner, spec, self._settings, names, suspend=spec.suspend))
            elif action in (Action.SUSPEND_TRAINING, Action.RESUME_TRAINING):
                self._api.set_job_suspend(namespace, names.train_job, action is Action.SUSPEND_TRAINING)
            elif action is Action.DELETE_WORKLOAD:
                self._followers.forget(owner.uid)
                self._api.delete_children(
                    namespace,
                    jobs=[names.train_job, names.validation_job],
                    services=[names.service],
                    config_maps=[names.config_map],
                )
            elif action is Action.DELETE_FINETUNEJOB:
                self._followers.forget(owner.uid)
                self._api.delete_finetunejob(namespace, owner.name)

    def _write_status(self, finetunejob: Obj, obs: Observation, after: FineTuneJobStatus, names: WorkloadNames) -> None:
        before = obs.status
        if obs.train_job is not None and after.workload is None and obs.spec is not None:
            service = names.service if obs.spec.resources.nodes > 1 else None
            workload = Workload(job=names.train_job, service=service, config_map=names.config_map)
            after = after.model_copy(update={"workload": workload})
        old = _status_dict(before)
        new = _status_dict(after)
        patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v and k not in _LOG_OWNED}
        patch.update({k: None for k in old if k not in new and k not in _LOG_OWNED})
        if after.phase is Phase.SUCCEEDED and before.phase is not Phase.SUCCEEDED and after.progress is not None:
            patch["progress"] = {"percent": 100}
        if patch:
            metadata = finetunejob["metadata"]
            self._api.patch_finetunejob_status(metadata["namespace"], metadata["name"], patch)
            metrics.STATUS_PATCHES.labels(source="reconcile").inc()

    def _follow_rank0_log(self, finetunejob: Obj, obs: Observation) -> None:
        started = ("Running", "Succeeded", "Failed")
        rank0 = [
            pod
            for pod in lifecycle.newest_first(obs.train_pods)
            if lifecycle.completion_index(pod) == 0 and pod.get("status", {}).get("phase") in started
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


def _status_dict(status: FineTuneJobStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def _component(pod: Obj) -> str | None:
    labels: dict[str, str] = pod.get("metadata", {}).get("labels") or {}
    return labels.get(COMPONENT_LABEL)


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    return f"{location}: {first['msg']}"
