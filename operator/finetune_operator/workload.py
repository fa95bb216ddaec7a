"""A FineTuneJob's workload as manifests: input ConfigMap, validation Job, headless Service, training Job.

Pure functions of the FineTuneJob's metadata, spec and the operator's settings; the handlers create what
they return. As in Kubeflow Trainer's runtime plugins, each concern (storage, GPU placement, torchrun
wiring, security, Kueue) is one small builder, and the `build_*` functions compose them. Output is
deterministic, so a manifest can be compared exactly with what the API server holds.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from finetune_contract.protocol import EXIT_USER_ERROR
from finetune_contract.trainer_config import TRAINER_CONFIG_PATH, TrainerConfig
from finetune_contract.uris import PVC_MOUNT_ROOT, pvc_claim
from finetune_operator.api import API_VERSION, KIND, FineTuneJobSpec
from finetune_operator.api.spec import Resources
from finetune_operator.resolution import resolve_trainer_config
from finetune_operator.settings import Settings

Manifest = dict[str, Any]

APP_NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
COMPONENT_LABEL = "app.kubernetes.io/component"
JOB_NAME_LABEL = "finetune.dev/job-name"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
APP_NAME = "finetune-trainer"
MANAGER_NAME = "finetune-operator"

TRAINER_CONTAINER = "trainer"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
HOSTNAME_LABEL = "kubernetes.io/hostname"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
TRAINER_USER_ID = 1000
VALIDATION_BACKOFF_LIMIT = 2

CONFIG_DIR, CONFIG_FILE = posixpath.split(TRAINER_CONFIG_PATH)
# What each training pod runs. `finetune-trainer train` is a launcher: it runs torchrun itself from NNODES,
# NPROC_PER_NODE, NODE_RANK, MASTER_ADDR and MASTER_PORT (see _torchrun_env), so that a worker's user-error exit
# code reaches the pod (torchrun alone turns every failure into 1).
TRAINER_ARGV: tuple[str, ...] = ("finetune-trainer", "train", "--input", TRAINER_CONFIG_PATH)
# The trainer image keeps downloaded weights (HF_HOME), checkpoints and the output (FINETUNE_WORKDIR) here.
WORKSPACE_DIR = "/workspace"
VALIDATOR_ARGV: tuple[str, ...] = ("finetune-trainer", "validate", "--input", TRAINER_CONFIG_PATH)


class Component(StrEnum):
    INPUT = "input"
    VALIDATION = "validation"
    TRAINING = "training"
    RENDEZVOUS = "rendezvous"


@dataclass(frozen=True)
class Owner:
    """The FineTuneJob's metadata, as far as its children need it."""

    name: str
    namespace: str
    uid: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class WorkloadNames:
    config_map: str
    validation_job: str
    train_job: str
    service: str


# --- names and labels ----------------------------------------------------------------------------------

_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS_LABEL_LENGTH = 63
# The longest suffix is "-validate"; "-train" plus an Indexed pod's "-<index>" (nodes <= 64) is no longer.
_NAME_BASE_LENGTH = _DNS_LABEL_LENGTH - len("-validate")
_DIGEST_LENGTH = 8


def workload_names(ftj_name: str) -> WorkloadNames:
    """Child names that stay valid DNS labels (Service names, pod hostnames) for any FineTuneJob name.

    A name that is too long, or not a DNS label itself (dots, a leading digit), is shortened and made
    unique again with a hash of the full name.
    """
    base = ftj_name
    if len(ftj_name) > _NAME_BASE_LENGTH or not _DNS_LABEL.fullmatch(ftj_name):
        cleaned = re.sub(r"[^a-z0-9-]+", "-", ftj_name.lower()).strip("-")
        if not cleaned[:1].isalpha():
            cleaned = f"ftj-{cleaned}"
        stem = cleaned[: _NAME_BASE_LENGTH - _DIGEST_LENGTH - 1].rstrip("-")
        base = f"{stem}-{_digest(ftj_name)}"
    return WorkloadNames(
        config_map=f"{base}-input",
        validation_job=f"{base}-validate",
        train_job=f"{base}-train",
        service=f"{base}-workers",
    )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_DIGEST_LENGTH]


def component_selector(ftj_name: str, component: Component) -> dict[str, str]:
    """Labels that select one component's objects (or pods) of one FineTuneJob."""
    return {JOB_NAME_LABEL: ftj_name, COMPONENT_LABEL: component.value}


