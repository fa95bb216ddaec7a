"""`finetune-operator run` as a process of its own on the local cluster, and an identity of its own to run it under.

- `OperatorProcess` starts the operator (the code of this checkout, `python -m finetune_operator.cli run`) with
  a kubeconfig and FINETUNE_* settings, serves its metrics and liveness on free ports, and reads its memory,
  threads and CPU time from /proc;
- `install_operator_identity` applies the Helm chart's ServiceAccount and RBAC for one watched namespace and writes
  a kubeconfig with a token of that ServiceAccount: the operator's requests are then told apart from the test's
  (the audit log's user) and are allowed exactly what the chart grants.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml
from helmchart import render_chart
from kubernetes import client
from simtrainer import SIMULATED_DESTINATION
from testcluster import DevCluster, free_port

RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
# The operator's settings for hundreds of FineTuneJobs on the simulated nodes: outputs under the simulated
# trainer's bucket, and validation pods small enough that a few CPU nodes hold them all.
MANY_JOBS_SETTINGS = {
    "FINETUNE_DEFAULT_DESTINATION": SIMULATED_DESTINATION,
    "FINETUNE_VALIDATION_CPU": "100m",
    "FINETUNE_VALIDATION_MEMORY": "256Mi",
}
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessUsage:
    """What /proc says about a process now."""

    rss_bytes: int
    # the most resident memory it ever had (VmHWM)
    peak_rss_bytes: int
    threads: int
    cpu_seconds: float


def process_usage(pid: int) -> ProcessUsage:
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    # /proc/<pid>/stat: the fields after the parenthesised command name; utime and stime are the 12th and 13th
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return ProcessUsage(
        rss_bytes=int(fields["VmRSS"].split()[0]) * 1024,
        peak_rss_bytes=int(fields["VmHWM"].split()[0]) * 1024,
        threads=int(fields["Threads"]),
        cpu_seconds=(int(stat[11]) + int(stat[12])) / _CLOCK_TICKS,
    )


@dataclass
class OperatorProcess:
    """`finetune-operator run` watching one namespace, or every one when `namespace` is None, with more `args` and
    environment (`FINETUNE_*`) when given.

    `base_env` (a subclass's defaults) comes first, `env` over it.
    """

    base_env: ClassVar[Mapping[str, str]] = {}

    namespace: str | None
    kubeconfig: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0
    health_port: int = 0
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        self.metrics_port = free_port()
        self.health_port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "FINETUNE_METRICS_PORT": str(self.metrics_port),
            **self.base_env,
            **self.env,
        }
        scope = ["--namespace", self.namespace] if self.namespace is not None else ["--all-namespaces"]
        command = [sys.executable, "-m", "finetune_operator.cli", "run", *scope]
        command += ["--liveness", f"http://127.0.0.1:{self.health_port}/healthz", *self.args]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def probe(self, path: str) -> int:
        """The HTTP status of the operator's /healthz or /readyz (0 while nothing listens)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except (urllib.error.URLError, OSError):
            return 0

    def healthy(self) -> bool:
        return self.probe("/healthz") == 200

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the operator was not started")
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def metrics(self) -> str:
        """The Prometheus exposition the operator serves."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text: str = response.read().decode()
            return text

    def usage(self) -> ProcessUsage:
        return process_usage(self.pid)

    def kill(self) -> None:
        """Kill -9: no clean-up of any kind, as when a node dies under the operator."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        return self.process.returncode


@dataclass(frozen=True)
class OperatorIdentity:
    """The chart's ServiceAccount in a namespace, and a kubeconfig that authenticates as it."""

    namespace: str
    service_account: str
    kubeconfig: Path
    # the RBAC objects applied, as YAML (to delete them again)
    manifests: str

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


def install_operator_identity(
    devcluster: DevCluster,
    namespace: str,
    kubeconfig: Path,
    *,
    values: Mapping[str, Any] | None = None,
    token_seconds: int = 3600,
) -> OperatorIdentity:
    """Apply the chart's ServiceAccount and RBAC for an operator that watches `namespace` (release and watched
    namespace alike, so two namespaces' releases never collide) and write a kubeconfig with its token."""
    rendered = render_chart({"watchNamespaces": [namespace], **(values or {})}, release=namespace, namespace=namespace)
    rbac = [obj for obj in rendered if obj["kind"] in RBAC_KINDS]
    manifests = yaml.safe_dump_all(rbac)
    devcluster.kubectl_run("apply", "--server-side", "-f", "-", stdin=manifests)
    service_account = next(obj for obj in rbac if obj["kind"] == "ServiceAccount")["metadata"]["name"]
    service_account_kubeconfig(devcluster, namespace, service_account, kubeconfig, token_seconds=token_seconds)
    return OperatorIdentity(namespace, service_account, kubeconfig, manifests)


def remove_operator_identity(devcluster: DevCluster, identity: OperatorIdentity) -> None:
    devcluster.kubectl_run("delete", "--ignore-not-found", "--wait=false", "-f", "-", stdin=identity.manifests)


def service_account_kubeconfig(
    devcluster: DevCluster, namespace: str, service_account: str, path: Path, *, token_seconds: int = 3600
) -> Path:
    """A kubeconfig for the admin's server and CA, with a bound token of the ServiceAccount as its only user."""
    token_request = client.CoreV1Api(devcluster.api).create_namespaced_service_account_token(
        service_account, namespace, {"spec": {"expirationSeconds": token_seconds}}
    )
    admin = yaml.safe_load(devcluster.kubeconfig.read_text())
    context = next(c["context"] for c in admin["contexts"] if c["name"] == admin["current-context"])
    cluster = next(c["cluster"] for c in admin["clusters"] if c["name"] == context["cluster"])
    user = f"system:serviceaccount:{namespace}:{service_account}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "devcluster", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token_request.status.token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "devcluster", "user": user, "namespace": namespace}}],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path
