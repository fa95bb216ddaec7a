"""FineTuneJob.spec: Replicate's inputs under `input`, and Kubernetes' concerns in camelCase beside them."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue
from pydantic.alias_generators import to_camel

from finetune_contract.inputs import TrainingInput
from finetune_contract.uris import MAX_URI_LENGTH, DestinationURI, WeightsURI

DEFAULT_MODEL = "meta/llama-2-7b"
DEFAULT_GPU_PRODUCT = "NVIDIA-A40"
_IMMUTABLE = "is immutable once the job exists; create a new FineTuneJob instead"

# Strings under CEL rules carry a maxLength (and lists a maxItems): the API server estimates each rule's
# cost from the largest value the schema allows and refuses a CRD whose rules could exceed its budget.
DNS_NAME_LENGTH = 253
ENV_NAME_LENGTH = 256
ENV_VALUE_LENGTH = 4096
IMAGE_LENGTH = 512
_FIXED_ONCE_RUNNING = "Fixed once the training Job exists (status.workload is set)."
LABEL_VALUE_LENGTH = 63
LABEL_KEY_LENGTH = 317  # a 253-character DNS prefix, "/", and a 63-character name
# A Kubernetes resource quantity ("32", "500m", "192Gi", "1e3"), checked at admission, not at pod creation.
Quantity = Annotated[
    str,
    Field(
        max_length=32,
        pattern=r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+))?$",
    ),
]


def _immutable(field: str) -> dict[str, Any]:
    return {"x-kubernetes-validations": [{"rule": "self == oldSelf", "message": f"{field} {_IMMUTABLE}"}]}


class KubeModel(BaseModel):
    """A model whose wire names are camelCase, as Kubernetes' own are."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
    )


class ModelSpec(KubeModel):
    model_config = ConfigDict(json_schema_extra=_immutable("spec.model"))

    name: str = Field(DEFAULT_MODEL, min_length=1, max_length=DNS_NAME_LENGTH, description="Base model name.")
    weights: WeightsURI | None = Field(
        None,
        description="Base weights (hf://, https://, s3://, gs://, pvc://). "
        "Defaults to the operator's setting for the model name.",
    )


class Toleration(KubeModel):
    key: str | None = Field(
        None, max_length=LABEL_KEY_LENGTH, description="Taint key to tolerate; empty with Exists: every taint."
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        None, description="Exists (any value) or Equal (the value below, the default)."
    )
    value: str | None = Field(None, max_length=LABEL_VALUE_LENGTH, description="Taint value to match with Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty: every effect."
    )
    toleration_seconds: int | None = Field(
        None, description="With NoExecute: how long a pod stays on the node after the taint appears."
    )


class Resources(KubeModel):
    model_config = ConfigDict(json_schema_extra=_immutable("spec.resources"))

    gpus_per_node: int = Field(
        8,
        ge=0,
        le=64,
        description="GPUs per trainer pod (nvidia.com/gpu). 0 runs the trainer on the CPU: no GPU is requested, "
        "and each pod runs one process.",
    )
    gpu_product: str = Field(
        DEFAULT_GPU_PRODUCT,
        min_length=1,
        max_length=LABEL_VALUE_LENGTH,
        description="Node label nvidia.com/gpu.product to schedule on.",
    )
    nodes: int = Field(
        1,
        ge=1,
        le=64,
        description="Trainer pods (one per node); world size = nodes x gpusPerNode (x 1 process on the CPU).",
    )
    cpu: Quantity = Field("32", description="CPU request and limit per trainer pod.")
    memory: Quantity = Field("192Gi", description="Memory request and limit per trainer pod.")
    shared_memory: Quantity = Field("32Gi", description="Size of /dev/shm (NCCL and data loaders need it).")
    node_selector: dict[str, Annotated[str, Field(max_length=LABEL_VALUE_LENGTH)]] = Field(
        default_factory=dict, max_length=32, description="Extra node selector labels."
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32, description="Extra tolerations.")
    priority_class_name: str | None = Field(
        None, max_length=DNS_NAME_LENGTH, description="PriorityClass of the trainer pods (who is preempted first)."
    )

    @property
    def processes_per_node(self) -> int:
        """Trainer processes in each pod: one per GPU, or one on the CPU (gpusPerNode 0)."""
        return max(1, self.gpus_per_node)


class LocalObjectReference(KubeModel):
    name: str = Field(min_length=1, max_length=DNS_NAME_LENGTH, description="Its name, in the job's namespace.")


class SecretKeySelector(KubeModel):
    name: str = Field(min_length=1, max_length=DNS_NAME_LENGTH, description="Its name, in the job's namespace.")
    key: str = Field(min_length=1, max_length=DNS_NAME_LENGTH, description="The key whose value is taken.")
    optional: bool | None = Field(None, description="Start the pod even when the object or key is missing.")


class EnvVarSource(KubeModel):
    secret_key_ref: SecretKeySelector | None = Field(None, description="A key of a Secret.")
    config_map_key_ref: SecretKeySelector | None = Field(None, description="A key of a ConfigMap.")


class EnvVar(KubeModel):
    name: str = Field(min_length=1, max_length=ENV_NAME_LENGTH, description="The variable's name.")
    value: str | None = Field(None, max_length=ENV_VALUE_LENGTH, description="Its value; a secret goes in valueFrom.")
    value_from: EnvVarSource | None = Field(None, description="Its value from a Secret's or ConfigMap's key.")


