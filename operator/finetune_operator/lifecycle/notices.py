"""The Kubernetes Events a transition is worth: one per phase change, and one per trainer retry."""

from __future__ import annotations

from finetune_operator.api.status import FineTuneJobStatus, Phase
from finetune_operator.lifecycle.failure_policy import pod_failure
from finetune_operator.lifecycle.observation import Notice, Observation
from finetune_operator.lifecycle.observed import disruption
from finetune_operator.lifecycle.phase import NAME_CONFLICT, Step

_WARNING_REASONS = frozenset(("Unschedulable", "ValidationUnschedulable", NAME_CONFLICT))


def transition_notices(previous: FineTuneJobStatus, status: FineTuneJobStatus, step: Step) -> list[Notice]:
    if (previous.phase, previous.reason) == (status.phase, status.reason):
        return []
    warning = status.phase is Phase.FAILED or step.reason in _WARNING_REASONS
    return [Notice("Warning" if warning else "Normal", step.reason, f"{status.phase.value}: {step.message}")]


def retry_notices(obs: Observation, previous: FineTuneJobStatus, status: FineTuneJobStatus) -> list[Notice]:
    before, after = previous.restarts or 0, status.restarts or 0
    if after <= before or status.phase is Phase.FAILED:
        return []
    failure = pod_failure(obs.train_job or {}, obs.train_pods, "TrainerFailed")
    limit = obs.spec.backoff_limit if obs.spec is not None else "?"
    return [
        Notice(
            "Warning",
            "TrainerRestarted",
            f"{failure.message} (pod {failure.pod}); retry {after} of {limit}",
        )
    ]


def disruption_notices(obs: Observation) -> list[Notice]:
    """A Warning for each trainer pod newly disrupted (preempted, evicted, drained): it does not count as a failure."""
    notices = []
    for pod in obs.train_pods:
        found = disruption(pod)
        if found is None or pod["metadata"]["uid"] in obs.known_disruptions:
            continue
        reason, message = found
        notices.append(
            Notice(
                "Warning",
                "TrainerDisrupted",
                f"pod {pod['metadata']['name']} was disrupted ({reason}: {message}); it is replaced and resumes "
                "from the last checkpoint, without counting against spec.backoffLimit",
            )
        )
    return notices
