"""FineTuneJob <-> Replicate training object, both ways, as pure functions.

A training's id is `<namespace>.<name>` of its FineTuneJob (a namespace has no dots, so the first dot splits it).
`POST /v1/models/{owner}/{name}/versions/{version}/trainings` with destination `<dest-owner>/<dest-model>`
becomes a FineTuneJob in the namespace of `<dest-owner>` that fine-tunes base model `<owner>/<name>` with the
weights the operator's `modelWeights` setting names for `<owner>/<name>:<version>` (or else `<owner>/<name>`),
and writes under `<defaultDestination>/<namespace>/<dest-model>/<job name>/`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Any, cast

from pydantic import ValidationError

from finetune_contract.inputs import TrainingInput
from finetune_operator.api import API_VERSION, KIND, MAX_NAME_LENGTH, FineTuneJobSpec
from finetune_operator.api.status import FineTuneJobStatus, Phase
from finetune_operator.replicate_api.training import (
    CREATED_BY_ANNOTATION,
    DESTINATION_ANNOTATION,
    MODEL_VERSION_ANNOTATION,
    CreateTraining,
    Training,
    TrainingOutput,
    TrainingStatus,
    TrainingUrls,
)
from finetune_operator.resolution import InvalidSpec, resolve_trainer_config
from finetune_operator.settings import Settings
from finetune_operator.timestamps import parse_timestamp
from finetune_operator.webhooks.addresses import url_refusal

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
NAME_SUFFIX_LENGTH = 8
# Where the request names what the spec holds: the field a 422 names.
_REQUEST_FIELDS = {
    "spec.input": "input",
    "spec.model": "model",
    "spec.destination": "destination",
    "spec.webhook.url": "webhook",
    "spec.webhook.completedUrl": "webhook_completed",
    "spec.webhook.events": "webhook_events_filter",
}


@dataclass(frozen=True)
class InvalidField:
    field: str
    description: str


class InvalidTraining(ValueError):
    """A request that makes no FineTuneJob; each problem names the request's field."""

    def __init__(self, problems: Sequence[InvalidField]) -> None:
        super().__init__("; ".join(f"{p.field}: {p.description}" for p in problems))
        self.problems = tuple(problems)

    @classmethod
    def of(cls, field: str, description: str) -> InvalidTraining:
        return cls([InvalidField(field, description)])


# ------------------------------------------------------------------------------------------------ ids


def training_id(namespace: str, name: str) -> str:
    return f"{namespace}.{name}"


def parse_training_id(value: str) -> tuple[str, str] | None:
    """(namespace, name) of a training id, or None when it cannot be one."""
    namespace, dot, name = value.partition(".")
    if not dot or not _DNS_LABEL.match(namespace) or not _NAME.match(name) or len(name) > MAX_NAME_LENGTH:
        return None
    return namespace, name


def owner_namespace(owner: str, settings: Settings) -> str:
    """The namespace of a destination owner: the setting's mapping, or the namespace of the owner's name."""
    namespace = settings.api_owner_namespaces.get(owner, owner)
    if not _DNS_LABEL.match(namespace):
        raise InvalidTraining.of(
            "destination",
            f"owner {owner!r} is not a namespace name, and the operator's apiOwnerNamespaces setting maps it to none",
        )
    return namespace


def job_name(destination_model: str, suffix: str) -> str:
    """`<model>-<suffix>`: the destination model's name as a DNS label, cut so that the whole fits a label."""
    prefix = re.sub(r"[^a-z0-9-]+", "-", destination_model.lower()).strip("-")
    prefix = prefix[: MAX_NAME_LENGTH - len(suffix) - 1].rstrip("-") or "training"
    return f"{prefix}-{suffix}"


# ------------------------------------------------------------------------------------------------ request -> job


def parse_request(body: Any) -> CreateTraining:
    if not isinstance(body, dict):
        raise InvalidTraining.of("body", "must be a JSON object")
    try:
        return CreateTraining.model_validate(body)
    except ValidationError as error:
        raise InvalidTraining(_problems(error)) from None


def finetunejob_manifest(
    request: CreateTraining,
    *,
    base_model: str,
    version: str,
    namespace: str,
    name: str,
    created_by: str,
    settings: Settings,
) -> dict[str, Any]:
    """The FineTuneJob that a create-training request makes; raises InvalidTraining naming the request's field."""
    destination_model = request.destination.partition("/")[2]
    try:
        training_input = TrainingInput.model_validate(request.input)
    except ValidationError as error:
        raise InvalidTraining(_problems(error, prefix="input")) from None
    spec: dict[str, Any] = {
        "input": training_input.model_dump(mode="json", exclude_unset=True),
        "model": {"name": base_model, "weights": _base_weights(base_model, version, settings)},
        "destination": _destination(namespace, destination_model, name, settings),
    }
    webhook = _webhook(request, settings.webhook_allowed_networks)
    if webhook is not None:
        spec["webhook"] = webhook
    try:
        parsed = FineTuneJobSpec.model_validate(spec)
        # Checked before the FineTuneJob (and so its UID) exists: the checks do not depend on the UID.
        resolve_trainer_config(name, namespace, "", parsed, settings)
    except ValidationError as error:
        raise InvalidTraining(_problems(error, prefix="spec")) from None
    except InvalidSpec as error:
        raise InvalidTraining.of(request_field(error.field), error.message) from None
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {
                DESTINATION_ANNOTATION: request.destination,
                MODEL_VERSION_ANNOTATION: version,
                CREATED_BY_ANNOTATION: created_by,
            },
        },
        "spec": spec,
    }


