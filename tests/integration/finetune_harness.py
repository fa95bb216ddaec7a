"""Driving the operator and its FineTuneJobs on the local cluster, as a user and as the trainer would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from helmchart import render_chart
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from kwokpods import PodLogs, terminate_pod, wait_for
from testcluster import DevCluster, free_port, new_api_client

from finetune_contract.protocol import (
    EvalEvent,
    ProgressEvent,
    ResolvedRun,
    SampleEvent,
    StartEvent,
    ValidatedEvent,
    encode,
)
from finetune_operator.api import API_VERSION, GROUP, KIND, PLURAL, VERSION
from finetune_operator.crdgen import custom_resource_definition

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DESTINATION = "s3://finetune-outputs"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
# Who the operator process runs as (the `operator_identity` fixture): the local cluster's admin, or the Helm
# chart's ServiceAccount with nothing but the chart's RBAC.
ADMIN, CHART_SERVICE_ACCOUNT = "admin", "chart-service-account"


@dataclass(frozen=True)
class OperatorIdentity:
    """A kubeconfig for the operator, and an API client with the same credentials."""

    name: str
    kubeconfig: Path
    api: client.ApiClient
    service_account: str | None = None


def kubectl(devcluster: DevCluster, *args: str, stdin: str) -> str:
    result = subprocess.run(
        [str(devcluster.kubectl), f"--kubeconfig={devcluster.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
    return result.stdout


def service_account_kubeconfig(devcluster: DevCluster, namespace: str, service_account: str, path: Path) -> Path:
    """A kubeconfig for the admin's server and CA, with a bound token of the ServiceAccount as its only user."""
    token_request = client.CoreV1Api(devcluster.api).create_namespaced_service_account_token(
        service_account, namespace, {"spec": {"expirationSeconds": 3600}}
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


class TokenNotSent(AssertionError):
    """The kubernetes client sent no bearer token: the operator would act as system:anonymous."""


def _check_the_token_is_sent(api: client.ApiClient) -> None:
    try:
        client.AuthenticationV1Api(api).create_self_subject_review(
            {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        )
    except ApiException as error:
        if error.status in (401, 403) and "system:anonymous" in str(error.body):
            raise TokenNotSent(
                "the kubernetes client sent no bearer token, so the operator would act as system:anonymous: "
                "kubernetes==36.0.0/36.0.1 drop it (kubernetes-client/python#2582); use kubernetes>=36.0.2"
            ) from None
        raise


@contextmanager
def chart_service_account(devcluster: DevCluster, namespace: str, kubeconfig: Path) -> Iterator[OperatorIdentity]:
    """The chart's RBAC applied for `namespace` (watched, and the release's namespace), and the identity of its
    ServiceAccount; the RBAC is removed afterwards."""
    install_crd(devcluster.api)
    # The release is named like the namespace, so the cluster-scoped objects of two tests never collide.
    # With the Replicate API on: its rights are the most the chart grants.
    values = {"watchNamespaces": [namespace], "api": {"enabled": True}}
    rendered = render_chart(values, release=namespace, namespace=namespace)
    rbac = [obj for obj in rendered if obj["kind"] in RBAC_KINDS]
    manifests = yaml.safe_dump_all(rbac)
    kubectl(devcluster, "apply", "--server-side", "-f", "-", stdin=manifests)
    service_account = next(obj for obj in rbac if obj["kind"] == "ServiceAccount")["metadata"]["name"]
    service_account_kubeconfig(devcluster, namespace, service_account, kubeconfig)
    api = new_api_client(kubeconfig)
    try:
        _check_the_token_is_sent(api)
        yield OperatorIdentity(CHART_SERVICE_ACCOUNT, kubeconfig, api, service_account)
    finally:
        closing: Any = api
        closing.close()
        kubectl(devcluster, "delete", "--ignore-not-found", "--wait=false", "-f", "-", stdin=manifests)


def permission_errors(log_path: Path) -> list[str]:
    """The lines of an operator log that say the API server refused it something."""
    pattern = re.compile(r"forbidden|\b403\b|not enough permissions|unauthorized|\b401\b", re.IGNORECASE)
    return [line for line in log_path.read_text().splitlines() if pattern.search(line)]


@dataclass
class OperatorProcess:
    """`finetune-operator run` watching one namespace, or every one when `namespace` is None (with more `args` and
    `FINETUNE_*` `env` when given)."""

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
            "FINETUNE_DEFAULT_DESTINATION": DESTINATION,
            "FINETUNE_PROGRESS_INTERVAL_SECONDS": "1",
            "FINETUNE_METRICS_PORT": str(self.metrics_port),
            **self.env,
        }
        scope = ["--namespace", self.namespace] if self.namespace is not None else ["--all-namespaces"]
        command = [sys.executable, "-m", "finetune_operator.cli", "run", *scope]
        command += ["--liveness", f"http://127.0.0.1:{self.health_port}/healthz", *self.args]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def metrics(self) -> str:
        """The Prometheus exposition the operator serves."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text: str = response.read().decode()
            return text

    def probe(self, path: str) -> int:
        """The HTTP status of the operator's /healthz or /readyz."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except urllib.error.URLError:
            return 0  # not listening (yet)

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


class Cluster:
    """What a test does to and reads from the cluster, in the words of a FineTuneJob user."""

    def __init__(self, devcluster: DevCluster, namespace: str, logs: PodLogs | None = None) -> None:
        self.devcluster = devcluster
        self.namespace = namespace
        self._logs = logs
        self.api = devcluster.api
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    @property
    def logs(self) -> PodLogs:
        """The log file of every pod of the namespace, where a test writes what its simulated trainer prints."""
        if self._logs is None:
            raise AssertionError("this namespace's pods write their own logs (executor nodes)")
        return self._logs

    def apply_example(self, file_name: str, name: str | None = None, **spec_changes: Any) -> str:
        manifest = yaml.safe_load((EXAMPLES / file_name).read_text())
        manifest["metadata"]["name"] = name or manifest["metadata"]["name"]
        manifest["metadata"].pop("namespace", None)
        manifest["spec"].update(spec_changes)
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, manifest)
        return str(manifest["metadata"]["name"])

    def create(self, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None) -> str:
        body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "labels": labels or {}}}
        body["spec"] = spec
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
        return name

    def patch_spec(self, name: str, **changes: Any) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, {"spec": changes})

    def get(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        return found

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def wait_status(self, name: str, check: Callable[[dict[str, Any]], bool], what: str, timeout: float = 90) -> Any:
        seen: dict[str, Any] = {}

        def probe() -> dict[str, Any] | None:
            seen["status"] = self.status(name)
            return seen["status"] if check(seen["status"]) else None

        try:
            return wait_for(probe, timeout=timeout, interval=0.5, description=f"{name}: {what}")
        except AssertionError as error:
            raise AssertionError(f"{error}; last status: {json.dumps(seen.get('status'))[:2000]}") from None

    def wait_phase(self, name: str, phase: str, timeout: float = 90) -> dict[str, Any]:
        status: dict[str, Any] = self.wait_status(name, lambda s: s.get("phase") == phase, f"phase {phase}", timeout)
        return status

    def pods(self, name: str, component: str) -> list[Any]:
        selector = f"finetune.dev/job-name={name},app.kubernetes.io/component={component}"
        return list(self.core.list_namespaced_pod(self.namespace, label_selector=selector).items)

    def wait_pod(
        self,
        name: str,
        component: str,
        *,
        index: int | None = 0,
        phase: str = "Running",
        exclude: frozenset[str] = frozenset(),
        timeout: float = 90,
    ) -> str:
        def probe() -> str | None:
            for pod in self.pods(name, component):
                pod_index = (pod.metadata.annotations or {}).get("batch.kubernetes.io/job-completion-index")
                if pod.metadata.name in exclude or pod.status.phase != phase:
                    continue
                if index is not None and pod_index != str(index):
                    continue
                return str(pod.metadata.name)
            return None

        pod: str = wait_for(
            probe, timeout=timeout, interval=0.5, description=f"{component} pod {index} of {name} {phase}"
        )
        return pod

    def pass_validation(self, name: str, train_rows: int = 950) -> None:
        pod = self.wait_pod(name, "validation", index=None)
        summary = ValidatedEvent(
            resolved=ResolvedRun(
                world_size=8,
                per_device_batch_size=1,
                gradient_accumulation_steps=1,
                effective_batch_size=8,
                train_rows=train_rows,
                validation_rows=50,
                train_tokens=200_000,
            )
        )
        terminate_pod(self.api, self.namespace, pod, 0, message=encode(summary))

    def trainer_times(self, pod: str) -> tuple[datetime, datetime | None]:
        """When the pod's trainer container started, and when it ended (None while it runs)."""
        state = self.core.read_namespaced_pod(pod, self.namespace).status.container_statuses[0].state
        if state.terminated is not None:
            return state.terminated.started_at, state.terminated.finished_at
        return state.running.started_at, None

    def gpu_seconds_of(self, pod: str, gpus: int = 8) -> int:
        """The GPU-seconds a finished trainer pod held, from its container's own times."""
        started, finished = self.trainer_times(pod)
        assert finished is not None, f"{pod} still runs"
        return gpus * int((finished - started).total_seconds())

    def wait_trainer_ran(self, pod: str, seconds: float) -> None:
        """Until the pod's trainer has run `seconds` (so that GPU time is counted in whole seconds)."""
        started, _ = self.trainer_times(pod)
        wait_for(
            lambda: datetime.now(UTC) - started >= timedelta(seconds=seconds),
            timeout=seconds + 30,
            interval=0.2,
            description=f"{pod} to run {seconds}s",
        )

    def is_gone(self, name: str) -> bool:
        try:
            self.get(name)
        except ApiException as error:
            return bool(error.status == 404)
        return False

    def events(self, name: str) -> list[Any]:
        selector = f"involvedObject.name={name},involvedObject.kind={KIND}"
        return list(self.core.list_namespaced_event(self.namespace, field_selector=selector).items)

    def event_reasons(self, name: str) -> set[str]:
        return {event.reason for event in self.events(name)}

    def jobs(self, name: str) -> list[Any]:
        return list(
            self.batch.list_namespaced_job(self.namespace, label_selector=f"finetune.dev/job-name={name}").items
        )


class StatusHistory:
    """Every status of one FineTuneJob in the order the API server stored them, from a watch that starts before
    the job exists (use it as a context manager around the job's life)."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str) -> None:
        self._custom: Any = client.CustomObjectsApi(api)
        self._watch = watch.Watch()
        self._statuses: list[dict[str, Any]] = []
        self._stopped = threading.Event()
        listed = self._custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        self._thread = threading.Thread(
            target=self._record,
            args=(namespace, name, listed["metadata"]["resourceVersion"]),
            name=f"status-history-{name}",
            daemon=True,
        )

    def __enter__(self) -> StatusHistory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopped.set()
        self._watch.stop()

    def _record(self, namespace: str, name: str, resource_version: str) -> None:
        events: Iterator[dict[str, Any]] = self._watch.stream(
            self._custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            field_selector=f"metadata.name={name}",
            resource_version=resource_version,
            timeout_seconds=900,
        )
        try:
            for event in events:
                status = event["object"].get("status")
                if status:
                    self._statuses.append(status)
        except Exception:
            if not self._stopped.is_set():  # after the test, a stream cut off with its namespace is expected
                raise

    @property
    def statuses(self) -> list[dict[str, Any]]:
        return list(self._statuses)

    def phases(self) -> list[str]:
        """The phases in the order they came, each once per visit."""
        phases: list[str] = []
        for status in self._statuses:
            if status.get("phase") and (not phases or phases[-1] != status["phase"]):
                phases.append(status["phase"])
        return phases

    def steps(self) -> list[int]:
        """The progress steps in the order they came, each once."""
        steps: list[int] = []
        for status in self._statuses:
            step = (status.get("progress") or {}).get("step")
            if step is not None and (not steps or steps[-1] != step):
                steps.append(step)
        return steps


def install_crd(api: client.ApiClient) -> None:
    """Create or replace the generated CRD and wait until it is Established (idempotent)."""
    extensions = client.ApiextensionsV1Api(api)
    crd = custom_resource_definition()
    name = crd["metadata"]["name"]
    try:
        extensions.create_custom_resource_definition(crd)
    except ApiException as error:
        if error.status != 409:
            raise
        crd["metadata"]["resourceVersion"] = extensions.read_custom_resource_definition(name).metadata.resource_version
        extensions.replace_custom_resource_definition(name, crd)

    def established() -> bool:
        conditions = extensions.read_custom_resource_definition(name).status.conditions or []
        return any(condition.type == "Established" and condition.status == "True" for condition in conditions)

    wait_for(established, timeout=60, description=f"CRD {name} to be Established")


def trainer_log_lines(
    total_steps: int = 30, sample: tuple[str, str] = ("What is LoRA?", "A low-rank adapter.")
) -> list[str]:
    """What a trainer prints over three epochs: a start event, a progress event a step, an eval and a sample."""
    lines = [
        "Loading checkpoint shards: 100%|##########| 2/2",
        encode(StartEvent(world_size=8, total_steps=total_steps, epochs=3)),
    ]
    for step in range(1, total_steps + 1):
        lines.append(f"{{'loss': {2.5 - step * 0.05:.3f}, 'step': {step}}}")
        lines.append(
            encode(
                ProgressEvent(
                    step=step,
                    total_steps=total_steps,
                    epoch=3 * step / total_steps,
                    loss=2.5 - step * 0.05,
                    learning_rate=1e-4,
                    tokens_per_second=15_000,
                    eta_seconds=total_steps - step,
                )
            )
        )
    lines.append(encode(EvalEvent(epoch=3, eval_loss=1.2, perplexity=3.3)))
    lines.append(encode(SampleEvent(epoch=3, prompt=sample[0], completion=sample[1])))
    return lines
