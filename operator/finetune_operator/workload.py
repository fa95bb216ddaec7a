"""A FineTuneJob's workload as manifests: input ConfigMap, validation Job, headless Service, training Job.

Pure functions of one `resolution.RunInfo` (the FineTuneJob resolved once per reconcile); the reconciler
creates what they return. As in Kubeflow Trainer's runtime plugins, each concern (storage, GPU placement, torchrun
wiring, security, Kueue) is one small builder, and the `build_*` functions compose them. Output is
deterministic, so a manifest can be compared exactly with what the API server holds.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_contract.protocol import EXIT_USER_ERROR
from finetune_contract.trainer_config import TRAINER_CONFIG_PATH
from finetune_contract.uris import PVC_MOUNT_ROOT
from finetune_operator.api import API_VERSION, KIND
from finetune_operator.api.spec import Resources
from finetune_operator.conventions import (
    COMPLETION_INDEX_ANNOTATION,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    KUEUE_QUEUE_LABEL,
    TRAINER_CONTAINER,
    Component,
)
from finetune_operator.naming import child_labels, component_selector
from finetune_operator.resolution import Owner, RunInfo

Manifest = dict[str, Any]
# The well-known node label that makes each node its own topology domain.
HOSTNAME_LABEL = "kubernetes.io/hostname"

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


def build_config_map(run: RunInfo) -> Manifest:
    """The trainer's input file, mounted at TRAINER_CONFIG_PATH in every trainer pod. It holds no secrets."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run.owner, run.names.config_map, Component.INPUT),
        "data": {CONFIG_FILE: run.trainer_config.model_dump_json(indent=2)},
    }


def build_validation_job(run: RunInfo) -> Manifest:
    """One CPU pod that fetches and checks the data before any GPU is claimed (`finetune-trainer validate`)."""
    settings = run.settings
    storage = _storage(run)
    container = _trainer_container(
        run,
        VALIDATOR_ARGV,
        resources=_requests_and_limits({"cpu": settings.validation_cpu, "memory": settings.validation_memory}),
        mounts=storage.mounts,
    )
    # A CPU job (gpusPerNode 0) runs all of its pods where the spec places them; a GPU job's validation pod goes
    # to any CPU node.
    placement = _placement(run.spec.resources) if run.spec.resources.gpus_per_node == 0 else {}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(run.owner, run.names.validation_job, Component.VALIDATION),
        "spec": {
            "backoffLimit": VALIDATION_BACKOFF_LIMIT,
            "activeDeadlineSeconds": settings.validation_deadline_seconds,
            "podFailurePolicy": {"rules": [_fail_on_user_error(), _ignore_disruptions()]},
            "template": {
                "metadata": {"labels": child_labels(run.owner.name, Component.VALIDATION)},
                "spec": _pod_spec(run, container, storage.volumes, **placement),
            },
        },
    }


