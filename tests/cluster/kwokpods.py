"""Helpers for pods on the simulated (kwok) nodes of the local test cluster.

kwok plays the kubelet of every simulated node (see kwok-stages.yaml):

- a pod bound to a simulated node becomes Running and stays Running;
- `terminate_pod` annotates a pod so that its containers terminate with a chosen exit code, reason and
  message, and the pod becomes Succeeded (exit code 0) or Failed, as a kubelet would report it;
- `stop_node_heartbeat` takes a node's Lease from kwok: the node stops renewing it, kwok stops playing the node's
  and its pods' stages (as when a kubelet dies), and the node controller marks it NotReady after its grace
  period; `restore_node_heartbeat` gives it back;
- `register_pod_logs` registers a log file with kwok for one pod (a namespaced kwok `Logs` object named like
  the pod), `register_namespace_logs` one file for every pod of a namespace (a `ClusterLogs` object); the
  returned `PodLogs` appends CRI-format lines to it, and `kubectl logs` (also `-f`) of the pod returns them.
  kwok keeps a follow stream open until the client closes it, also after the pod has terminated.

Everything here talks to the API server through a `kubernetes.client.ApiClient`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

EXIT_CODE_ANNOTATION = "devcluster.finetune.dev/exit-code"
REASON_ANNOTATION = "devcluster.finetune.dev/reason"
MESSAGE_ANNOTATION = "devcluster.finetune.dev/termination-message"

GPU_RESOURCE = "nvidia.com/gpu"
A40_NODE_SELECTOR: dict[str, str] = {"nvidia.com/gpu.product": "NVIDIA-A40"}
GPU_TOLERATION: dict[str, str] = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

KWOK_GROUP = "kwok.x-k8s.io"
KWOK_VERSION = "v1alpha1"

NODE_LEASE_NAMESPACE = "kube-node-lease"
# The holder of a node's Lease while its heartbeat is stopped: not kwok, so kwok leaves the node alone.
STOPPED_HEARTBEAT_HOLDER = "devcluster-stopped-heartbeat"
STOPPED_HEARTBEAT_SECONDS = 7 * 24 * 3600

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not come true in time."""


