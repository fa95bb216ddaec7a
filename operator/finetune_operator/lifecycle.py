"""The FineTuneJob state machine: observed objects in, status and the next actions out.

`decide` is a pure function of what the reconciler observed (the FineTuneJob, its validation Job, its training
Job and their pods, as the API server returns them) and the time. It never talks to the API: the reconciler
applies what it returns. Every phase a user can see has a condition reason they can search for, and every
transition comes with a Kubernetes Event.

    Pending -> Validating -> Queued -> Starting -> Running -> Succeeded | Failed | Canceled
                                 \\-> Suspended (spec.suspend) -/
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from finetune_contract.batching import plan_batches
from finetune_contract.protocol import (
    EXIT_USER_ERROR,
    ErrorEvent,
    Output,
    OutputEvent,
    ValidatedEvent,
    parse_termination_message,
)
from finetune_operator.api.spec import FineTuneJobSpec
from finetune_operator.api.status import (
    Condition,
    ConditionType,
    ErrorInfo,
    FineTuneJobStatus,
    Phase,
    Resolved,
)
from finetune_operator.workload import COMPLETION_INDEX_ANNOTATION, TRAINER_CONTAINER

Manifest = Mapping[str, Any]

# While a job is active, look again this often even without events: gpuSeconds and timeouts move with time.
ACTIVE_RESYNC_SECONDS = 30.0


class Action(StrEnum):
    CREATE_VALIDATION = "CreateValidation"
    CREATE_TRAINING = "CreateTraining"
    SUSPEND_TRAINING = "SuspendTraining"
    RESUME_TRAINING = "ResumeTraining"
    DELETE_WORKLOAD = "DeleteWorkload"
    DELETE_FINETUNEJOB = "DeleteFineTuneJob"


@dataclass(frozen=True)
class Notice:
    """A Kubernetes Event to record on the FineTuneJob."""

    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class Observation:
    """What the reconciler saw. `spec` is None when the stored spec cannot be read (then `spec_error` says why)."""

    spec: FineTuneJobSpec | None
    status: FineTuneJobStatus
    generation: int
    created_at: str
    now: datetime
    kueue_managed: bool = False
    spec_error: str | None = None
    validation_job: Manifest | None = None
    validation_pods: Sequence[Manifest] = ()
    train_job: Manifest | None = None
    train_pods: Sequence[Manifest] = ()


@dataclass(frozen=True)
class Decision:
    status: FineTuneJobStatus
    actions: tuple[Action, ...] = ()
    notices: tuple[Notice, ...] = ()
    requeue_after: float | None = None


@dataclass(frozen=True)
class _Step:
    """One evaluation of the state machine before the bookkeeping common to all phases."""

    phase: Phase
    reason: str
    message: str
    conditions: dict[ConditionType, tuple[str, str, str]] = field(default_factory=dict)
    actions: tuple[Action, ...] = ()
    error: ErrorInfo | None = None
    output: Output | None = None


def timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def decide(obs: Observation) -> Decision:
    previous = obs.status
    if previous.phase.finished:
        return _after_finish(obs)
    step = _evaluate(obs)
    status = _bookkeep(obs, step)
    notices = list(_transition_notices(previous, status, step))
    notices.extend(_retry_notices(obs, previous, status))
    if obs.spec is not None and previous.resolved is None and status.resolved is not None:
        notices.extend(_batch_notices(obs.spec, status.resolved))
    requeue = None if status.phase.finished else ACTIVE_RESYNC_SECONDS
    if status.phase.finished:
        ttl_decision = _ttl(obs, status)
        requeue = ttl_decision.requeue_after
        step = replace(step, actions=step.actions + ttl_decision.actions)
    return Decision(status=status, actions=step.actions, notices=tuple(notices), requeue_after=requeue)


def _evaluate(obs: Observation) -> _Step:
    if obs.spec is None or obs.spec_error is not None:
        message = obs.spec_error or "the spec cannot be read"
        return _failed(ErrorInfo(reason="InvalidSpec", message=message), validated=False)
    if obs.spec.cancel:
        return _Step(
            Phase.CANCELED,
            "Canceled",
            "spec.cancel is true: the workload was removed",
            {
                ConditionType.CANCELED: ("True", "Canceled", "spec.cancel is true"),
                ConditionType.RUNNING: ("False", "Canceled", "spec.cancel is true"),
            },
            actions=(Action.DELETE_WORKLOAD,),
        )
    validated = _condition_status(obs.status, ConditionType.VALIDATED) == "True"
    if not validated:
        return _validation_step(obs)
    return _training_step(obs)


def _validation_step(obs: Observation) -> _Step:
    message = "checking the training data on a CPU pod before any GPU is claimed"
    validating = {ConditionType.VALIDATED: ("Unknown", "ValidatingData", message)}
    job = obs.validation_job
    if job is None:
        return _Step(Phase.VALIDATING, "ValidatingData", message, validating, (Action.CREATE_VALIDATION,))
    if _job_condition(job, "Complete"):
        return _training_step(obs, validated_now=True)
    if _job_condition(job, "Failed"):
        return _failed(_pod_failure(job, obs.validation_pods, "ValidationFailed"), validated=False)
    scheduling = _unschedulable_message(obs.validation_pods)
    if scheduling:
        message = f"the validation pod cannot be scheduled: {scheduling}"
        validating = {ConditionType.VALIDATED: ("Unknown", "ValidationUnschedulable", message)}
    return _Step(Phase.VALIDATING, validating[ConditionType.VALIDATED][1], message, validating)


def _training_step(obs: Observation, validated_now: bool = False) -> _Step:
    assert obs.spec is not None
    conditions: dict[ConditionType, tuple[str, str, str]] = {}
    if validated_now:
        conditions[ConditionType.VALIDATED] = ("True", "DataValid", "the training data passed validation")
    job = obs.train_job
    wants_suspend = obs.spec.suspend
    if job is None:
        if wants_suspend:
            conditions[ConditionType.SUSPENDED] = ("True", "Suspended", "spec.suspend is true")
            return _Step(Phase.SUSPENDED, "Suspended", "spec.suspend is true", conditions, (Action.CREATE_TRAINING,))
        reason, message = _queued_reason(obs)
        conditions[ConditionType.ADMITTED] = ("False", reason, message)
        return _Step(Phase.QUEUED, reason, message, conditions, (Action.CREATE_TRAINING,))

    if _job_condition(job, "Complete"):
        conditions[ConditionType.RUNNING] = ("False", "TrainingSucceeded", "the trainer finished")
        conditions[ConditionType.SUCCEEDED] = ("True", "TrainingSucceeded", "the trainer finished")
        return _Step(
            Phase.SUCCEEDED,
            "TrainingSucceeded",
            "the trainer finished and wrote the weights",
            conditions,
            output=_rank0_output(obs.train_pods),
        )
    if _job_condition(job, "Failed"):
        step = _failed(_pod_failure(job, obs.train_pods, "TrainingFailed"), validated=True)
        return replace(step, conditions={**conditions, **step.conditions})

    job_suspended = bool(job.get("spec", {}).get("suspend"))
    actions: tuple[Action, ...] = ()
    if wants_suspend and not job_suspended:
        actions = (Action.SUSPEND_TRAINING,)
    elif not wants_suspend and job_suspended and not obs.kueue_managed:
        actions = (Action.RESUME_TRAINING,)
    if wants_suspend:
        conditions[ConditionType.SUSPENDED] = ("True", "Suspended", "spec.suspend is true")
        conditions[ConditionType.RUNNING] = ("False", "Suspended", "spec.suspend is true")
        return _Step(Phase.SUSPENDED, "Suspended", "spec.suspend is true", conditions, actions)
    if _condition_status(obs.status, ConditionType.SUSPENDED) == "True":
        conditions[ConditionType.SUSPENDED] = ("False", "Resumed", "spec.suspend is false")
    if job_suspended:
        reason, message = _queued_reason(obs)
        conditions[ConditionType.ADMITTED] = ("False", reason, message)
        return _Step(Phase.QUEUED, reason, message, conditions, actions)

    active = [pod for pod in obs.train_pods if _pod_phase(pod) in ("Pending", "Running") and not _deleting(pod)]
    unschedulable = _unschedulable_message(active)
    if unschedulable:
        conditions[ConditionType.ADMITTED] = ("False", "Unschedulable", unschedulable)
        return _Step(Phase.QUEUED, "Unschedulable", unschedulable, conditions, actions)
    scheduled = (
        "the trainer pods have their GPUs" if obs.spec.resources.gpus_per_node else "the trainer pods are scheduled"
    )
    conditions[ConditionType.ADMITTED] = ("True", "PodsScheduled", scheduled)
    if any(completion_index(pod) == 0 and _pod_phase(pod) == "Running" for pod in active):
        conditions[ConditionType.RUNNING] = ("True", "TrainingRunning", "the trainer is running")
        return _Step(Phase.RUNNING, "TrainingRunning", "the trainer is running", conditions, actions)
    if any(completion_index(pod) == 0 and _pod_phase(pod) == "Succeeded" for pod in obs.train_pods):
        # The trainer is done; the Job controller marks the Job Complete a moment later.
        conditions[ConditionType.RUNNING] = ("True", "TrainingRunning", "the trainer is running")
        return _Step(Phase.RUNNING, "TrainingRunning", "the trainer finished; the Job is completing", conditions)
    waiting = _waiting_message(active)
    if waiting is None:
        waiting = "waiting for the trainer pods to start"
        conditions.pop(ConditionType.ADMITTED)
    return _Step(Phase.STARTING, "PodsStarting", waiting, conditions, actions)


def _queued_reason(obs: Observation) -> tuple[str, str]:
    if obs.kueue_managed:
        return "AwaitingAdmission", "waiting for Kueue to admit the workload"
    return "Creating", "creating the training Job"


def _failed(error: ErrorInfo, validated: bool) -> _Step:
    conditions = {
        ConditionType.FAILED: ("True", error.reason, error.message),
        ConditionType.RUNNING: ("False", error.reason, error.message),
    }
    if not validated:
        conditions[ConditionType.VALIDATED] = ("False", error.reason, error.message)
    return _Step(Phase.FAILED, error.reason, error.message, conditions, error=error)


def _after_finish(obs: Observation) -> Decision:
    """Finished is final: keep the status, finish removing a canceled workload, honour the TTL."""
    status = obs.status
    ttl = _ttl(obs, status)
    actions = ttl.actions
    if status.phase is Phase.CANCELED and (obs.train_job or obs.validation_job):
        actions = (Action.DELETE_WORKLOAD, *actions)
    if status.phase is Phase.SUCCEEDED and status.output is None:
        output = _rank0_output(obs.train_pods)
        if output is not None:
            status = status.model_copy(update={"output": output})
    return Decision(status=status, actions=actions, requeue_after=ttl.requeue_after)


def _ttl(obs: Observation, status: FineTuneJobStatus) -> Decision:
    ttl = obs.spec.ttl_seconds_after_finished if obs.spec is not None else None
    if ttl is None or status.completed_at is None:
        return Decision(status=status)
    remaining = (parse_timestamp(status.completed_at) - obs.now).total_seconds() + ttl
    if remaining <= 0:
        return Decision(status=status, actions=(Action.DELETE_FINETUNEJOB,))
    return Decision(status=status, requeue_after=remaining)


def _bookkeep(obs: Observation, step: _Step) -> FineTuneJobStatus:
    previous = obs.status
    now = timestamp(obs.now)
    conditions = list(previous.conditions)
    for kind, (state, reason, message) in step.conditions.items():
        conditions = set_condition(
            conditions, kind=kind, state=state, reason=reason, message=message, now=now, generation=obs.generation
        )
    started_at = previous.started_at
    if step.phase is Phase.RUNNING and started_at is None:
        started_at = now
    completed_at = previous.completed_at
    if step.phase.finished and completed_at is None:
        completed_at = now
    progress = previous.progress
    if step.phase is Phase.SUCCEEDED and progress is not None:
        progress = progress.model_copy(update={"percent": 100})
    gpu_seconds = _gpu_seconds(obs.spec, obs.train_pods, obs.now) if obs.spec is not None else 0
    restarts = _restarts(obs.train_job)
    return previous.model_copy(
        update={
            "phase": step.phase,
            "reason": step.reason,
            "message": step.message,
            "conditions": conditions,
            "observed_generation": obs.generation,
            "created_at": previous.created_at or obs.created_at,
            "started_at": started_at,
            "completed_at": completed_at,
            "gpu_seconds": max(gpu_seconds, previous.gpu_seconds or 0) or previous.gpu_seconds,
            "restarts": restarts if restarts else previous.restarts,
            "resolved": _resolved(obs.spec, obs) if obs.spec is not None else previous.resolved,
            "error": step.error or (None if step.phase is not Phase.FAILED else previous.error),
            "output": step.output or previous.output,
            "progress": progress,
        }
    )


def set_condition(
    conditions: Sequence[Condition],
    *,
    kind: ConditionType,
    state: str,
    reason: str,
    message: str,
    now: str,
    generation: int,
) -> list[Condition]:
    """Conditions with `kind` set; lastTransitionTime moves only when the status changes."""
    existing = next((c for c in conditions if c.type is kind), None)
    transition = existing.last_transition_time if existing and existing.status == state else now
    updated = Condition(
        type=kind,
        status=state,
        reason=reason,
        message=message,
        last_transition_time=transition,
        observed_generation=generation,
    )
    others = [c for c in conditions if c.type is not kind]
    return sorted([*others, updated], key=lambda c: list(ConditionType).index(c.type))


def _condition_status(status: FineTuneJobStatus, kind: ConditionType) -> str | None:
    return next((c.status for c in status.conditions if c.type is kind), None)


def _resolved(spec: FineTuneJobSpec, obs: Observation) -> Resolved:
    resources = spec.resources
    plan = plan_batches(
        spec.input.train_batch_size, spec.input.micro_batch_size, resources.nodes * resources.processes_per_node
    )
    resolved = Resolved(
        world_size=plan.world_size,
        per_device_batch_size=plan.per_device_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        effective_batch_size=plan.effective_batch_size,
    )
    validated = _termination_event(obs.validation_pods)
    if isinstance(validated, ValidatedEvent):
        data = validated.resolved
        resolved = resolved.model_copy(
            update={
                "train_rows": data.train_rows,
                "validation_rows": data.validation_rows,
                "train_tokens": data.train_tokens,
                "steps_per_epoch": data.steps_per_epoch
                if data.steps_per_epoch is not None or data.train_rows is None
                else plan.steps_per_epoch(data.train_rows),
            }
        )
    previous = obs.status.resolved
    if previous is not None:
        # Keep what the trainer reported (its start event) over what can only be estimated here.
        merged = previous.model_dump(by_alias=False, exclude_none=True)
        resolved = resolved.model_copy(update={k: v for k, v in merged.items() if getattr(resolved, k) is None})
    return resolved


def _batch_notices(spec: FineTuneJobSpec, resolved: Resolved) -> list[Notice]:
    asked = spec.input.train_batch_size
    if resolved.effective_batch_size == asked:
        return []
    return [
        Notice(
            "Warning",
            "BatchSizeRounded",
            f"train_batch_size {asked} does not split evenly over {resolved.world_size} GPUs: "
            f"training uses {resolved.per_device_batch_size} per GPU x {resolved.world_size} GPUs x "
            f"{resolved.gradient_accumulation_steps} accumulation steps = {resolved.effective_batch_size}",
        )
    ]


def _transition_notices(previous: FineTuneJobStatus, status: FineTuneJobStatus, step: _Step) -> list[Notice]:
    if (previous.phase, previous.reason) == (status.phase, status.reason):
        return []
    warning = status.phase is Phase.FAILED or step.reason in ("Unschedulable", "ValidationUnschedulable")
    return [Notice("Warning" if warning else "Normal", step.reason, f"{status.phase.value}: {step.message}")]


def _retry_notices(obs: Observation, previous: FineTuneJobStatus, status: FineTuneJobStatus) -> list[Notice]:
    before, after = previous.restarts or 0, status.restarts or 0
    if after <= before or status.phase is Phase.FAILED:
        return []
    failure = _pod_failure(obs.train_job or {}, obs.train_pods, "TrainerFailed")
    limit = obs.spec.backoff_limit if obs.spec is not None else "?"
    return [
        Notice(
            "Warning",
            "TrainerRestarted",
            f"{failure.message} (pod {failure.pod}); retry {after} of {limit}",
        )
    ]


def _restarts(job: Manifest | None) -> int:
    if job is None:
        return 0
    return int(job.get("status", {}).get("failed", 0) or 0)


def _gpu_seconds(spec: FineTuneJobSpec, pods: Sequence[Manifest], now: datetime) -> int:
    gpus = spec.resources.gpus_per_node
    total = 0.0
    for pod in pods:
        state = _trainer_state(pod)
        started = (state.get("running") or state.get("terminated") or {}).get("startedAt")
        if not started:
            continue
        finished = (state.get("terminated") or {}).get("finishedAt")
        end = parse_timestamp(finished) if finished else now
        total += max(0.0, (end - parse_timestamp(started)).total_seconds()) * gpus
    return math.floor(total)


def _rank0_output(pods: Sequence[Manifest]) -> Output | None:
    for pod in newest_first(pods):
        if completion_index(pod) != 0:
            continue
        event = parse_termination_message(str(_terminated(pod).get("message") or ""))
        if isinstance(event, OutputEvent):
            return Output.model_validate(event.model_dump(include={"weights", "files", "metrics"}))
    return None


def _termination_event(pods: Sequence[Manifest]) -> Any:
    for pod in newest_first(pods):
        message = _terminated(pod).get("message")
        if message:
            return parse_termination_message(str(message))
    return None


def _pod_failure(job: Manifest, pods: Sequence[Manifest], default_reason: str) -> ErrorInfo:
    """What went wrong, from the newest failed pod: the trainer's error event, else the container's state."""
    job_reason, job_message = _job_failure(job)
    if job_reason == "DeadlineExceeded":  # the Job controller stopped the pods: their exit codes say nothing
        return ErrorInfo(reason=job_reason, message=job_message or "spec.activeDeadlineSeconds was exceeded")
    for pod in newest_first(pods):
        terminated = _terminated(pod)
        exit_code = terminated.get("exitCode")
        if _pod_phase(pod) != "Failed" or exit_code in (None, 0):
            continue
        name = str(pod.get("metadata", {}).get("name", ""))
        raw_message = str(terminated.get("message") or "").strip()
        event = parse_termination_message(raw_message)
        container_reason = str(terminated.get("reason") or "Error")
        if isinstance(event, ErrorEvent):
            reason, message = event.reason, event.message
        elif exit_code == EXIT_USER_ERROR:
            reason, message = "InvalidInput", "the trainer rejected the inputs (exit code 65)"
        elif container_reason == "OOMKilled":
            reason, message = "OOMKilled", "the trainer ran out of memory (OOMKilled)"
        else:
            reason, message = default_reason, f"the trainer exited with code {exit_code} ({container_reason})"
        if raw_message and not isinstance(event, ErrorEvent):
            message = f"{message}; last output: {raw_message[-1024:]}"
        return ErrorInfo(reason=reason, message=message, exit_code=int(exit_code), pod=name)
    return ErrorInfo(reason=job_reason or default_reason, message=job_message or "the Job failed")


def _job_failure(job: Manifest) -> tuple[str | None, str | None]:
    for condition in job.get("status", {}).get("conditions", []) or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            return condition.get("reason"), condition.get("message")
    return None, None


def _job_condition(job: Manifest, kind: str) -> bool:
    conditions = job.get("status", {}).get("conditions", []) or []
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)


def _unschedulable_message(pods: Sequence[Manifest]) -> str | None:
    for pod in pods:
        if _pod_phase(pod) != "Pending":
            continue
        for condition in pod.get("status", {}).get("conditions", []) or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                return str(condition.get("message") or "no node can run the trainer pod")
    return None


def _waiting_message(pods: Sequence[Manifest]) -> str | None:
    """Why scheduled pods are not running yet (e.g. ImagePullBackOff), or None when none is scheduled."""
    scheduled = [pod for pod in pods if pod.get("spec", {}).get("nodeName")]
    if not scheduled:
        return None
    for pod in scheduled:
        waiting = _trainer_state(pod).get("waiting") or {}
        if waiting.get("reason"):
            detail = f": {waiting['message']}" if waiting.get("message") else ""
            return f"pod {pod['metadata']['name']} is {waiting['reason']}{detail}"
    return "the trainer pods are starting"


def _trainer_state(pod: Manifest) -> Mapping[str, Any]:
    for container in pod.get("status", {}).get("containerStatuses", []) or []:
        if container.get("name") == TRAINER_CONTAINER:
            state: Mapping[str, Any] = container.get("state") or {}
            return state
    return {}


def _terminated(pod: Manifest) -> Mapping[str, Any]:
    terminated: Mapping[str, Any] = _trainer_state(pod).get("terminated") or {}
    return terminated


def _pod_phase(pod: Manifest) -> str:
    return str(pod.get("status", {}).get("phase", "Pending"))


def _deleting(pod: Manifest) -> bool:
    return bool(pod.get("metadata", {}).get("deletionTimestamp"))


def completion_index(pod: Manifest) -> int | None:
    """The pod's index in its Indexed Job: 0 is the trainer's rank 0."""
    value = pod.get("metadata", {}).get("annotations", {}).get(COMPLETION_INDEX_ANNOTATION)
    return int(value) if value is not None and str(value).isdigit() else None


def newest_first(pods: Sequence[Manifest]) -> list[Manifest]:
    return sorted(pods, key=lambda pod: str(pod.get("metadata", {}).get("creationTimestamp", "")), reverse=True)