class EnvFromSource(KubeModel):
    prefix: str | None = Field(None, max_length=ENV_NAME_LENGTH, description="Put before each variable's name.")
    secret_ref: LocalObjectReference | None = Field(None, description="Every key of a Secret, as a variable.")
    config_map_ref: LocalObjectReference | None = Field(None, description="Every key of a ConfigMap, as a variable.")


# Replicate's webhook events, in the order a training goes through them.
WebhookEvent = Literal["start", "output", "logs", "completed"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("start", "output", "logs", "completed")
WEBHOOK_URL_SCHEMES = ("https", "http")
DEFAULT_SIGNING_KEY = "key"


def _webhook_url(field: str, description: str, **default: Any) -> Any:
    rule: dict[str, JsonValue] = {
        "rule": "self.matches('^https?://[^/].*$')",
        "message": f"{field} must be an http:// or https:// URL",
    }
    return Field(
        max_length=MAX_URI_LENGTH,
        json_schema_extra={"x-kubernetes-validations": [rule]},
        description=description,
        **default,
    )


def _http_url(value: str) -> str:
    # Only the scheme here, as the CEL rule does: which addresses a webhook may reach is the operator's setting.
    parts = urlsplit(value)
    if parts.scheme not in WEBHOOK_URL_SCHEMES or not parts.netloc:
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return value


WebhookURL = Annotated[str, AfterValidator(_http_url)]


class SigningKeyReference(KubeModel):
    """A key of a Secret in the FineTuneJob's namespace that holds a Standard Webhooks key (`whsec_<base64>`)."""

    name: str = Field(min_length=1, max_length=DNS_NAME_LENGTH, description="The Secret's name.")
    key: str = Field(DEFAULT_SIGNING_KEY, min_length=1, max_length=DNS_NAME_LENGTH, description="The key in it.")


class WebhookSpec(KubeModel):
    """Where to POST the training object (Replicate's shape) as the job goes on, signed per Standard Webhooks."""

    url: WebhookURL = _webhook_url("spec.webhook.url", "Receives the events listed in `events`.")
    events: list[WebhookEvent] = Field(
        default=list(WEBHOOK_EVENTS),
        min_length=1,
        max_length=len(WEBHOOK_EVENTS),
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Which events `url` receives: start, output, logs, completed (output and logs at most one "
        "per 500 ms).",
    )
    completed_url: WebhookURL | None = _webhook_url(
        "spec.webhook.completedUrl", "Also receives the completed event (Replicate's webhook_completed).", default=None
    )
    signing_key_secret_ref: SigningKeyReference | None = Field(
        None,
        description="The signing key. Defaults to the operator's signing key Secret name (key `key`) in the "
        "FineTuneJob's namespace; the operator may read only Secrets of that name.",
    )


class FineTuneJobSpec(KubeModel):
    """What to fine-tune (Replicate's inputs, the base model, the destination) and where it runs."""

    # A transition rule on an optional field runs only when both old and new carry it; this one catches adding
    # or removing a destination after create.
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.destination) == has(oldSelf.destination)",
                    "message": f"spec.destination {_IMMUTABLE}",
                    "fieldPath": ".destination",
                }
            ]
        }
    )

    input: TrainingInput = Field(
        json_schema_extra=_immutable("spec.input"), description="Replicate's training inputs, verbatim."
    )
    model: ModelSpec = Field(default_factory=ModelSpec, description="The base model.")
    destination: DestinationURI | None = Field(
        None,
        json_schema_extra=_immutable("spec.destination"),
        description="Where the output weights go (s3://, gs://, pvc://). "
        "Defaults to the operator's destination, under <namespace>/<name>/<uid>/.",
    )
    resources: Resources = Field(default_factory=Resources, description="GPUs, nodes and placement.")
    image: str | None = Field(
        None, max_length=IMAGE_LENGTH, description=f"Trainer image; defaults to the operator's. {_FIXED_ONCE_RUNNING}"
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, max_length=16, description=_FIXED_ONCE_RUNNING
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        description=f"Extra environment; take secrets with valueFrom, never inline. {_FIXED_ONCE_RUNNING}",
    )
    env_from: list[EnvFromSource] = Field(
        default_factory=list,
        max_length=16,
        description=f"Environment from Secrets or ConfigMaps (storage and hub tokens). {_FIXED_ONCE_RUNNING}",
    )
    suspend: bool = Field(False, description="Hold the job (no pods); Kueue sets and clears this too.")
    cancel: bool = Field(
        False,
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "oldSelf == false || self == true",
                    "message": "a canceled FineTuneJob stays canceled",
                }
            ]
        },
        description="Stop for good: the workload is removed and the status kept.",
    )
    backoff_limit: int = Field(
        3, ge=0, le=100, description=f"Retries of failures that are not the user's. {_FIXED_ONCE_RUNNING}"
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description=f"Fail the run after this long. {_FIXED_ONCE_RUNNING}"
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the FineTuneJob this long after it finished."
    )
    webhook: WebhookSpec | None = Field(None, description="Signed webhooks as the job goes on, as Replicate sends.")


# Fields the training Job is built from that may not change once it exists (status.workload says it does): the
# API server refuses such an update, naming the field, rather than the operator ignoring it. (wire name, optional)
FIXED_ONCE_RUNNING: tuple[tuple[str, bool], ...] = (
    ("image", True),
    ("imagePullSecrets", False),
    ("env", False),
    ("envFrom", False),
    ("backoffLimit", False),
    ("activeDeadlineSeconds", True),
)