def wait_for(
    probe: Callable[[], T | None],
    *,
    timeout: float = 60.0,
    interval: float = 0.5,
    description: str = "condition",
) -> T:
    """Call `probe` until it returns something truthy and return that; raise WaitTimeout after `timeout` s.

    An ApiException with status 404 inside the probe counts as "not yet".
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = probe()
        except ApiException as error:
            if error.status != 404:
                raise
            result = None
        if result:
            return result
        last = result
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {description} (last: {last!r})")
        time.sleep(interval)


# ----------------------------------------------------------------------------------------------- pods


def gpu_pod_spec(gpus: int = 8, image: str = "registry.example/finetune-trainer:test") -> dict[str, Any]:
    """A pod spec that asks for `gpus` A40s, with the node selector and toleration of the simulated GPU nodes."""
    return {
        "restartPolicy": "Never",
        "nodeSelector": dict(A40_NODE_SELECTOR),
        "tolerations": [dict(GPU_TOLERATION)],
        "containers": [
            {
                "name": "trainer",
                "image": image,
                "resources": {"limits": {GPU_RESOURCE: str(gpus)}, "requests": {GPU_RESOURCE: str(gpus)}},
            }
        ],
    }


def gpu_pod_manifest(
    name: str,
    *,
    gpus: int = 8,
    image: str = "registry.example/finetune-trainer:test",
    annotations: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A pod that asks for `gpus` A40s (see `gpu_pod_spec`)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": dict(annotations or {}), "labels": dict(labels or {})},
        "spec": gpu_pod_spec(gpus, image),
    }


def read_pod(api: client.ApiClient, namespace: str, name: str) -> Any:
    return client.CoreV1Api(api).read_namespaced_pod(name, namespace)


def wait_for_pod_phase(
    api: client.ApiClient, namespace: str, name: str, phases: Iterable[str], *, timeout: float = 60.0
) -> Any:
    """Wait until the pod is in one of `phases`; returns the pod (a V1Pod)."""
    wanted = set(phases)

    def probe() -> Any:
        pod = read_pod(api, namespace, name)
        return pod if pod.status and pod.status.phase in wanted else None

    return wait_for(probe, timeout=timeout, description=f"pod {namespace}/{name} to be {sorted(wanted)}")


def terminate_pod(
    api: client.ApiClient,
    namespace: str,
    name: str,
    exit_code: int,
    *,
    reason: str | None = None,
    message: str | None = None,
) -> None:
    """Make the pod's containers terminate with `exit_code` (and `reason` / termination `message`).

    Annotates the live pod; kwok's pod-terminate stage then reports every container as terminated and the pod
    as Succeeded (0) or Failed. The default reason is Completed (0) or Error, as with a real kubelet.
    """
    client.CoreV1Api(api).patch_namespaced_pod(
        name, namespace, {"metadata": {"annotations": termination_annotations(exit_code, reason, message)}}
    )


def termination_annotations(exit_code: int, reason: str | None = None, message: str | None = None) -> dict[str, str]:
    """The annotations that terminate a pod; put them in a pod template to have its pods exit at once."""
    annotations = {EXIT_CODE_ANNOTATION: str(int(exit_code))}
    if reason is not None:
        annotations[REASON_ANNOTATION] = reason
    if message is not None:
        annotations[MESSAGE_ANNOTATION] = message
    return annotations


# ----------------------------------------------------------------------------------------------- nodes


def stop_node_heartbeat(api: client.ApiClient, node: str) -> None:
    """Stop the node's kubelet, as far as the cluster can tell: no more heartbeats, no more pod updates.

    kwok renews a node's Lease and plays the stages of the node and its pods only while it holds that Lease
    (devcluster runs it with --node-lease-duration-seconds). Taking the Lease for a long time makes kwok let go;
    the node controller then sees no renewal, marks the node NotReady (Unknown) after its grace period and taints
    it node.kubernetes.io/unreachable. Pods on the node keep their last status, as with a dead kubelet.
    """
    renewed = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    client.CoordinationV1Api(api).patch_namespaced_lease(
        node,
        NODE_LEASE_NAMESPACE,
        {
            "spec": {
                "holderIdentity": STOPPED_HEARTBEAT_HOLDER,
                "leaseDurationSeconds": STOPPED_HEARTBEAT_SECONDS,
                "renewTime": renewed,
            }
        },
    )


def restore_node_heartbeat(api: client.ApiClient, node: str) -> None:
    """Give a stopped node back to kwok: it creates the Lease again and makes the node Ready."""
    try:
        client.CoordinationV1Api(api).delete_namespaced_lease(node, NODE_LEASE_NAMESPACE)
    except ApiException as error:
        if error.status != 404:
            raise


# ----------------------------------------------------------------------------------------------- logs


def cri_log_line(line: str, *, stream: str = "stdout", at: datetime | None = None) -> str:
    """One line in the CRI log format that kubelets write and kwok serves:
    `<RFC3339Nano> <stream> F <line>`."""
    if stream not in ("stdout", "stderr"):
        raise ValueError(f"stream must be stdout or stderr, not {stream!r}")
    stamp = (at or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f"{stamp} {stream} F {line.rstrip(chr(10))}\n"


@dataclass
class PodLogs:
    """The log file that kwok serves for one pod (all containers, or the ones named)."""

    path: Path

    def write(self, *lines: str, stream: str = "stdout") -> None:
        """Append `lines` (without newlines) to the pod's log; followers see them at once."""
        with self.path.open("a") as handle:
            for line in lines:
                handle.write(cri_log_line(line, stream=stream))
            handle.flush()


class PodLogsFactory(Protocol):
    """The `pod_logs` fixture: registers a log file for a pod (or one container); returns its writer."""

    def __call__(self, namespace: str, pod: str, container: str | None = None) -> PodLogs: ...


