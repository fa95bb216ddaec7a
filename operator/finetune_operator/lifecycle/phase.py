"""The phase step: from what was observed, the phase, its reason and message, conditions and the next actions.

Pending -> Validating -> Queued -> Starting -> Running -> Succeeded | Failed | Canceled
                             \\-> Suspended (spec.suspend) -/
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from finetune_contract.protocol import EXIT_USER_ERROR, Output
from finetune_operator.api.status import ConditionType, ErrorInfo, Phase
from finetune_operator.lifecycle.conditions import condition_status
from finetune_operator.lifecycle.failure_policy import pod_failure
from finetune_operator.lifecycle.observation import Action, ChildWarning, Manifest, Observation
from finetune_operator.lifecycle.observed import (
    completion_index,
    deleting,
    disruption,
    failed_rank,
    job_condition,
    pod_phase,
    rank0_output,
    scheduled,
    stuck_pod,
    terminated,
    unschedulable_message,
    waiting_message,
)

# A condition to set: (status, reason, message).
ConditionValue = tuple[str, str, str]
NAME_CONFLICT = "NameConflict"
GROUP_RESTART = "RestartingGroup"

# Notes on the way from one phase to the next, that every job passes through: a status shows the current one when
# it is written anyway (at a transition, or for another change), never in a write of its own. A note about trouble
# (a pod held back by its image, a Warning Event) is not one of them: it is written at once, and so is its end.
WAITING_FOR_PODS = "waiting for the trainer pods to start"
PODS_STARTING = "the trainer pods are starting"
TRAINER_RUNNING = "the trainer is running"
TRAINER_FINISHED = "the trainer finished; the Job is completing"
PASSING_NOTES = frozenset((WAITING_FOR_PODS, PODS_STARTING, TRAINER_RUNNING, TRAINER_FINISHED))


@dataclass(frozen=True)
class Step:
    """One evaluation of the state machine, before the bookkeeping common to all phases."""

    phase: Phase
    reason: str
    message: str
    conditions: dict[ConditionType, ConditionValue] = field(default_factory=dict)
    actions: tuple[Action, ...] = ()
    error: ErrorInfo | None = None
    output: Output | None = None


def evaluate(obs: Observation) -> Step:
    step = _evaluate(obs)
    if obs.name_conflicts and not step.phase.finished:
        return _blocked(step, obs.name_conflicts)
    return step


def _blocked(step: Step, conflicts: Sequence[str]) -> Step:
    """The step cannot go on while another object holds a child's name; it goes on by itself once freed."""
    message = (
        f"{'; '.join(conflicts)}: not owned by this FineTuneJob, so it is not used. "
        "Waiting until the name is free (delete or rename that object)"
    )
    kind = ConditionType.VALIDATED if step.phase is Phase.VALIDATING else ConditionType.ADMITTED
    state = "Unknown" if kind is ConditionType.VALIDATED else "False"
    return replace(
        step,
        reason=NAME_CONFLICT,
        message=message,
        conditions={**step.conditions, kind: (state, NAME_CONFLICT, message)},
    )


def _evaluate(obs: Observation) -> Step:
    if obs.rejected is not None:
        validated = condition_status(obs.status, ConditionType.VALIDATED) == "True"
        return failed(obs.rejected, validated=validated)
    if obs.spec is None or obs.spec_error is not None:
        message = obs.spec_error or "the spec cannot be read"
        return failed(ErrorInfo(reason="InvalidSpec", message=message), validated=False)
    if obs.spec.cancel:
        return Step(
            Phase.CANCELED,
            "Canceled",
            "spec.cancel is true: the workload was removed",
            {
                ConditionType.CANCELED: ("True", "Canceled", "spec.cancel is true"),
                ConditionType.RUNNING: ("False", "Canceled", "spec.cancel is true"),
            },
            actions=(Action.DELETE_WORKLOAD,),
        )
    if condition_status(obs.status, ConditionType.VALIDATED) != "True":
        return _validation_step(obs)
    return _training_step(obs)


def failed(error: ErrorInfo, validated: bool) -> Step:
    conditions = {
        ConditionType.FAILED: ("True", error.reason, error.message),
        ConditionType.RUNNING: ("False", error.reason, error.message),
    }
    if not validated:
        conditions[ConditionType.VALIDATED] = ("False", error.reason, error.message)
    return Step(Phase.FAILED, error.reason, error.message, conditions, error=error)


