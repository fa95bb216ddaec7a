"""Health in the kstatus conventions: the Ready, Reconciling and Stalled conditions, from the phase.

Flux, cli-utils (kpt, `kubectl apply --prune` tooling) and `kubectl wait --for=condition=Ready` read these
without knowing anything about FineTuneJobs. kstatus computes a resource's status as: InProgress while
`status.observedGeneration` is behind `metadata.generation` or Reconciling is True, Failed when Stalled is True,
Current otherwise; Ready is the condition people and Flux wait on.

    phase                                          Ready   Reconciling   Stalled
    Pending, Validating, Queued, Starting, Running False   True          False
    Suspended                                      False   False         False
    Succeeded                                      True    False         False
    Failed, Canceled                               False   False         True

The reason and message of each condition are the phase's, so `kubectl wait` and Flux show why.
"""

from __future__ import annotations

from finetune_operator.api.status import ConditionType, FineTuneJobStatus, Phase
from finetune_operator.lifecycle.conditions import set_condition

# (status, reason, message) of one condition, as set_condition takes it.
ConditionState = tuple[str, str, str]


def kstatus_conditions(status: FineTuneJobStatus) -> dict[ConditionType, ConditionState]:
    """Ready, Reconciling and Stalled for a status whose phase, reason and message are set."""
    phase = status.phase
    reason = status.reason or phase.value
    message = status.message or f"the job is {phase.value}"
    ready = "True" if phase is Phase.SUCCEEDED else "False"
    stalled = "True" if phase in (Phase.FAILED, Phase.CANCELED) else "False"
    reconciling = "False" if phase.finished or phase is Phase.SUSPENDED else "True"
    return {
        ConditionType.READY: (ready, reason, message),
        ConditionType.RECONCILING: (reconciling, reason, message),
        ConditionType.STALLED: (stalled, reason, message),
    }


def with_kstatus_conditions(status: FineTuneJobStatus, now: str, generation: int) -> FineTuneJobStatus:
    """The status with the kstatus conditions its phase implies."""
    conditions = list(status.conditions)
    for kind, (state, reason, message) in kstatus_conditions(status).items():
        conditions = set_condition(
            conditions, kind=kind, state=state, reason=reason, message=message, now=now, generation=generation
        )
    return status.model_copy(update={"conditions": conditions})