def register_pod_logs(
    api: client.ApiClient,
    namespace: str,
    pod: str,
    log_file: Path,
    *,
    containers: Iterable[str] = (),
    previous_log_file: Path | None = None,
    owner_uid: str | None = None,
) -> PodLogs:
    """Create (or replace) the kwok `Logs` object that serves `log_file` for the pod; returns a writer for it.

    The file is created empty when missing. kwok needs a moment to see a new `Logs` object, so read the logs
    with a retry (see `wait_for`). With the pod's `owner_uid`, the object goes when the pod goes.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.touch()
    entry: dict[str, Any] = {"logsFile": str(log_file), "follow": True}
    if containers:
        entry["containers"] = list(containers)
    if previous_log_file is not None:
        previous_log_file.touch()
        entry["previousLogsFile"] = str(previous_log_file)
    metadata: dict[str, Any] = {"name": pod, "namespace": namespace}
    if owner_uid is not None:
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": owner_uid}]
    body = {
        "apiVersion": f"{KWOK_GROUP}/{KWOK_VERSION}",
        "kind": "Logs",
        "metadata": metadata,
        "spec": {"logs": [entry]},
    }
    custom = client.CustomObjectsApi(api)
    try:
        custom.create_namespaced_custom_object(KWOK_GROUP, KWOK_VERSION, namespace, "logs", body)
    except ApiException as error:
        if error.status != 409:
            raise
        # A pod of the same name that came before owned the old object: the new pod owns it now.
        changes = {"spec": body["spec"], **({"metadata": metadata} if owner_uid is not None else {})}
        custom.patch_namespaced_custom_object(KWOK_GROUP, KWOK_VERSION, namespace, "logs", pod, changes)
    return PodLogs(log_file)


def register_namespace_logs(
    api: client.ApiClient, namespace: str, log_file: Path, *, containers: Iterable[str] = ()
) -> PodLogs:
    """Serve `log_file` as the log of every pod in `namespace` (one that has no `Logs` object of its own).

    Creates a cluster-scoped kwok `ClusterLogs` object named like the namespace; register it before the pods
    exist (e.g. before creating a Job) and remove it with `unregister_namespace_logs` (the `namespace` fixture
    does that).
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.touch()
    entry: dict[str, Any] = {"logsFile": str(log_file), "follow": True}
    if containers:
        entry["containers"] = list(containers)
    spec = {"selector": {"matchNamespaces": [namespace]}, "logs": [entry]}
    body = {
        "apiVersion": f"{KWOK_GROUP}/{KWOK_VERSION}",
        "kind": "ClusterLogs",
        "metadata": {"name": namespace},
        "spec": spec,
    }
    custom = client.CustomObjectsApi(api)
    try:
        custom.create_cluster_custom_object(KWOK_GROUP, KWOK_VERSION, "clusterlogs", body)
    except ApiException as error:
        if error.status != 409:
            raise
        custom.patch_cluster_custom_object(KWOK_GROUP, KWOK_VERSION, "clusterlogs", namespace, {"spec": spec})
    return PodLogs(log_file)


def unregister_namespace_logs(api: client.ApiClient, namespace: str) -> None:
    """Delete the `ClusterLogs` object of `register_namespace_logs`, if there is one."""
    try:
        client.CustomObjectsApi(api).delete_cluster_custom_object(KWOK_GROUP, KWOK_VERSION, "clusterlogs", namespace)
    except ApiException as error:
        if error.status != 404:
            raise


def read_pod_log(api: client.ApiClient, namespace: str, pod: str, container: str | None = None) -> str:
    """The pod's log as text. Reads the raw response: kubernetes 36's client returns `str(bytes)` otherwise."""
    kwargs: dict[str, Any] = {} if container is None else {"container": container}
    core: Any = client.CoreV1Api(api)
    response = core.read_namespaced_pod_log(pod, namespace, _preload_content=False, **kwargs)
    try:
        return str(response.data.decode("utf-8", errors="replace"))
    finally:
        response.release_conn()


def wait_for_pod_log(
    api: client.ApiClient,
    namespace: str,
    pod: str,
    expected: str,
    *,
    container: str | None = None,
    timeout: float = 60.0,
) -> str:
    """Wait until the pod's log contains `expected`; returns the whole log."""

    def probe() -> str | None:
        try:
            text = read_pod_log(api, namespace, pod, container)
        except ApiException as error:
            if error.status in (400, 404, 500, 502, 503):  # kwok has not seen the Logs object yet
                return None
            raise
        return text if expected in text else None

    return wait_for(probe, timeout=timeout, description=f"{expected!r} in the log of {namespace}/{pod}")
