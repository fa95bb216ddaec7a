"""Replicate's training object and the body that creates one, with the names and shapes its API uses."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune_operator.api.spec import WebhookEvent

# How a FineTuneJob made through the API remembers what the request said, for the training object.
DESTINATION_ANNOTATION = "finetune.dev/destination"
MODEL_VERSION_ANNOTATION = "finetune.dev/model-version"
CREATED_BY_ANNOTATION = "finetune.dev/created-by"

TrainingStatus = Literal["starting", "processing", "succeeded", "failed", "canceled"]
# Replicate's owner and model names: lowercase letters, digits, dashes, underscores and dots.
MODEL_NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,99}"


class TrainingOutput(BaseModel):
    weights: str | None = None
    version: str | None = Field(None, description="<destination>:<id> of the trained version.")


class TrainingUrls(BaseModel):
    get: str
    cancel: str


class Training(BaseModel):
    """A training as Replicate's API returns it (and as its webhooks send it)."""

    id: str
    model: str
    version: str
    destination: str | None = None
    status: TrainingStatus
    input: dict[str, Any]
    output: TrainingOutput | None = None
    error: str | None = None
    logs: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    urls: TrainingUrls
    created_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None


class CreateTraining(BaseModel):
    """The body of `POST /v1/models/{owner}/{name}/versions/{version}/trainings`."""

    model_config = ConfigDict(extra="forbid")

    destination: str = Field(
        pattern=f"^{MODEL_NAME_PATTERN}/{MODEL_NAME_PATTERN}$", description="<owner>/<model> of the trained weights."
    )
    input: dict[str, Any]
    webhook: str | None = None
    webhook_completed: str | None = None
    webhook_events_filter: list[WebhookEvent] | None = Field(None, min_length=1)


class TrainingPage(BaseModel):
    """One page of `GET /v1/trainings`: `next` and `previous` are URLs to GET, or null."""

    previous: str | None = None
    next: str | None = None
    results: list[Training]
