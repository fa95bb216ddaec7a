"""The local cluster as tests see it: start or reuse it, and a handle with its kubeconfig and an ApiClient."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import devcluster as dc
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kwokpods import unregister_namespace_logs, wait_for

DEVCLUSTER_SCRIPT = Path(dc.__file__).resolve()
NODE_POOL_LABEL = "devcluster.finetune.dev/pool"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a server a test starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class DevClusterFailed(RuntimeError):
    """`devcluster.py` failed; the message carries its output."""


@dataclass(frozen=True)
class DevCluster:
    """The running local cluster."""

    kubeconfig: Path
    server: str
    api: client.ApiClient
    # kwok serves pod logs from files; tests write them under here
    pod_log_dir: Path
    kubectl: Path
    # the executor's per-pod directories (executor.pod_process_id finds a pod's process there)
    executor_dir: Path
    # the API server's audit log (`devcluster.py up --audit`); None when it does not write one
    audit_log: Path | None = None

    def kubectl_run(
        self, *args: str, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against the cluster (with `stdin` as its input); raises DevClusterFailed with its message."""
        result = subprocess.run(
            [str(self.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise DevClusterFailed(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result

    def new_api_client(self) -> client.ApiClient:
        """A separate ApiClient (own connection pool) with the admin credentials; close it when done."""
        return new_api_client(self.kubeconfig)

    def pod_log_file(self, namespace: str, pod: str, container: str | None = None) -> Path:
        """A fresh path for a pod's log file (see kwokpods.register_pod_logs)."""
        return self.pod_log_dir / namespace / pod / f"{container or 'all'}-{uuid.uuid4().hex[:6]}.log"


def new_api_client(kubeconfig: Path) -> client.ApiClient:
    """An ApiClient for the kubeconfig (the kubernetes package leaves this function untyped)."""
    factory: Any = config.new_client_from_config
    api: client.ApiClient = factory(config_file=str(kubeconfig))
    return api


def create_namespace(api: client.ApiClient, name: str, labels: dict[str, str] | None = None) -> str:
    """A new namespace, once its default ServiceAccount exists (pods cannot be created before)."""
    core: Any = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
    wait_for(
        lambda: core.read_namespaced_service_account("default", name),
        timeout=60,
        description=f"the default ServiceAccount in {name}",
    )
    return name


def delete_namespace(api: client.ApiClient, name: str, *, timeout: float = 120) -> None:
    """Delete the namespace; returns when its pods are gone (they hold simulated GPUs), the rest goes on after.

    Pods go first and at once (grace period 0); kwok's ClusterLogs object for the namespace goes too.
    """
    core: Any = client.CoreV1Api(api)
    core.delete_collection_namespaced_pod(name, grace_period_seconds=0)
    unregister_namespace_logs(api, name)
    try:
        core.delete_namespace(name)
    except ApiException as error:
        if error.status != 404:
            raise
    wait_for(
        lambda: not core.list_namespaced_pod(name, limit=1).items,
        timeout=timeout,
        interval=0.5,
        description=f"the pods of namespace {name} to be deleted",
    )


def ensure_nodes(api: client.ApiClient, pool: str, gpu_nodes: int, cpu_nodes: int) -> None:
    """At least this many simulated A40 and CPU nodes labelled with `pool` (named <pool>-gpu-node-<i> and
    <pool>-cpu-node-<i>), all Ready: for a run that needs more nodes than the cluster starts with."""
    core: Any = client.CoreV1Api(api)
    wanted = [dc.gpu_node_manifest(f"{pool}-gpu-node-{i}") for i in range(gpu_nodes)]
    wanted += [dc.cpu_node_manifest(f"{pool}-cpu-node-{i}") for i in range(cpu_nodes)]
    existing = {node.metadata.name for node in core.list_node(label_selector=f"{NODE_POOL_LABEL}={pool}").items}
    missing = [node for node in wanted if node["metadata"]["name"] not in existing]
    for node in missing:
        node["metadata"]["labels"][NODE_POOL_LABEL] = pool
    with ThreadPoolExecutor(max_workers=8) as executor:
        list(executor.map(core.create_node, missing))
    names = {node["metadata"]["name"] for node in wanted}

    def all_ready() -> bool:
        ready = {
            node.metadata.name
            for node in core.list_node(label_selector=f"{NODE_POOL_LABEL}={pool}").items
            if any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
        }
        return names <= ready

    wait_for(
        all_ready, timeout=120 + len(wanted) / 5, interval=1, description=f"{len(wanted)} nodes of pool {pool} Ready"
    )


def remove_nodes(api: client.ApiClient, pool: str) -> None:
    """Delete the nodes of `ensure_nodes`; do it once no pod runs on them (kwok's Leases of them go too)."""
    client.CoreV1Api(api).delete_collection_node(label_selector=f"{NODE_POOL_LABEL}={pool}")


def with_audit_log(devcluster: DevCluster) -> DevCluster:
    """The cluster, with its API server writing the audit log (restarted with it, on the same port, if needed)."""
    if devcluster.audit_log is None:
        run_devcluster("up", "--audit", timeout=600)
    return replace(devcluster, audit_log=dc.Layout(dc.state_dir()).audit_log)


def install_crds(devcluster: DevCluster) -> None:
    """The FineTuneJob CRD as generated in crds/, Established."""
    devcluster.kubectl_run("apply", "--server-side", "--force-conflicts", "-f", str(dc.REPO_ROOT / "crds"))
    devcluster.kubectl_run("wait", "--for=condition=Established", "crd/finetunejobs.finetune.dev")


def run_devcluster(command: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `devcluster.py <command> [args]` (build, up, down, status, restart) in a child process."""
    result = subprocess.run(
        [sys.executable, str(DEVCLUSTER_SCRIPT), command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if command != "status" and result.returncode != 0:
        raise DevClusterFailed(f"devcluster {command} failed:\n{result.stdout}\n{result.stderr}")
    return result


@contextmanager
def running_cluster(*, stop_if_started: bool = True, audit: bool = False) -> Iterator[DevCluster]:
    """Start the local cluster, or reuse a healthy one. A cluster started here is stopped on exit when
    `stop_if_started`; a cluster that was already up is always left up. With `audit`, the API server writes its
    audit log (a running one without it is restarted with it, on the same port)."""
    was_up = run_devcluster("status", timeout=60).returncode == 0
    if not was_up:
        run_devcluster("build", timeout=3600)  # a no-op when the binaries are cached
    if not was_up or audit:
        run_devcluster("up", *(["--audit"] if audit else []), timeout=600)
    layout = dc.Layout(dc.state_dir())
    state = dc.State.load(layout.state)
    if state is None:
        raise DevClusterFailed("devcluster up left no state file")
    layout.pod_logs.mkdir(parents=True, exist_ok=True)
    api = new_api_client(layout.kubeconfig)
    try:
        yield DevCluster(
            kubeconfig=layout.kubeconfig,
            server=state.server,
            api=api,
            pod_log_dir=layout.pod_logs,
            kubectl=Path(state.binaries["kubectl"]),
            executor_dir=layout.executor,
            audit_log=layout.audit_log if state.audit else None,
        )
    finally:
        closing: Any = api
        closing.close()
        if not was_up and stop_if_started:
            run_devcluster("down", timeout=120)