def child_labels(ftj_name: str, component: Component) -> dict[str, str]:
    """The labels on every child and pod template."""
    return {
        APP_NAME_LABEL: APP_NAME,
        INSTANCE_LABEL: ftj_name,
        MANAGED_BY_LABEL: MANAGER_NAME,
        **component_selector(ftj_name, component),
    }


def owner_reference(owner: Owner) -> Manifest:
    """Makes the FineTuneJob the controller of a child: deleting it deletes the child (garbage collection)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(owner: Owner, name: str, component: Component, extra_labels: Mapping[str, str] | None = None) -> Manifest:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**child_labels(owner.name, component), **(extra_labels or {})},
        "ownerReferences": [owner_reference(owner)],
    }


# --- the children --------------------------------------------------------------------------------------


def build_config_map(owner: Owner, config: TrainerConfig) -> Manifest:
    """The trainer's input file, mounted at TRAINER_CONFIG_PATH in every trainer pod. It holds no secrets."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, workload_names(owner.name).config_map, Component.INPUT),
        "data": {CONFIG_FILE: config.model_dump_json(indent=2)},
    }


def build_validation_job(owner: Owner, spec: FineTuneJobSpec, settings: Settings, names: WorkloadNames) -> Manifest:
    """One CPU pod that fetches and checks the data before any GPU is claimed (`finetune-trainer validate`).

    Raises `resolution.InvalidSpec` for a spec that `resolve_trainer_config` rejects.
    """
    storage = _storage(owner, spec, settings, names)
    container = _trainer_container(
        spec,
        settings,
        VALIDATOR_ARGV,
        resources=_requests_and_limits({"cpu": settings.validation_cpu, "memory": settings.validation_memory}),
        mounts=storage.mounts,
    )
    # A CPU job (gpusPerNode 0) runs all of its pods where the spec places them; a GPU job's validation pod goes
    # to any CPU node.
    placement = _placement(spec.resources) if spec.resources.gpus_per_node == 0 else {}
    pod_spec = _pod_spec(spec, settings, container, storage.volumes, **placement)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(owner, names.validation_job, Component.VALIDATION),
        "spec": {
            "backoffLimit": VALIDATION_BACKOFF_LIMIT,
            "podFailurePolicy": {"rules": [_fail_on_user_error()]},
            "template": {
                "metadata": {"labels": child_labels(owner.name, Component.VALIDATION)},
                "spec": pod_spec,
            },
        },
    }