def _validation_step(obs: Observation) -> Step:
    message = "checking the training data on a CPU pod before any GPU is claimed"
    validating = {ConditionType.VALIDATED: ("Unknown", "ValidatingData", message)}
    job = obs.validation_job
    if job is None:
        return Step(Phase.VALIDATING, "ValidatingData", message, validating, (Action.CREATE_VALIDATION,))
    if job_condition(job, "Complete"):
        return _training_step(obs, validated_now=True)
    if job_condition(job, "Failed"):
        return failed(pod_failure(job, obs.validation_pods, "ValidationFailed"), validated=False)
    stuck = _stuck(obs, obs.validation_pods, job)
    if stuck is not None:
        return replace(failed(stuck, validated=False), actions=(Action.DELETE_WORKLOAD,))
    trouble = _warning(obs, job, obs.validation_pods)
    if trouble is not None:
        validating = {ConditionType.VALIDATED: ("Unknown", trouble.reason, _say(trouble))}
        return Step(Phase.VALIDATING, trouble.reason, _say(trouble), validating)
    scheduling = unschedulable_message(obs.validation_pods)
    if scheduling:
        message = f"the validation pod cannot be scheduled: {scheduling}"
        validating = {ConditionType.VALIDATED: ("Unknown", "ValidationUnschedulable", message)}
    return Step(Phase.VALIDATING, validating[ConditionType.VALIDATED][1], message, validating)


def _training_step(obs: Observation, validated_now: bool = False) -> Step:
    assert obs.spec is not None
    conditions: dict[ConditionType, ConditionValue] = {}
    if validated_now:
        conditions[ConditionType.VALIDATED] = ("True", "DataValid", "the training data passed validation")
    job = obs.train_job
    wants_suspend = obs.spec.suspend
    if job is None:
        if wants_suspend:
            conditions[ConditionType.SUSPENDED] = ("True", "Suspended", "spec.suspend is true")
            return Step(Phase.SUSPENDED, "Suspended", "spec.suspend is true", conditions, (Action.CREATE_TRAINING,))
        reason, message = _queued_reason(obs)
        conditions[ConditionType.ADMITTED] = ("False", reason, message)
        return Step(Phase.QUEUED, reason, message, conditions, (Action.CREATE_TRAINING,))

    if job_condition(job, "Complete"):
        conditions[ConditionType.RUNNING] = ("False", "TrainingSucceeded", "the trainer finished")
        conditions[ConditionType.SUCCEEDED] = ("True", "TrainingSucceeded", "the trainer finished")
        return Step(
            Phase.SUCCEEDED,
            "TrainingSucceeded",
            "the trainer finished and wrote the weights",
            conditions,
            output=rank0_output(obs.train_pods),
        )
    if job_condition(job, "Failed"):
        step = failed(pod_failure(job, obs.train_pods, "TrainingFailed"), validated=True)
        return replace(step, conditions={**conditions, **step.conditions})
    regroup = _group_restart(obs, job, conditions)
    if regroup is not None:
        return regroup

    job_suspended = bool(job.get("spec", {}).get("suspend"))
    actions: tuple[Action, ...] = ()
    if wants_suspend and not job_suspended:
        actions = (Action.SUSPEND_TRAINING,)
    elif not wants_suspend and job_suspended and not obs.kueue_managed:
        actions = (Action.RESUME_TRAINING,)
    if wants_suspend:
        conditions[ConditionType.SUSPENDED] = ("True", "Suspended", "spec.suspend is true")
        conditions[ConditionType.RUNNING] = ("False", "Suspended", "spec.suspend is true")
        return Step(Phase.SUSPENDED, "Suspended", "spec.suspend is true", conditions, actions)
    if condition_status(obs.status, ConditionType.SUSPENDED) == "True":
        conditions[ConditionType.SUSPENDED] = ("False", "Resumed", "spec.suspend is false")
    if job_suspended:
        reason, message = _queued_reason(obs)
        conditions[ConditionType.ADMITTED] = ("False", reason, message)
        return Step(Phase.QUEUED, reason, message, conditions, actions)

    active = [pod for pod in obs.train_pods if pod_phase(pod) in ("Pending", "Running") and not deleting(pod)]
    stuck = _stuck(obs, active, job)
    if stuck is not None:
        step = failed(stuck, validated=True)
        return replace(step, conditions={**conditions, **step.conditions}, actions=(Action.DELETE_WORKLOAD,))
    trouble = _warning(obs, job, active)
    if trouble is not None and not any(pod_phase(pod) == "Running" for pod in active):
        conditions[ConditionType.ADMITTED] = ("False", trouble.reason, _say(trouble))
        phase = Phase.QUEUED if trouble.kind == "Job" else Phase.STARTING
        return Step(phase, trouble.reason, _say(trouble), conditions, actions)
    unschedulable = unschedulable_message(active)
    if unschedulable:
        conditions[ConditionType.ADMITTED] = ("False", "Unschedulable", unschedulable)
        return Step(Phase.QUEUED, "Unschedulable", unschedulable, conditions, actions)
    admitted = (
        "the trainer pods have their GPUs" if obs.spec.resources.gpus_per_node else "the trainer pods are scheduled"
    )
    conditions[ConditionType.ADMITTED] = ("True", "PodsScheduled", admitted)
    if any(completion_index(pod) == 0 and pod_phase(pod) == "Running" for pod in active):
        conditions[ConditionType.RUNNING] = ("True", "TrainingRunning", TRAINER_RUNNING)
        return Step(Phase.RUNNING, "TrainingRunning", TRAINER_RUNNING, conditions, actions)
    if any(completion_index(pod) == 0 and pod_phase(pod) == "Succeeded" for pod in obs.train_pods):
        # The trainer is done; the Job controller marks the Job Complete a moment later.
        conditions[ConditionType.RUNNING] = ("True", "TrainingRunning", TRAINER_RUNNING)
        return Step(Phase.RUNNING, "TrainingRunning", TRAINER_FINISHED, conditions)
    if not any(scheduled(pod) for pod in active):
        conditions.pop(ConditionType.ADMITTED)
        return Step(Phase.STARTING, "PodsStarting", WAITING_FOR_PODS, conditions, actions)
    return Step(Phase.STARTING, "PodsStarting", waiting_message(active) or PODS_STARTING, conditions, actions)


