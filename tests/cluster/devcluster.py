#!/usr/bin/env python3
"""A local Kubernetes control plane built from source, run as plain processes (no Docker).

    devcluster.py build    build (or reuse) etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
                           kubectl, kwok and helm, cached outside the repository and keyed by version
    devcluster.py up       start the cluster, or reuse a healthy one; leaves .devcluster/kubeconfig
    devcluster.py down     stop every process that `up` started and wait until their ports are free
    devcluster.py status   say whether the cluster is up and healthy (exit status 0 when it is)
    devcluster.py restart COMPONENT
                           stop one component (etcd, kube-apiserver, ...) and start it again with the same command
                           line, ports and data; wait until it is healthy

`up --audit` (or DEVCLUSTER_AUDIT=1) also writes the API server's audit log (.devcluster/logs/audit.log, the policy in
AUDIT_POLICY); a healthy cluster without it gets its API server restarted with it, on the same port.

Simulated nodes and pods come from kwok with the stages in kwok-stages.yaml; the pods of the executor nodes
really run, as host processes, under executor.py. See README.md next to this file.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

K8S_VERSION = "1.36.3"
ETCD_VERSION = "3.6.16"
KWOK_VERSION = "0.8.0"
HELM_VERSION = "3.21.4"

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
GOMOD_DIR = HERE / "gomod"
STAGES_FILE = HERE / "kwok-stages.yaml"
EXECUTOR_SCRIPT = HERE / "executor.py"

SERVICE_CIDR = "10.0.0.0/24"
POD_CIDR = "10.244.0.0/16"
NODE_ANNOTATION_KEY = "kwok.x-k8s.io/node"
NODE_ANNOTATION_VALUE = "fake"
KWOK_CRDS = ("logs", "clusterlogs")
KWOK_CRD_KINDS = ("Logs", "ClusterLogs")
BINARY_COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
# The executor is a Python script (run with the Python that runs `up`), not a built binary.
COMPONENTS_IN_START_ORDER = (*BINARY_COMPONENTS, "executor")
EXECUTOR_LABEL = "devcluster.finetune.dev/executor"
EXECUTOR_READY_FILE = "ready"
# kwok renews each simulated node's Lease in kube-node-lease as a kubelet does (every duration / 4), and plays a
# node's stages, and those of the pods on it, only while it holds that Lease: a Lease taken by another holder is a
# node whose kubelet stopped (kwokpods.stop_node_heartbeat).
NODE_LEASE_SECONDS = 40


def log(message: str) -> None:
    print(f"devcluster: {message}", flush=True)


class DevClusterError(RuntimeError):
    """The cluster could not be built, started or stopped."""


# --------------------------------------------------------------------------------------------- binaries


def cache_dir() -> Path:
    explicit = os.environ.get("FINETUNE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "finetune-operator"


@dataclass(frozen=True)
class Component:
    """A set of binaries built from one wrapper Go module under gomod/."""

    name: str
    version: str
    module: str
    # binary name -> Go package
    packages: dict[str, str]
    ldflags: tuple[str, ...] = ()
    # CRD manifests copied from a Go module into crds/ next to the binaries: (module path, dir inside it)
    crds_from: tuple[str, str] | None = None

    @property
    def directory(self) -> Path:
        return cache_dir() / "bin" / f"{self.name}-v{self.version}"


COMPONENTS = (
    Component(
        name="etcd",
        version=ETCD_VERSION,
        module="etcd",
        packages={"etcd": "go.etcd.io/etcd/server/v3"},
    ),
    Component(
        name="k8s",
        version=K8S_VERSION,
        module="kubernetes",
        packages={
            "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
            "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
            "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
            "kubectl": "k8s.io/kubernetes/cmd/kubectl",
        },
        ldflags=(
            f"-X k8s.io/component-base/version.gitVersion=v{K8S_VERSION}",
            f"-X k8s.io/component-base/version.gitMajor={K8S_VERSION.split('.', maxsplit=1)[0]}",
            f"-X k8s.io/component-base/version.gitMinor={K8S_VERSION.split('.')[1]}",
        ),
    ),
    Component(
        name="kwok",
        version=KWOK_VERSION,
        module="kwok",
        packages={"kwok": "sigs.k8s.io/kwok/cmd/kwok"},
        ldflags=(f"-X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION}",),
        crds_from=("sigs.k8s.io/kwok", "kustomize/crd/bases"),
    ),
    Component(
        name="helm",
        version=HELM_VERSION,
        module="helm",
        packages={"helm": "helm.sh/helm/v3/cmd/helm"},
        ldflags=(f"-X helm.sh/helm/v3/internal/version.version=v{HELM_VERSION}",),
    ),
)

# Binaries that KUBEBUILDER_ASSETS may provide instead of our own build.
ASSET_BINARIES = ("etcd", "kube-apiserver", "kubectl")


def kubebuilder_assets() -> Path | None:
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if not assets:
        return None
    path = Path(assets)
    if all(_is_executable(path / name) for name in ASSET_BINARIES):
        return path
    return None


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def binary(name: str) -> Path:
    """Where the binary `name` is: KUBEBUILDER_ASSETS for etcd/kube-apiserver/kubectl, else our cache."""
    assets = kubebuilder_assets()
    if assets is not None and name in ASSET_BINARIES:
        return assets / name
    for component in COMPONENTS:
        if name in component.packages:
            return component.directory / name
    raise KeyError(name)


def kwok_crd_dir() -> Path:
    kwok = next(c for c in COMPONENTS if c.name == "kwok")
    return kwok.directory / "crds"


def _needed_binaries(component: Component) -> list[str]:
    assets = kubebuilder_assets()
    return [
        name
        for name in component.packages
        if not (assets is not None and name in ASSET_BINARIES) and not _is_executable(component.directory / name)
    ]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"GOTOOLCHAIN": "local", "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly -buildvcs=false"})
    return env


def build_component(component: Component) -> float | None:
    """Build the missing binaries of one component; returns the seconds it took, None when cached."""
    bin_root = cache_dir() / "bin"
    with _file_lock(bin_root / f".{component.name}-v{component.version}.lock"):
        missing = _needed_binaries(component)
        if not missing and (component.crds_from is None or (component.directory / "crds").is_dir()):
            return None
        if shutil.which("go") is None:
            raise DevClusterError("`go` is not on PATH; it is needed to build the cluster binaries once")
        started = time.monotonic()
        log(f"building {component.name} v{component.version}: {', '.join(missing) or 'CRDs'}")
        module_dir = GOMOD_DIR / component.module
        with tempfile.TemporaryDirectory(prefix=f".{component.name}-build-", dir=bin_root) as tmp:
            staging = Path(tmp) / "out"
            if component.directory.is_dir():
                shutil.copytree(component.directory, staging, symlinks=True)
            else:
                staging.mkdir()
            ldflags = " ".join(("-s", "-w", *component.ldflags))
            for name in missing:
                target = staging / name
                subprocess.run(
                    [
                        "go",
                        "build",
                        "-trimpath",
                        "-ldflags",
                        ldflags,
                        "-o",
                        str(target),
                        component.packages[name],
                    ],
                    cwd=module_dir,
                    env=_go_env(),
                    check=True,
                )
            if component.crds_from is not None:
                module, subdir = component.crds_from
                source = _go_module_dir(module_dir, module) / subdir
                crds = staging / "crds"
                if crds.exists():
                    shutil.rmtree(crds)
                shutil.copytree(source, crds)
                for copied in crds.rglob("*"):
                    copied.chmod(0o755 if copied.is_dir() else 0o644)
            # Swap the finished directory into place: an interrupted build never leaves a half binary behind.
            if component.directory.exists():
                old = Path(tmp) / "old"
                component.directory.rename(old)
            staging.rename(component.directory)
        return time.monotonic() - started


def _go_module_dir(module_dir: Path, module: str) -> Path:
    """The source directory of `module` (at the version `module_dir`'s go.mod requires) in the module cache."""
    result = subprocess.run(
        ["go", "mod", "download", "-json", module],
        cwd=module_dir,
        env=_go_env(),
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(json.loads(result.stdout)["Dir"])


def build() -> None:
    total = time.monotonic()
    for component in COMPONENTS:
        seconds = build_component(component)
        if seconds is None:
            log(f"{component.name} v{component.version}: cached in {component.directory}")
        else:
            log(f"{component.name} v{component.version}: built in {seconds:.0f}s -> {component.directory}")
    assets = kubebuilder_assets()
    if assets is not None:
        log(f"using {', '.join(ASSET_BINARIES)} from KUBEBUILDER_ASSETS={assets}")
    log(f"binaries ready in {time.monotonic() - total:.1f}s")


# --------------------------------------------------------------------------------------------- state


def state_dir() -> Path:
    return Path(os.environ.get("DEVCLUSTER_DIR") or REPO_ROOT / ".devcluster")


@dataclass
class State:
    ports: dict[str, int]
    pids: dict[str, int] = field(default_factory=dict)
    binaries: dict[str, str] = field(default_factory=dict)
    # the command line each component was started with, so that `restart` starts it again as it was
    commands: dict[str, list[str]] = field(default_factory=dict)
    audit: bool = False
    started_at: float = 0.0

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2, sort_keys=True))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> State | None:
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None