def build_service(owner: Owner, spec: FineTuneJobSpec, settings: Settings, names: WorkloadNames) -> Manifest | None:
    """The headless Service that names each training pod `<job>-<index>.<service>`; only for nodes > 1."""
    if spec.resources.nodes == 1:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, names.service, Component.RENDEZVOUS),
        "spec": {
            "clusterIP": "None",
            # Rank 0 must be resolvable before it is ready: the other ranks connect while it starts.
            "publishNotReadyAddresses": True,
            "selector": component_selector(owner.name, Component.TRAINING),
            "ports": [
                {
                    "name": "rendezvous",
                    "port": settings.master_port,
                    "targetPort": settings.master_port,
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_train_job(
    owner: Owner, spec: FineTuneJobSpec, settings: Settings, names: WorkloadNames, suspend: bool
) -> Manifest:
    """The Indexed Job of `nodes` pods, each running torchrun over `gpusPerNode` GPUs (or one CPU process).

    It starts suspended when asked to, or when the FineTuneJob names a Kueue queue: Kueue admits it by
    unsuspending it.
    Raises `resolution.InvalidSpec` for a spec that `resolve_trainer_config` rejects.
    """
    resources = spec.resources
    storage = _storage(owner, spec, settings, names, shared_memory=resources.shared_memory)
    container = _trainer_container(
        spec,
        settings,
        TRAINER_ARGV,
        resources=_trainer_resources(resources),
        mounts=storage.mounts,
        extra_env=_torchrun_env(resources, settings, names),
    )
    pod_spec = _pod_spec(
        spec,
        settings,
        container,
        storage.volumes,
        **({"subdomain": names.service} if resources.nodes > 1 else {}),
        **_placement(resources),
        **_spread_cpu_pods(owner, resources),
    )
    kueue_labels = _kueue_labels(owner)
    job_spec: Manifest = {
        "completionMode": "Indexed",
        "completions": resources.nodes,
        "parallelism": resources.nodes,
        "backoffLimit": spec.backoff_limit,
        "suspend": suspend or bool(kueue_labels),
        "podFailurePolicy": {"rules": [_fail_on_user_error(), _ignore_disruptions()]},
        "template": {"metadata": {"labels": child_labels(owner.name, Component.TRAINING)}, "spec": pod_spec},
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(owner, names.train_job, Component.TRAINING, kueue_labels),
        "spec": job_spec,
    }


# --- Kueue ---------------------------------------------------------------------------------------------


def _trainer_container(
    spec: FineTuneJobSpec,
    settings: Settings,
    command: Sequence[str],
    *,
    resources: Manifest,
    mounts: list[Manifest],
    extra_env: Sequence[Manifest] = (),
) -> Manifest:
    """The `trainer` container both Jobs run: the trainer image with the user's environment."""
    user_environment = _user_environment(spec)
    env = [*extra_env, *user_environment.get("env", [])]
    return {
        "name": TRAINER_CONTAINER,
        "image": spec.image or settings.trainer_image,
        "command": list(command),
        **({"env": env} if env else {}),
        **({"envFrom": user_environment["envFrom"]} if "envFrom" in user_environment else {}),
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": _container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _pod_spec(
    spec: FineTuneJobSpec, settings: Settings, container: Manifest, volumes: list[Manifest], **placement: Any
) -> Manifest:
    return {
        "restartPolicy": "Never",
        **placement,
        **_pod_identity(spec, settings),
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": volumes,
    }


def _kueue_labels(owner: Owner) -> dict[str, str]:
    """Kueue manages a batch/v1 Job that carries its queue label, and admits it by unsuspending it."""
    queue = owner.labels.get(KUEUE_QUEUE_LABEL)
    return {} if queue is None else {KUEUE_QUEUE_LABEL: queue}


# --- failure policy ------------------------------------------------------------------------------------


def _fail_on_user_error() -> Manifest:
    """Bad data or inputs fail the Job at once: retrying cannot fix them."""
    return {
        "action": "FailJob",
        "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In", "values": [EXIT_USER_ERROR]},
    }


def _ignore_disruptions() -> Manifest:
    """Preemption, eviction and node drains do not count against backoffLimit."""
    return {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


# --- placement ----------------------------------------------------------------------------------------


def _placement(resources: Resources) -> Manifest:
    """Nodes of the GPU product asked for, tolerating their GPU taint, plus the spec's own selector and
    tolerations. The CPU shape (gpusPerNode 0) has only the spec's."""
    gpu = resources.gpus_per_node > 0
    node_selector = {
        **({GPU_PRODUCT_LABEL: resources.gpu_product} if gpu else {}),
        **dict(sorted(resources.node_selector.items())),
    }
    tolerations = [
        *([{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}] if gpu else []),
        *(toleration.model_dump(exclude_none=True) for toleration in resources.tolerations),
    ]
    placement: Manifest = {}
    if node_selector:
        placement["nodeSelector"] = node_selector
    if tolerations:
        placement["tolerations"] = tolerations
    if resources.priority_class_name is not None:
        placement["priorityClassName"] = resources.priority_class_name
    return placement


def _spread_cpu_pods(owner: Owner, resources: Resources) -> Manifest:
    """CPU trainer pods prefer a node each, as GPU pods that take a node's GPUs get one; on a cluster with fewer
    nodes they still run."""
    if resources.gpus_per_node > 0 or resources.nodes == 1:
        return {}
    term = {
        "labelSelector": {"matchLabels": component_selector(owner.name, Component.TRAINING)},
        "topologyKey": HOSTNAME_LABEL,
    }
    return {
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": term}]
            }
        }
    }


def _trainer_resources(resources: Resources) -> Manifest:
    amounts = {"cpu": resources.cpu, "memory": resources.memory}
    if resources.gpus_per_node > 0:
        amounts[GPU_RESOURCE] = str(resources.gpus_per_node)
    return _requests_and_limits(amounts)


def _requests_and_limits(amounts: Mapping[str, str]) -> Manifest:
    # Requests equal to limits: trainer pods get the Guaranteed QoS class and are the last to be evicted.
    return {"requests": dict(amounts), "limits": dict(amounts)}


# --- torchrun wiring -----------------------------------------------------------------------------------


def _torchrun_env(resources: Resources, settings: Settings, names: WorkloadNames) -> list[Manifest]:
    # Pod 0 of the Indexed Job is rank 0; the headless Service gives it the name <job>-0.<service>.
    master_address = f"{names.train_job}-0.{names.service}" if resources.nodes > 1 else "127.0.0.1"
    return [
        {"name": "NNODES", "value": str(resources.nodes)},
        {"name": "NPROC_PER_NODE", "value": str(resources.processes_per_node)},
        {
            "name": "NODE_RANK",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
        },
        {"name": "MASTER_ADDR", "value": master_address},
        {"name": "MASTER_PORT", "value": str(settings.master_port)},
        {
            "name": "OMP_NUM_THREADS",
            "value": str(_threads_per_process(resources.cpu, resources.processes_per_node)),
        },
    ]


def _threads_per_process(cpu: str, processes: int) -> int:
    """The pod's CPUs shared among its trainer processes (torchrun would otherwise set 1 thread each)."""
    try:
        cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    except ValueError:  # a quantity like "1k" CPUs: no real pod has it; one thread is safe
        return 1
    return max(1, int(cores // processes))


# --- storage -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Storage:
    volumes: list[Manifest]
    mounts: list[Manifest]


def _storage(
    owner: Owner,
    spec: FineTuneJobSpec,
    settings: Settings,
    names: WorkloadNames,
    shared_memory: str | None = None,
) -> _Storage:
    """The input file, scratch /tmp and /workspace, /dev/shm for training, and every PVC a URI of the job names."""
    volumes: list[Manifest] = [{"name": "input", "configMap": {"name": names.config_map}}]
    mounts: list[Manifest] = [{"name": "input", "mountPath": CONFIG_DIR, "readOnly": True}]
    if shared_memory is not None:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shared_memory}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    volumes.append({"name": "scratch", "emptyDir": {}})
    mounts.append({"name": "scratch", "mountPath": "/tmp"})
    volumes.append({"name": "workspace", "emptyDir": {}})
    mounts.append({"name": "workspace", "mountPath": WORKSPACE_DIR})
    config = resolve_trainer_config(owner.name, owner.namespace, spec, settings)
    for index, (claim, writable) in enumerate(_pvc_claims(config).items()):
        volume = f"pvc-{index}"
        read_only = {} if writable else {"readOnly": True}
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, **read_only}})
        mounts.append({"name": volume, "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", **read_only})
    return _Storage(volumes, mounts)


