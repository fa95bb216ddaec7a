"""What the state machine takes (an Observation) and what it returns (a Decision)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from finetune_operator.api.spec import FineTuneJobSpec
from finetune_operator.api.status import ErrorInfo, FineTuneJobStatus
from finetune_operator.naming import WorkloadNames

# An object as the API server returns it (camelCase keys).
Manifest = Mapping[str, Any]


class Action(StrEnum):
    CREATE_VALIDATION = "CreateValidation"
    CREATE_TRAINING = "CreateTraining"
    SUSPEND_TRAINING = "SuspendTraining"
    RESUME_TRAINING = "ResumeTraining"
    DELETE_WORKLOAD = "DeleteWorkload"
    DELETE_FINETUNEJOB = "DeleteFineTuneJob"
    # Multi-node: stop every pod of the training Job (it is deleted, foreground) so that the group starts again.
    RESTART_TRAINING = "RestartTraining"


@dataclass(frozen=True)
class Notice:
    """A Kubernetes Event to record on the FineTuneJob."""

    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class ChildWarning:
    """A Warning Event on one of the FineTuneJob's children (e.g. the Job controller's FailedCreate)."""

    kind: str
    name: str
    reason: str
    message: str
    first_seen: datetime


@dataclass(frozen=True)
class Observation:
    """What the reconciler saw. `spec` is None when the stored spec cannot be read (then `spec_error` says why)."""

    spec: FineTuneJobSpec | None
    status: FineTuneJobStatus
    generation: int
    created_at: str
    now: datetime
    names: WorkloadNames
    kueue_managed: bool = False
    spec_error: str | None = None
    validation_job: Manifest | None = None
    validation_pods: Sequence[Manifest] = ()
    train_job: Manifest | None = None
    train_pods: Sequence[Manifest] = ()
    # Objects that hold a child's name but are not this FineTuneJob's (e.g. a deleted namesake's, still going).
    name_conflicts: Sequence[str] = ()
    # The API server refused to create a child for good (invalid, forbidden by quota or policy).
    rejected: ErrorInfo | None = None
    # Warning Events on the children, newest last.
    warnings: Sequence[ChildWarning] = ()
    # UIDs of disrupted trainer pods (preempted, evicted, drained) already counted and announced.
    known_disruptions: frozenset[str] = frozenset()
    # A pod stuck this long on what cannot heal (image not found, missing claim or config) fails the job.
    stuck_timeout_seconds: float = 600.0


@dataclass(frozen=True)
class Decision:
    """The status the state machine computed (its own fields; see api.status) and what to do next."""

    status: FineTuneJobStatus
    actions: tuple[Action, ...] = ()
    notices: tuple[Notice, ...] = ()
    requeue_after: float | None = None