class Layout:
    """The files of one cluster under .devcluster/."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pki = root / "pki"
        self.logs = root / "logs"
        self.etcd_data = root / "etcd-data"
        self.state = root / "state.json"
        self.lock = root / "lock"
        self.kubeconfig = root / "kubeconfig"
        self.pod_logs = root / "pod-logs"
        self.executor = root / "executor"
        self.audit_policy = root / "audit-policy.yaml"
        self.audit_log = self.logs / "audit.log"

    def component_kubeconfig(self, component: str) -> Path:
        return self.root / f"{component}.kubeconfig"

    def log_file(self, component: str) -> Path:
        return self.logs / f"{component}.log"


# --------------------------------------------------------------------------------------------- pki


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ensure_pki(pki: Path) -> None:
    """A CA, the serving certificate, client certificates and the service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    if (pki / "complete").exists():
        return
    days = "3650"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", days,
        "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"), "-subj", "/CN=devcluster-ca",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    serving_names = (
        "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,"
        "DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.0.0.1"
    )
    certificates = {
        # file stem: (subject, extended key usage, subject alternative names)
        "serving": ("/CN=devcluster-serving", "serverAuth", serving_names),
        "admin": ("/O=system:masters/CN=devcluster-admin", "clientAuth", ""),
        "kube-controller-manager": ("/CN=system:kube-controller-manager", "clientAuth", ""),
        "kube-scheduler": ("/CN=system:kube-scheduler", "clientAuth", ""),
        # kwok plays every kubelet at once (node status, leases, pod status, events): it gets admin rights.
        "kwok": (
            "/O=system:masters/CN=kwok-controller",
            "clientAuth,serverAuth",
            "IP:127.0.0.1,DNS:localhost",
        ),
    }
    for stem, (subject, usage, names) in certificates.items():
        key, csr, crt = (pki / f"{stem}.{ext}" for ext in ("key", "csr", "crt"))
        _openssl(
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", subject,
        )  # fmt: skip
        extensions = pki / f"{stem}.ext"
        lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
        lines.append(f"extendedKeyUsage={usage}")
        if names:
            lines.append(f"subjectAltName={names}")
        extensions.write_text("\n".join(lines) + "\n")
        _openssl(
            "x509", "-req", "-sha256", "-days", days, "-in", str(csr), "-CA", str(pki / "ca.crt"),
            "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-out", str(crt), "-extfile", str(extensions),
        )  # fmt: skip
        csr.unlink()
        extensions.unlink()
    _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
    _openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
    for path in pki.iterdir():
        path.chmod(0o600)
    (pki / "complete").write_text("")