def _pvc_claims(config: TrainerConfig) -> dict[str, bool]:
    """Each claim named by a pvc:// URI, sorted, and whether it is written to (only the destination's is)."""
    claims: dict[str, bool] = {}
    for uri in (config.input.train_data, config.input.validation_data, config.weights):
        claim = None if uri is None else pvc_claim(uri)
        if claim is not None:
            claims[claim] = False
    destination_claim = pvc_claim(config.destination)
    if destination_claim is not None:
        claims[destination_claim] = True
    return dict(sorted(claims.items()))


# --- identity and security -----------------------------------------------------------------------------


def _user_environment(spec: FineTuneJobSpec) -> Manifest:
    """The user's env and envFrom, as given: Secrets stay references, their values never pass through us."""
    environment: Manifest = {}
    if spec.env:
        environment["env"] = [variable.model_dump(exclude_none=True) for variable in spec.env]
    if spec.env_from:
        environment["envFrom"] = [source.model_dump(exclude_none=True) for source in spec.env_from]
    return environment


def _pod_identity(spec: FineTuneJobSpec, settings: Settings) -> Manifest:
    identity: Manifest = {}
    if settings.trainer_service_account is not None:
        identity["serviceAccountName"] = settings.trainer_service_account
    else:
        # The trainer never talks to the API server: no token in the pod.
        identity["automountServiceAccountToken"] = False
    if spec.image_pull_secrets:
        identity["imagePullSecrets"] = [secret.model_dump() for secret in spec.image_pull_secrets]
    return identity


def _pod_security() -> Manifest:
    return {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_USER_ID,
        "runAsGroup": TRAINER_USER_ID,
        "fsGroup": TRAINER_USER_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> Manifest:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