def _base_weights(base_model: str, version: str, settings: Settings) -> str:
    for key in (f"{base_model}:{version}", base_model):
        if key in settings.model_weights:
            return settings.model_weights[key]
    known = ", ".join(sorted(settings.model_weights)) or "none"
    raise InvalidTraining.of("model", f"the operator has no weights for {base_model}:{version} (it has: {known})")


def _destination(namespace: str, destination_model: str, name: str, settings: Settings) -> str:
    if settings.default_destination is None:
        raise InvalidTraining.of("destination", "the operator has no storage for trained weights (defaultDestination)")
    return f"{settings.default_destination.rstrip('/')}/{namespace}/{destination_model}/{name}/"


def _webhook(request: CreateTraining, allowed: Sequence[IPv4Network | IPv6Network]) -> dict[str, Any] | None:
    for field, url in (("webhook", request.webhook), ("webhook_completed", request.webhook_completed)):
        refusal = None if url is None else url_refusal(url, allowed)
        if refusal is not None:
            raise InvalidTraining.of(field, refusal)
    if request.webhook is None:
        if request.webhook_events_filter is not None:
            raise InvalidTraining.of("webhook_events_filter", "filters the events of `webhook`, which is not given")
        if request.webhook_completed is None:
            return None
        return {"url": request.webhook_completed, "events": ["completed"]}
    webhook: dict[str, Any] = {"url": request.webhook}
    if request.webhook_events_filter is not None:
        webhook["events"] = list(dict.fromkeys(request.webhook_events_filter))
    if request.webhook_completed is not None:
        webhook["completedUrl"] = request.webhook_completed
    return webhook


def request_field(spec_field: str) -> str:
    """The request's name for a FineTuneJob field (`spec.input.chunk_size` -> `input.chunk_size`)."""
    path = spec_field if spec_field.startswith("spec.") else f"spec.{spec_field}"
    for prefix, field in sorted(_REQUEST_FIELDS.items(), key=lambda item: -len(item[0])):
        if path == prefix:
            return field
        if path.startswith(prefix + ".") or path.startswith(prefix + "["):
            return field + path[len(prefix) :]
    return path


def _problems(error: ValidationError, prefix: str = "") -> list[InvalidField]:
    problems = []
    for item in error.errors():
        location = [str(part) for part in item["loc"]]
        message = item["msg"].removeprefix("Value error, ")
        if not location and prefix == "input":
            # A rule across fields (micro_batch_size <= train_batch_size) names its field first in the message.
            first_word = message.split(" ", 1)[0]
            location = [first_word] if first_word in TrainingInput.model_fields else []
        path = ".".join([prefix, *location] if prefix else location) or "body"
        problems.append(InvalidField(request_field(path) if prefix == "spec" else path, message))
    return problems


# ------------------------------------------------------------------------------------------------ job -> training


def to_training(finetunejob: Mapping[str, Any], base_url: str) -> Training:
    """The training object of a FineTuneJob (made through the API or not); `base_url` prefixes its urls."""
    metadata = finetunejob["metadata"]
    annotations: Mapping[str, str] = metadata.get("annotations") or {}
    spec: Mapping[str, Any] = finetunejob.get("spec") or {}
    status = _status(finetunejob.get("status"))
    identifier = training_id(metadata["namespace"], metadata["name"])
    model: Mapping[str, Any] = spec.get("model") or {}
    destination = annotations.get(DESTINATION_ANNOTATION)
    output = None
    if status.output is not None:
        version = f"{destination}:{metadata['uid']}" if destination else None
        output = TrainingOutput(weights=status.output.weights, version=version)
    error = None
    if status.phase is Phase.FAILED:
        error = status.error.message if status.error is not None else status.message
    metrics = {}
    if status.started_at and status.completed_at:
        elapsed = parse_timestamp(status.completed_at) - parse_timestamp(status.started_at)
        metrics["predict_time"] = elapsed.total_seconds()
    url = f"{base_url.rstrip('/')}/v1/trainings/{identifier}"
    return Training(
        id=identifier,
        model=str(model.get("name", "")),
        version=annotations.get(MODEL_VERSION_ANNOTATION) or str(model.get("weights") or ""),
        destination=destination,
        status=cast(TrainingStatus, status.phase.replicate_status),
        input=dict(spec.get("input") or {}),
        output=output,
        error=error,
        logs=status.logs or "",
        metrics=metrics,
        urls=TrainingUrls(get=url, cancel=f"{url}/cancel"),
        created_at=metadata.get("creationTimestamp"),
        started_at=status.started_at,
        completed_at=status.completed_at,
    )


def _status(raw: Any) -> FineTuneJobStatus:
    try:
        return FineTuneJobStatus.model_validate(raw or {})
    except ValidationError:
        return FineTuneJobStatus()