def _group_restart(obs: Observation, job: Manifest, conditions: dict[ConditionType, ConditionValue]) -> Step | None:
    """A multi-node run whose rank failed or was disrupted starts again as a whole, from the last checkpoint.

    A lone replacement pod cannot rejoin the others' static rendezvous, and the survivors would wait in NCCL
    until its timeout: the training Job is deleted (foreground: its pods stop first) and made again.
    """
    assert obs.spec is not None
    if job.get("metadata", {}).get("deletionTimestamp"):
        message = "the previous attempt's pods are stopping; every rank starts again from the last checkpoint"
        conditions[ConditionType.RUNNING] = ("False", GROUP_RESTART, message)
        return Step(Phase.STARTING, GROUP_RESTART, message, conditions)
    if obs.spec.resources.nodes == 1:
        return None
    lost = failed_rank(obs.train_pods)
    if lost is None or terminated(lost).get("exitCode") == EXIT_USER_ERROR:
        return None  # a user error fails the whole Job (its podFailurePolicy), nothing to restart
    name = lost["metadata"]["name"]
    disrupted = disruption(lost)
    what = f"was disrupted ({disrupted[0]})" if disrupted else f"failed (exit code {terminated(lost).get('exitCode')})"
    restarts = obs.status.restarts or 0
    if restarts >= obs.spec.backoff_limit:
        error = ErrorInfo(
            reason="BackoffLimitExceeded",
            message=f"pod {name} {what}, and the group has restarted {restarts} times (spec.backoffLimit)",
            pod=name,
        )
        return replace(failed(error, validated=True), actions=(Action.DELETE_WORKLOAD,))
    message = f"pod {name} {what}: every rank starts again from the last checkpoint"
    conditions[ConditionType.RUNNING] = ("False", GROUP_RESTART, message)
    return Step(Phase.STARTING, GROUP_RESTART, message, conditions, (Action.RESTART_TRAINING,))


def _stuck(obs: Observation, pods: Sequence[Manifest], job: Manifest) -> ErrorInfo | None:
    """A pod stuck on what cannot heal, or a volume that has failed to mount, for longer than the timeout."""
    stuck = stuck_pod(pods, obs.now, obs.stuck_timeout_seconds)
    if stuck is not None:
        return ErrorInfo(reason=stuck[0], message=stuck[1])
    for warning in _warnings_of(obs, job, pods):
        if (
            warning.reason == "FailedMount"
            and (obs.now - warning.first_seen).total_seconds() >= obs.stuck_timeout_seconds
        ):
            return ErrorInfo(reason="VolumeMountFailed", message=_say(warning))
    return None


def _warnings_of(obs: Observation, job: Manifest, pods: Sequence[Manifest]) -> list[ChildWarning]:
    names = {("Job", job.get("metadata", {}).get("name"))} | {("Pod", pod["metadata"]["name"]) for pod in pods}
    return [warning for warning in obs.warnings if (warning.kind, warning.name) in names]


def _warning(obs: Observation, job: Manifest, pods: Sequence[Manifest]) -> ChildWarning | None:
    """The newest Warning Event on the Job or its active pods (FailedCreate, FailedMount, ...), if any."""
    relevant = _warnings_of(obs, job, pods)
    return relevant[-1] if relevant else None


def _say(warning: ChildWarning) -> str:
    return f"{warning.kind} {warning.name}: {warning.reason}: {warning.message}"


def _queued_reason(obs: Observation) -> tuple[str, str]:
    if obs.kueue_managed:
        return "AwaitingAdmission", "waiting for Kueue to admit the workload"
    return "Creating", "creating the training Job"
