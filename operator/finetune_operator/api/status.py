"""FineTuneJob.status: what the operator reports back, and which part of the operator writes each field.

Each field has exactly one writer, so that two parts never undo each other's writes:

- the state machine (`finetune_operator.lifecycle`, written by the reconciler): phase, reason, message,
  conditions, observedGeneration, createdAt, startedAt, completedAt, gpuSeconds, restarts, resolved, error,
  output, workload;
- the log follower (`finetune_operator.trainer_log`, written by `finetune_operator.log_follower`): progress,
  logs, validationSamples, lossHistory;
- the webhook dispatcher (`finetune_operator.webhooks.deliveries`, written by
  `finetune_operator.webhooks.dispatcher`): webhook.

`STATE_MACHINE_FIELDS`, `LOG_FOLLOWER_FIELDS` and `WEBHOOK_DISPATCHER_FIELDS` say the same in code; a test
checks that together they are every field, and that no writer patches a field of another.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import ConfigDict, Field

from finetune_contract.protocol import Output, ResolvedRun
from finetune_operator.api.spec import KubeModel, WebhookEvent


class Phase(StrEnum):
    PENDING = "Pending"
    VALIDATING = "Validating"
    QUEUED = "Queued"
    STARTING = "Starting"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELED = "Canceled"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELED)

    @property
    def replicate_status(self) -> str:
        """The status Replicate's training API would show."""
        if self is Phase.RUNNING:
            return "processing"
        if self.finished:
            return self.value.lower()
        return "starting"


class ConditionType(StrEnum):
    VALIDATED = "Validated"
    ADMITTED = "Admitted"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELED = "Canceled"
    SUSPENDED = "Suspended"
    # kstatus (Flux, cli-utils, `kubectl wait`): derived from the phase by `finetune_operator.lifecycle.kstatus`.
    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"


class Condition(KubeModel):
    type: ConditionType
    status: str = Field(pattern="^(True|False|Unknown)$")
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class Progress(KubeModel):
    epoch: float | None = None
    total_epochs: int | None = None
    step: int | None = None
    total_steps: int | None = None
    percent: int | None = Field(None, ge=0, le=100)
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: int | None = None
    last_heartbeat: str | None = None


# The trainer's ResolvedRun (protocol, snake_case), as the status shows it (camelCase).
class Resolved(KubeModel, ResolvedRun):
    """The batch plan and data sizes the run actually uses."""

    model_config = ConfigDict(frozen=False, extra="forbid")


class LossPoint(KubeModel):
    step: int
    epoch: float
    loss: float


# The curves fit in a status at most MAX_TRAIN_POINTS + MAX_EVAL_POINTS = 200 points long, whatever the run's length.
MAX_TRAIN_POINTS = 160
MAX_EVAL_POINTS = 40


class LossHistory(KubeModel):
    """The train and eval loss over the run, thinned evenly as it grows; the newest point is always there."""

    train: list[LossPoint] = Field(default_factory=list, max_length=MAX_TRAIN_POINTS)
    eval: list[LossPoint] = Field(default_factory=list, max_length=MAX_EVAL_POINTS)


class ValidationSample(KubeModel):
    epoch: float
    prompt: str
    completion: str


class ErrorInfo(KubeModel):
    reason: str
    message: str
    exit_code: int | None = None
    pod: str | None = None


class Workload(KubeModel):
    job: str | None = None
    service: str | None = None
    config_map: str | None = None


class WebhookDelivery(KubeModel):
    """One webhook message not delivered yet. Its id (the `webhook-id` header) stays the same on every attempt."""

    id: str
    event: WebhookEvent
    target: Literal["url", "completedUrl"] = Field(description="Which of spec.webhook's URLs receives it.")
    attempts: int = 0
    next_attempt_at: str = Field(description="Not before this time (RFC 3339).")
    first_attempt_at: str | None = None
    last_error: str | None = None


class WebhookStatus(KubeModel):
    """Webhook delivery state: kept in the FineTuneJob, so deliveries go on after an operator restart."""

    sequence: int = Field(0, description="Messages made so far; the last message's number.")
    noticed: list[Literal["start", "completed"]] = Field(
        default_factory=list,
        max_length=2,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="The once-only events already turned into messages.",
    )
    logs_digest: str | None = Field(None, description="Digest of the logs last turned into a message.")
    output_digest: str | None = Field(None, description="Digest of the output last turned into a message.")
    pending: list[WebhookDelivery] = Field(default_factory=list, description="Messages to deliver, oldest first.")
    delivered: int = Field(0, description="Messages the receiver accepted (2xx).")
    failed: int = Field(0, description="Messages given up: refused addresses, or no success within the retry window.")
    last_delivered: str | None = Field(None, description="Id of the last message accepted.")
    last_intermediate_at: str | None = Field(None, description="When the last output or logs message was accepted.")
    last_error: str | None = None


class FineTuneJobStatus(KubeModel):
    """What the operator reports: phase, conditions, progress, the batch plan, logs, output weights."""

    phase: Phase = Phase.PENDING
    reason: str | None = Field(None, description="Why the job is in its phase: a word to search for.")
    message: str | None = Field(None, description="The same, for a person.")
    conditions: list[Condition] = Field(
        default_factory=list,
        # One condition per type: server-side apply and strategic merges key the list by type.
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = None
    created_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    gpu_seconds: int | None = Field(
        None, description="GPU-seconds held by the trainer pods, across suspends and retries."
    )
    gpu_seconds_until: str | None = Field(None, description="The time up to which gpuSeconds is counted.")
    restarts: int | None = Field(None, description="Trainer pods that failed and were retried.")
    progress: Progress | None = None
    resolved: Resolved | None = None
    validation_samples: list[ValidationSample] = Field(default_factory=list)
    loss_history: LossHistory | None = Field(
        None, description="Train and eval loss curves, downsampled to at most 200 points (the log follower's)."
    )
    logs: str | None = Field(None, description="The last lines of the rank-0 trainer log (bounded).")
    output: Output | None = None
    error: ErrorInfo | None = None
    workload: Workload | None = None
    webhook: WebhookStatus | None = None


# The wire (camelCase) names of the fields each writer owns; see the module's docstring.
STATE_MACHINE_FIELDS = frozenset(
    (
        "phase",
        "reason",
        "message",
        "conditions",
        "observedGeneration",
        "createdAt",
        "startedAt",
        "completedAt",
        "gpuSeconds",
        "gpuSecondsUntil",
        "restarts",
        "resolved",
        "error",
        "output",
        "workload",
    )
)
LOG_FOLLOWER_FIELDS = frozenset(("progress", "logs", "validationSamples", "lossHistory"))
WEBHOOK_DISPATCHER_FIELDS = frozenset(("webhook",))