def build_service(run: RunInfo) -> Manifest | None:
    """The headless Service that names each training pod `<job>-<index>.<service>`; only for nodes > 1."""
    if run.spec.resources.nodes == 1:
        return None
    port = run.settings.master_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(run.owner, run.names.service, Component.RENDEZVOUS),
        "spec": {
            "clusterIP": "None",
            # Rank 0 must be resolvable before it is ready: the other ranks connect while it starts.
            "publishNotReadyAddresses": True,
            "selector": component_selector(run.owner.name, Component.TRAINING),
            "ports": [{"name": "rendezvous", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def build_train_job(run: RunInfo) -> Manifest:
    """The Indexed Job of `nodes` pods, each running torchrun over `gpusPerNode` GPUs (or one CPU process).

    It starts suspended when spec.suspend asks for it, or when the FineTuneJob names a Kueue queue: Kueue admits
    it by unsuspending it.
    """
    spec, resources = run.spec, run.spec.resources
    storage = _storage(run, shared_memory=resources.shared_memory)
    container = _trainer_container(
        run,
        TRAINER_ARGV,
        resources=_trainer_resources(resources),
        mounts=storage.mounts,
        extra_env=_torchrun_env(run),
    )
    pod_spec = _pod_spec(
        run,
        container,
        storage.volumes,
        **({"subdomain": run.names.service} if resources.nodes > 1 else {}),
        **_placement(resources, _lost_node_tolerations(run.settings.lost_node_seconds)),
        **_spread_cpu_pods(run.owner, resources),
    )
    kueue_labels = {} if run.kueue_queue is None else {KUEUE_QUEUE_LABEL: run.kueue_queue}
    job_spec: Manifest = {
        "completionMode": "Indexed",
        "completions": resources.nodes,
        "parallelism": resources.nodes,
        "backoffLimit": spec.backoff_limit,
        "suspend": spec.suspend or bool(kueue_labels),
        "podFailurePolicy": {"rules": [_fail_on_user_error(), _ignore_disruptions()]},
        "template": {"metadata": {"labels": child_labels(run.owner.name, Component.TRAINING)}, "spec": pod_spec},
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(run.owner, run.names.train_job, Component.TRAINING, kueue_labels),
        "spec": job_spec,
    }


# --- the trainer container and its pod -----------------------------------------------------------------


def _trainer_container(
    run: RunInfo,
    command: Sequence[str],
    *,
    resources: Manifest,
    mounts: list[Manifest],
    extra_env: Sequence[Manifest] = (),
) -> Manifest:
    """The `trainer` container both Jobs run: the trainer image with the user's environment."""
    user_environment = _user_environment(run)
    env = [*extra_env, *user_environment.get("env", [])]
    return {
        "name": TRAINER_CONTAINER,
        "image": run.image,
        "command": list(command),
        **({"env": env} if env else {}),
        **({"envFrom": user_environment["envFrom"]} if "envFrom" in user_environment else {}),
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": _container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _pod_spec(run: RunInfo, container: Manifest, volumes: list[Manifest], **placement: Any) -> Manifest:
    return {
        "restartPolicy": "Never",
        **placement,
        **_pod_identity(run),
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": volumes,
    }


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


def _lost_node_tolerations(seconds: int) -> list[Manifest]:
    """A pod on a node that stops reporting is evicted after `seconds` (not the default five minutes)."""
    return [
        {"key": taint, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": seconds}
        for taint in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
    ]


def _placement(resources: Resources, extra_tolerations: Sequence[Manifest] = ()) -> Manifest:
    """Nodes of the GPU product asked for, tolerating their GPU taint, plus `extra_tolerations` and the spec's own
    selector and tolerations. The CPU shape (gpusPerNode 0) has no GPU selector or toleration."""
    gpu = resources.gpus_per_node > 0
    node_selector = {
        **({GPU_PRODUCT_LABEL: resources.gpu_product} if gpu else {}),
        **dict(sorted(resources.node_selector.items())),
    }
    tolerations = [
        *([{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}] if gpu else []),
        *extra_tolerations,
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
    preferred = [{"weight": 100, "podAffinityTerm": term}]
    return {"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": preferred}}}


def _trainer_resources(resources: Resources) -> Manifest:
    amounts = {"cpu": resources.cpu, "memory": resources.memory}
    if resources.gpus_per_node > 0:
        amounts[GPU_RESOURCE] = str(resources.gpus_per_node)
    return _requests_and_limits(amounts)


def _requests_and_limits(amounts: Mapping[str, str]) -> Manifest:
    # Requests equal to limits: trainer pods get the Guaranteed QoS class and are the last to be evicted.
    return {"requests": dict(amounts), "limits": dict(amounts)}


# --- torchrun wiring -----------------------------------------------------------------------------------


def _torchrun_env(run: RunInfo) -> list[Manifest]:
    resources, names = run.spec.resources, run.names
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
        {"name": "MASTER_PORT", "value": str(run.settings.master_port)},
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


def _storage(run: RunInfo, shared_memory: str | None = None) -> _Storage:
    """The input file, scratch /tmp and /workspace, /dev/shm for training, and every PVC a URI of the job names."""
    volumes: list[Manifest] = [{"name": "input", "configMap": {"name": run.names.config_map}}]
    mounts: list[Manifest] = [{"name": "input", "mountPath": CONFIG_DIR, "readOnly": True}]
    if shared_memory is not None:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shared_memory}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    volumes.append({"name": "scratch", "emptyDir": {}})
    mounts.append({"name": "scratch", "mountPath": "/tmp"})
    volumes.append({"name": "workspace", "emptyDir": {}})
    mounts.append({"name": "workspace", "mountPath": WORKSPACE_DIR})
    for index, (claim, writable) in enumerate(run.pvc_claims.items()):
        volume = f"pvc-{index}"
        read_only = {} if writable else {"readOnly": True}
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, **read_only}})
        mounts.append({"name": volume, "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", **read_only})
    return _Storage(volumes, mounts)


# --- identity and security -----------------------------------------------------------------------------


def _user_environment(run: RunInfo) -> Manifest:
    """The user's env and envFrom, as given: Secrets stay references, their values never pass through us."""
    spec = run.spec
    environment: Manifest = {}
    if spec.env:
        environment["env"] = [variable.model_dump(exclude_none=True) for variable in spec.env]
    if spec.env_from:
        environment["envFrom"] = [source.model_dump(exclude_none=True) for source in spec.env_from]
    return environment


def _pod_identity(run: RunInfo) -> Manifest:
    identity: Manifest = {}
    service_account = run.settings.trainer_service_account
    if service_account is not None:
        identity["serviceAccountName"] = service_account
    else:
        # The trainer never talks to the API server: no token in the pod.
        identity["automountServiceAccountToken"] = False
    if run.spec.image_pull_secrets:
        identity["imagePullSecrets"] = [secret.model_dump() for secret in run.spec.image_pull_secrets]
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
