"""A FineTuneJob resolved once per reconcile: the one value every workload builder takes.

As Kubeflow Trainer resolves a TrainJob into `runtime.Info` before its plugins run, `resolve_run` turns the
FineTuneJob's metadata and spec, with the operator's settings, into a `RunInfo`: the owner, the child names, the
trainer's input file (with default weights and destination filled in), the image and the claims to mount.

The CRD schema rejects most bad specs at `kubectl apply`. What is left needs the operator's settings (default
weights and destination) or more than a regular expression (addresses in URIs); a failure here is the user's to
fix, so it raises `InvalidSpec` naming the field, which the operator reports as phase Failed and never retries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from finetune_contract.trainer_config import TrainerConfig
from finetune_contract.uris import DATA_SCHEMES, DESTINATION_SCHEMES, WEIGHTS_SCHEMES, check_uri, pvc_claim
from finetune_operator.api import FineTuneJobSpec
from finetune_operator.conventions import KUEUE_QUEUE_LABEL
from finetune_operator.naming import WorkloadNames, workload_names
from finetune_operator.settings import Settings


class InvalidSpec(ValueError):
    """A spec the operator cannot run; `field` is the path to fix, e.g. `spec.input.train_data`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Owner:
    """The FineTuneJob's metadata, as far as its children need it."""

    name: str
    namespace: str
    uid: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class RunInfo:
    """Everything the workload builders need about one FineTuneJob, resolved once."""

    owner: Owner
    names: WorkloadNames
    spec: FineTuneJobSpec
    trainer_config: TrainerConfig
    image: str
    # Each claim a pvc:// URI of the job names, sorted, and whether the trainer writes to it.
    pvc_claims: Mapping[str, bool]
    settings: Settings

    @property
    def kueue_queue(self) -> str | None:
        return self.owner.labels.get(KUEUE_QUEUE_LABEL)


def resolve_run(owner: Owner, spec: FineTuneJobSpec, settings: Settings) -> RunInfo:
    """The FineTuneJob as its children need it; raises InvalidSpec naming the field to fix."""
    config = resolve_trainer_config(owner.name, owner.namespace, owner.uid, spec, settings)
    return RunInfo(
        owner=owner,
        names=workload_names(owner.name),
        spec=spec,
        trainer_config=config,
        image=spec.image or settings.trainer_image,
        pvc_claims=_pvc_claims(config),
        settings=settings,
    )


def resolve_trainer_config(
    name: str, namespace: str, uid: str, spec: FineTuneJobSpec, settings: Settings
) -> TrainerConfig:
    """The trainer's input for FineTuneJob `namespace/name`; raises InvalidSpec naming the field to fix."""
    _check("spec.input.train_data", spec.input.train_data, DATA_SCHEMES)
    if spec.input.validation_data is not None:
        _check("spec.input.validation_data", spec.input.validation_data, DATA_SCHEMES)
    return TrainerConfig(
        input=spec.input,
        model_name=spec.model.name,
        weights=resolve_weights(spec, settings),
        destination=resolve_destination(name, namespace, uid, spec, settings),
        run_uid=uid,
        nodes=spec.resources.nodes,
        gpus_per_node=spec.resources.gpus_per_node,
        job=f"{namespace}/{name}",
        activation_checkpointing=settings.activation_checkpointing,
        checkpoint_every_minutes=settings.checkpoint_every_minutes,
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


def resolve_destination(name: str, namespace: str, uid: str, spec: FineTuneJobSpec, settings: Settings) -> str:
    """spec.destination, or `<the operator's default destination>/<namespace>/<name>/<uid>/`.

    The run's UID keeps a re-created namesake from ever writing over (or resuming from) this run's outputs.
    """
    if spec.destination is not None:
        return _check("spec.destination", spec.destination, DESTINATION_SCHEMES)
    if settings.default_destination is None:
        raise InvalidSpec("spec.destination", "no destination given, and the operator has no default destination")
    default = f"{settings.default_destination.rstrip('/')}/{namespace}/{name}/{uid}/"
    return _check("spec.destination", default, DESTINATION_SCHEMES, origin="the operator's default destination")


def _pvc_claims(config: TrainerConfig) -> dict[str, bool]:
    claims: dict[str, bool] = {}
    for uri in (config.input.train_data, config.input.validation_data, config.weights):
        claim = None if uri is None else pvc_claim(uri)
        if claim is not None:
            claims[claim] = False
    destination_claim = pvc_claim(config.destination)
    if destination_claim is not None:
        claims[destination_claim] = True
    return dict(sorted(claims.items()))


def _check(field: str, uri: str, schemes: tuple[str, ...], origin: str | None = None) -> str:
    try:
        return check_uri(uri, schemes)
    except ValueError as error:
        message = str(error) if origin is None else f"{error} (from {origin})"
        raise InvalidSpec(field, message) from error