def _write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "devcluster", "cluster": {"server": server, "certificate-authority-data": b64("ca.crt")}}
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(f"{user}.crt"),
                    "client-key-data": b64(f"{user}.key"),
                },
            }
        ],
        "contexts": [{"name": "devcluster", "context": {"cluster": "devcluster", "user": user}}],
        "current-context": "devcluster",
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.chmod(0o600)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------- processes


def _free_ports(names: Sequence[str]) -> dict[str, int]:
    sockets: list[socket.socket] = []
    ports: dict[str, int] = {}
    try:
        for name in names:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
            ports[name] = sock.getsockname()[1]
    finally:
        for sock in sockets:
            sock.close()
    return ports


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pid_alive(pid: int) -> bool:
    """Whether the process runs (a zombie, exited but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # the state letter follows the parenthesised command name; a zombie has exited
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _pid_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _ours(pid: int, root: Path) -> bool:
    """The process was started by `up` for this checkout: its command line names our state directory."""
    return any(str(root) in arg for arg in _pid_cmdline(pid))


def _start(layout: Layout, name: str, argv: list[str]) -> int:
    layout.logs.mkdir(parents=True, exist_ok=True)
    with layout.log_file(name).open("ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=layout.root,
            start_new_session=True,  # its own process group: `down` signals the whole group
        )
    return process.pid


def _launch(layout: Layout, state: State, name: str, argv: list[str]) -> int:
    """Start a component and remember its pid and command line in the state file."""
    state.pids[name] = _start(layout, name, argv)
    state.commands[name] = argv
    state.save(layout.state)
    return state.pids[name]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait(what: str, check: Callable[[], bool], *, timeout: float, log_file: Path, pid: int) -> None:
    """Poll `check` until it is true; fail early when the process behind it (logging to `log_file`) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            raise DevClusterError(f"{log_file.stem} exited; last lines of {log_file}:\n{_tail(log_file)}")
        if check():
            return
        time.sleep(0.25)
    raise DevClusterError(f"{what} not ready after {timeout:.0f}s; last lines of {log_file}:\n{_tail(log_file)}")


