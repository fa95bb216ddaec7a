"""From a FineTuneJob's spec to the trainer's input: the operator's defaults, and the checks CEL cannot do.

The CRD schema rejects most bad specs at `kubectl apply`. What is left needs the operator's settings
(default weights and destination) or more than a regular expression (addresses in URIs); a failure here is
the user's to fix, so the operator reports it as phase Failed and never retries it.
"""

from __future__ import annotations

from finetune_contract.trainer_config import TrainerConfig
from finetune_contract.uris import DATA_SCHEMES, DESTINATION_SCHEMES, WEIGHTS_SCHEMES, check_uri
from finetune_operator.api import FineTuneJobSpec
from finetune_operator.settings import Settings


class InvalidSpec(ValueError):
    """A spec the operator cannot run; `field` is the path to fix, e.g. `spec.input.train_data`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def resolve_trainer_config(name: str, namespace: str, spec: FineTuneJobSpec, settings: Settings) -> TrainerConfig:
    """The trainer's input for FineTuneJob `namespace/name`; raises InvalidSpec naming the field to fix."""
    _check("spec.input.train_data", spec.input.train_data, DATA_SCHEMES)
    if spec.input.validation_data is not None:
        _check("spec.input.validation_data", spec.input.validation_data, DATA_SCHEMES)
    weights = resolve_weights(spec, settings)
    destination = resolve_destination(name, namespace, spec, settings)
    return TrainerConfig(
        input=spec.input,
        model_name=spec.model.name,
        weights=weights,
        destination=destination,
        nodes=spec.resources.nodes,
        gpus_per_node=spec.resources.gpus_per_node,
        job=f"{namespace}/{name}",
    )


def resolve_weights(spec: FineTuneJobSpec, settings: Settings) -> str:
    """spec.model.weights, or the operator's default weights for the model name."""
    if spec.model.weights is not None:
        return _check("spec.model.weights", spec.model.weights, WEIGHTS_SCHEMES)
    default = settings.model_weights.get(spec.model.name)
    if default is None:
        known = ", ".join(sorted(settings.model_weights)) or "none"
        raise InvalidSpec(
            "spec.model.weights",
            f"no weights given, and the operator has no default weights for model {spec.model.name!r} "
            f"(it has defaults for: {known})",
        )
    return _check(
        "spec.model.weights", default, WEIGHTS_SCHEMES, origin=f"the operator's default for {spec.model.name}"
    )


def resolve_destination(name: str, namespace: str, spec: FineTuneJobSpec, settings: Settings) -> str:
    """spec.destination, or `<the operator's default destination>/<namespace>/<name>/`."""
    if spec.destination is not None:
        return _check("spec.destination", spec.destination, DESTINATION_SCHEMES)
    if settings.default_destination is None:
        raise InvalidSpec("spec.destination", "no destination given, and the operator has no default destination")
    default = f"{settings.default_destination.rstrip('/')}/{namespace}/{name}/"
    return _check("spec.destination", default, DESTINATION_SCHEMES, origin="the operator's default destination")


def _check(field: str, uri: str, schemes: tuple[str, ...], origin: str | None = None) -> str:
    try:
        return check_uri(uri, schemes)
    except ValueError as error:
        message = str(error) if origin is None else f"{error} (from {origin})"
        raise InvalidSpec(field, message) from error
