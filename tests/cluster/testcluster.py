"""The local cluster as tests see it: start or reuse it, and a handle with its kubeconfig and an ApiClient."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import devcluster as dc
from kubernetes import client, config

DEVCLUSTER_SCRIPT = Path(dc.__file__).resolve()


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

    def kubectl_run(
        self, *args: str, timeout: float = 60, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against the cluster (with `stdin` as its input); raises CalledProcessError on failure."""
        return subprocess.run(
            [str(self.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=True,
            timeout=timeout,
        )

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


def run_devcluster(command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `devcluster.py <command>` (build, up, down, status) in a child process."""
    result = subprocess.run(
        [sys.executable, str(DEVCLUSTER_SCRIPT), command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if command != "status" and result.returncode != 0:
        raise DevClusterFailed(f"devcluster {command} failed:\n{result.stdout}\n{result.stderr}")
    return result


@contextmanager
def running_cluster(*, stop_if_started: bool = True) -> Iterator[DevCluster]:
    """Start the local cluster, or reuse a healthy one. A cluster started here is stopped on exit when
    `stop_if_started`; a cluster that was already up is always left up."""
    was_up = run_devcluster("status", timeout=60).returncode == 0
    if not was_up:
        run_devcluster("build", timeout=3600)  # a no-op when the binaries are cached
        run_devcluster("up", timeout=600)
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
        )
    finally:
        closing: Any = api
        closing.close()
        if not was_up and stop_if_started:
            run_devcluster("down", timeout=120)