def _https_ok(url: str, pki: Path, client: str = "admin") -> bool:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / f"{client}.crt"), str(pki / f"{client}.key"))
    try:
        with urllib.request.urlopen(url, context=context, timeout=3) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def kubectl(layout: Layout, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [str(binary("kubectl")), f"--kubeconfig={layout.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise DevClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


# --------------------------------------------------------------------------------------------- nodes


def gpu_node_count() -> int:
    return int(os.environ.get("DEVCLUSTER_GPU_NODES", "2"))


def executor_node_count() -> int:
    return int(os.environ.get("DEVCLUSTER_EXECUTOR_NODES", "2"))


def executor_node_names() -> list[str]:
    return [f"exec-node-{i}" for i in range(executor_node_count())]


def _host_memory() -> str:
    """This machine's memory as a quantity, from /proc/meminfo."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{line.split()[1]}Ki"
    raise DevClusterError("no MemTotal in /proc/meminfo")


def node_manifest(name: str, cpu: str, memory: str, gpus: int, executor: bool = False) -> dict[str, Any]:
    """A simulated node that kwok manages; with `gpus`, an A40 node (labels, capacity, taint) as on a GPU cluster."""
    resources: dict[str, str] = {"cpu": cpu, "memory": memory, "pods": "110", "ephemeral-storage": "1Ti"}
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
    }
    spec: dict[str, Any] = {}
    if gpus:
        resources["nvidia.com/gpu"] = str(gpus)
        labels["nvidia.com/gpu.product"] = "NVIDIA-A40"
        labels["nvidia.com/gpu.count"] = str(gpus)
        spec["taints"] = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    if executor:
        # Only pods that ask for an executor node run there for real; everything else stays simulated.
        labels[EXECUTOR_LABEL] = "true"
        spec["taints"] = [{"key": EXECUTOR_LABEL, "value": "true", "effect": "NoSchedule"}]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {NODE_ANNOTATION_KEY: NODE_ANNOTATION_VALUE},
        },
        "spec": spec,
        "status": {"capacity": dict(resources), "allocatable": dict(resources)},
    }


def gpu_node_manifest(name: str) -> dict[str, Any]:
    """A node of 8 A40s, 64 CPUs and 512Gi, like gpu-node-0."""
    return node_manifest(name, "64", "512Gi", 8)


def cpu_node_manifest(name: str) -> dict[str, Any]:
    """A CPU node (16 CPUs, 64Gi, no taint), like cpu-node-0."""
    return node_manifest(name, "16", "64Gi", 0)


def node_manifests() -> list[dict[str, Any]]:
    nodes = [gpu_node_manifest(f"gpu-node-{i}") for i in range(gpu_node_count())]
    nodes.append(cpu_node_manifest("cpu-node-0"))
    # Executor nodes offer what this machine has: their pods run on it.
    host_cpus, host_memory = str(os.cpu_count() or 1), _host_memory()
    nodes += [node_manifest(name, host_cpus, host_memory, 0, executor=True) for name in executor_node_names()]
    return nodes


# --------------------------------------------------------------------------------------------- up / down


def _healthy(layout: Layout, state: State) -> bool:
    if any(not pid_alive(state.pids.get(name, -1)) for name in COMPONENTS_IN_START_ORDER):
        return False
    return _https_ok(f"{state.server}/readyz", layout.pki)


def up(audit: bool | None = None) -> State:
    """Start the cluster, or reuse a healthy one. `audit` (default: DEVCLUSTER_AUDIT=1) asks for the audit log."""
    want_audit = os.environ.get("DEVCLUSTER_AUDIT") == "1" if audit is None else audit
    layout = Layout(state_dir())
    layout.root.mkdir(parents=True, exist_ok=True)
    with _file_lock(layout.lock):
        existing = State.load(layout.state)
        if existing is not None and _healthy(layout, existing) and layout.kubeconfig.exists():
            if want_audit and not existing.audit and "kube-apiserver" in existing.commands:
                log("turning the audit log on: restarting kube-apiserver on the same port")
                existing.audit = True
                existing.commands["kube-apiserver"] = [*existing.commands["kube-apiserver"], *_audit_flags(layout)]
                _restart_locked(layout, existing, "kube-apiserver")
            if existing.audit or not want_audit:
                log(f"reusing the healthy cluster at {existing.server} (kubeconfig {layout.kubeconfig})")
                return existing
        if existing is not None or _stray_pids(layout.root):
            log("found a stopped or unhealthy cluster: cleaning it up first")
            _down_locked(layout)
        started = time.monotonic()
        try:
            state = _start_cluster(layout, want_audit)
        except BaseException:
            log(f"start failed; logs are in {layout.logs}; stopping what was started")
            _down_locked(layout)
            raise
        seconds = time.monotonic() - started
        log(f"cluster up in {seconds:.1f}s at {state.server}; KUBECONFIG={layout.kubeconfig}")
        return state


# What the audit log records: who read and wrote FineTuneJobs and the objects around them. Status writes and
# Events are logged with their body (level Request): a status patch's fields tell the state machine's writes from
# the log follower's, and an Event's involvedObject names its FineTuneJob. Node heartbeats and the control plane's
# own leases are left out.
AUDIT_POLICY: dict[str, Any] = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "None", "namespaces": ["kube-node-lease", "kube-system"]},
        {
            "level": "Request",
            "verbs": ["create", "update", "patch"],
            "resources": [
                {"group": "finetune.dev", "resources": ["finetunejobs/status"]},
                {"group": "", "resources": ["events"]},
                {"group": "events.k8s.io", "resources": ["events"]},
            ],
        },
        {
            "level": "Metadata",
            "resources": [
                {"group": "finetune.dev", "resources": ["finetunejobs", "finetunejobs/*"]},
                {"group": "batch", "resources": ["jobs", "jobs/*"]},
                {"group": "", "resources": ["pods", "pods/*", "events", "services", "configmaps"]},
                {"group": "events.k8s.io", "resources": ["events"]},
                {"group": "coordination.k8s.io", "resources": ["leases"]},
            ],
        },
        {"level": "None"},
    ],
}


def _audit_flags(layout: Layout) -> list[str]:
    layout.audit_policy.write_text(yaml.safe_dump(AUDIT_POLICY, sort_keys=False))
    layout.logs.mkdir(parents=True, exist_ok=True)
    # The log backend's default (blocking) mode: an event is in the file when its response has been sent.
    return [
        f"--audit-policy-file={layout.audit_policy}",
        f"--audit-log-path={layout.audit_log}",
        "--audit-log-format=json",
    ]


def _start_cluster(layout: Layout, audit: bool) -> State:
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok"):
        if not _is_executable(binary(name)):
            raise DevClusterError(f"{binary(name)} is missing: run `devcluster.py build` (make cluster-binaries)")
    _ensure_pki(layout.pki)
    pki = layout.pki
    state = State(
        ports=_free_ports(("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")),
        binaries={name: str(binary(name)) for name in (*BINARY_COMPONENTS, "kubectl")},
        audit=audit,
        started_at=time.time(),
    )
    ports = state.ports
    state.save(layout.state)  # written early so that `down` finds the ports and pids of a half-started cluster

    if layout.etcd_data.exists():
        shutil.rmtree(layout.etcd_data)
    layout.audit_log.unlink(missing_ok=True)
    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
    _launch(
        layout,
        state,
        "etcd",
        [
            str(binary("etcd")),
            "--name=devcluster",
            f"--data-dir={layout.etcd_data}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=devcluster={peer_url}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
    )
    _wait(
        "etcd",
        lambda: _component_ready(layout, state, "etcd"),
        timeout=60,
        log_file=layout.log_file("etcd"),
        pid=state.pids["etcd"],
    )

    _launch(
        layout,
        state,
        "kube-apiserver",
        [
            str(binary("kube-apiserver")),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={pki / 'serving.crt'}",
            f"--tls-private-key-file={pki / 'serving.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # As on managed clusters: setting blockOwnerDeletion needs update rights on the owner's finalizers.
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
            "--allow-privileged=true",
            # kwok serves logs for every simulated node on one address; reach it by the InternalIP it reports
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={pki / 'admin.crt'}",
            f"--kubelet-client-key={pki / 'admin.key'}",
            "--profiling=false",
            f"--cert-dir={layout.root / 'apiserver-certs'}",
            *(_audit_flags(layout) if audit else []),
        ],
    )
    _wait(
        "kube-apiserver",
        lambda: _component_ready(layout, state, "kube-apiserver"),
        timeout=120,
        log_file=layout.log_file("kube-apiserver"),
        pid=state.pids["kube-apiserver"],
    )
    _write_kubeconfig(layout.kubeconfig, state.server, pki, "admin")
    for component in ("kube-controller-manager", "kube-scheduler", "kwok"):
        _write_kubeconfig(layout.component_kubeconfig(component), state.server, pki, component)

    kcm_config = str(layout.component_kubeconfig("kube-controller-manager"))
    _launch(
        layout,
        state,
        "kube-controller-manager",
        [
            str(binary("kube-controller-manager")),
            f"--kubeconfig={kcm_config}",
            f"--authentication-kubeconfig={kcm_config}",
            f"--authorization-kubeconfig={kcm_config}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['controller-manager']}",
            f"--cert-dir={layout.root / 'controller-manager-certs'}",
            "--leader-elect=false",
            "--controllers=*",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
        ],
    )

    scheduler_config = str(layout.component_kubeconfig("kube-scheduler"))
    _launch(
        layout,
        state,
        "kube-scheduler",
        [
            str(binary("kube-scheduler")),
            f"--kubeconfig={scheduler_config}",
            f"--authentication-kubeconfig={scheduler_config}",
            f"--authorization-kubeconfig={scheduler_config}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['scheduler']}",
            f"--cert-dir={layout.root / 'scheduler-certs'}",
            "--leader-elect=false",
        ],
    )

    # kwok's Logs/ClusterLogs CRDs, so that tests register a log file for a pod created at runtime
    for crd in KWOK_CRDS:
        kubectl(layout, "apply", "--server-side", "-f", str(kwok_crd_dir() / f"kwok.x-k8s.io_{crd}.yaml"))
    kubectl(
        layout,
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        *(f"crd/{crd}.kwok.x-k8s.io" for crd in KWOK_CRDS),
    )

    layout.pod_logs.mkdir(parents=True, exist_ok=True)
    _launch(
        layout,
        state,
        "kwok",
        [
            str(binary("kwok")),
            f"--kubeconfig={layout.component_kubeconfig('kwok')}",
            f"--config={STAGES_FILE}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={NODE_ANNOTATION_KEY}={NODE_ANNOTATION_VALUE}",
            "--node-ip=127.0.0.1",
            "--node-name=localhost",
            f"--node-port={ports['kwok']}",
            f"--server-address=127.0.0.1:{ports['kwok']}",
            f"--tls-cert-file={pki / 'kwok.crt'}",
            f"--tls-private-key-file={pki / 'kwok.key'}",
            f"--enable-crds={','.join(KWOK_CRD_KINDS)}",
            f"--cidr={POD_CIDR}",
            f"--node-lease-duration-seconds={NODE_LEASE_SECONDS}",
        ],
    )
    _wait(
        "kwok",
        lambda: _component_ready(layout, state, "kwok"),
        timeout=60,
        log_file=layout.log_file("kwok"),
        pid=state.pids["kwok"],
    )

    kubectl(layout, "apply", "--server-side", "-f", "-", stdin=yaml.safe_dump_all(node_manifests()))
    kubectl(layout, "wait", "--for=condition=Ready", "--timeout=90s", "node", "--all")
    _wait(
        "the default ServiceAccount",
        lambda: _default_service_account_exists(layout),
        timeout=90,
        log_file=layout.log_file("kube-controller-manager"),
        pid=state.pids["kube-controller-manager"],
    )

    state.pids["executor"] = _start(
        layout,
        "executor",
        [
            sys.executable,
            str(EXECUTOR_SCRIPT),
            f"--kubeconfig={layout.kubeconfig}",
            f"--state-dir={layout.executor}",
            f"--pod-log-dir={layout.pod_logs}",
            f"--nodes={','.join(executor_node_names())}",
        ],
    )
    state.save(layout.state)
    _wait(
        "executor",
        (layout.executor / EXECUTOR_READY_FILE).exists,
        timeout=60,
        log_file=layout.log_file("executor"),
        pid=state.pids["executor"],
    )
    return state


def _component_ready(layout: Layout, state: State, component: str) -> bool:
    ports = state.ports
    if component == "etcd":
        return _http_ok(f"http://127.0.0.1:{ports['etcd']}/health")
    if component == "kube-apiserver":
        return _https_ok(f"{state.server}/readyz", layout.pki)
    port = {"kube-controller-manager": "controller-manager", "kube-scheduler": "scheduler", "kwok": "kwok"}[component]
    return _port_open(ports[port])


def restart(component: str) -> State:
    """Stop one component and start it again with the command line, ports and data it had; wait until it is ready.

    Clients reconnect by themselves: this is a restart of the process, as after a crash or an upgrade.
    """
    layout = Layout(state_dir())
    with _file_lock(layout.lock):
        state = State.load(layout.state)
        if state is None:
            raise DevClusterError("no cluster here: run `devcluster.py up` first")
        _restart_locked(layout, state, component)
        return state


def _restart_locked(layout: Layout, state: State, component: str) -> None:
    if component not in state.commands:
        known = ", ".join(state.commands) or "none: the cluster was started by an older devcluster.py; run down, up"
        raise DevClusterError(f"cannot restart {component!r}; restartable components: {known}")
    pid = state.pids.get(component, -1)
    if pid_alive(pid) and _ours(pid, layout.root):
        _stop([pid])
    _launch(layout, state, component, state.commands[component])
    _wait(
        component,
        lambda: _component_ready(layout, state, component),
        timeout=120,
        log_file=layout.log_file(component),
        pid=state.pids[component],
    )
    log(f"{component} restarted (pid {state.pids[component]})")


def _default_service_account_exists(layout: Layout) -> bool:
    try:
        kubectl(layout, "get", "serviceaccount", "default", "--namespace=default", "-o", "name")
    except DevClusterError:
        return False
    return True


def _component_name(cmdline: Sequence[str]) -> str | None:
    """Which cluster component a command line runs, if any."""
    if not cmdline:
        return None
    if Path(cmdline[0]).name in BINARY_COMPONENTS:
        return Path(cmdline[0]).name
    if len(cmdline) > 1 and Path(cmdline[1]).name == EXECUTOR_SCRIPT.name:
        return "executor"
    return None


def _stray_pids(root: Path) -> list[int]:
    """Processes of this checkout's cluster that the state file may not know about."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me or not pid_alive(int(entry.name)):
            continue
        if _component_name(_pid_cmdline(int(entry.name))) and _ours(int(entry.name), root):
            found.append(int(entry.name))
    return found


def _executor_pod_pids(executor_dir: Path) -> list[int]:
    """Processes of executor pods, found by their working directory (under the pod's directory): what an
    executor that did not stop cleanly left behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cwd.is_relative_to(executor_dir) and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def down() -> None:
    layout = Layout(state_dir())
    if not layout.root.exists():
        log("no cluster here")
        return
    with _file_lock(layout.lock):
        _down_locked(layout)


# Clients first, then the API server, then its store: each stops cleanly while what it talks to is still up.
STOP_ORDER = (("executor", "kwok", "kube-scheduler", "kube-controller-manager"), ("kube-apiserver",), ("etcd",))


def _stop(pids: Sequence[int], grace: float = 10.0) -> None:
    """SIGTERM the process groups, SIGKILL what is left after `grace` seconds; wait until they are gone."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        alive = [pid for pid in pids if pid_alive(pid)]
        for pid in alive:
            _signal_group(pid, signum)
        deadline = time.monotonic() + wait
        while any(pid_alive(pid) for pid in alive) and time.monotonic() < deadline:
            time.sleep(0.05)


def _down_locked(layout: Layout) -> None:
    state = State.load(layout.state)
    running: dict[int, str] = {}
    if state is not None:
        running = {pid: name for name, pid in state.pids.items() if pid_alive(pid) and _ours(pid, layout.root)}
    for pid in _stray_pids(layout.root):
        running.setdefault(pid, _component_name(_pid_cmdline(pid)) or "")
    for tier in STOP_ORDER:
        _stop([pid for pid, name in running.items() if name in tier])
    _stop(_executor_pod_pids(layout.executor), grace=0)
    # An exited process stays a zombie until init reaps it; give it a moment so that no `pgrep` still sees it.
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in running) and time.monotonic() < deadline:
        time.sleep(0.1)
    if state is not None:
        deadline = time.monotonic() + 30
        while any(_port_open(port) for port in state.ports.values()):
            if time.monotonic() > deadline:
                busy = [name for name, port in state.ports.items() if _port_open(port)]
                raise DevClusterError(f"ports still in use after stopping the cluster: {busy}")
            time.sleep(0.2)
    for path in (layout.etcd_data, layout.pod_logs, layout.executor):
        if path.exists():
            shutil.rmtree(path)
    layout.state.unlink(missing_ok=True)
    log(f"stopped {len(running)} processes" if running else "nothing was running")


def _signal_group(pid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(os.getpgid(pid), signum)
    except ProcessLookupError:
        return
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def status() -> bool:
    layout = Layout(state_dir())
    state = State.load(layout.state)
    if state is None:
        log("down")
        return False
    for name in COMPONENTS_IN_START_ORDER:
        pid = state.pids.get(name, -1)
        log(f"{name:<24} pid {pid:<8} {'running' if pid_alive(pid) else 'NOT RUNNING'}")
    healthy = _healthy(layout, state)
    log(f"{state.server} {'healthy' if healthy else 'UNHEALTHY'}; KUBECONFIG={layout.kubeconfig}")
    return healthy


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("build", "up", "down", "status", "restart"))
    parser.add_argument("component", nargs="?", choices=COMPONENTS_IN_START_ORDER, help="for restart")
    parser.add_argument("--audit", action="store_true", help="up: write the API server's audit log")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            build()
        elif args.command == "up":
            up(audit=True if args.audit else None)
        elif args.command == "restart":
            if args.component is None:
                parser.error(f"restart needs a component: {', '.join(COMPONENTS_IN_START_ORDER)}")
            restart(args.component)
        elif args.command == "down":
            down()
        else:
            return 0 if status() else 1
    except (DevClusterError, subprocess.CalledProcessError) as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
