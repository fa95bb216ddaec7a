"""Fixtures for tests against the local control plane (tests/cluster/devcluster.py).

- `devcluster` (session): starts the cluster, or reuses a healthy one, once per test session. A cluster that
  this session started is stopped at the end unless DEVCLUSTER_KEEP=1; a cluster that was already up stays up.
- `namespace`: a fresh namespace for each test (its default ServiceAccount exists), deleted afterwards
  (its pods are gone when the next test starts).
- `pod_logs`: `pod_logs(namespace, pod, container=None)` registers a CRI-format log file for a pod and
  returns a `kwokpods.PodLogs` writer; `kubectl logs` (also `-f`) of the pod returns what is written.
- `cluster`: the FineTuneJob CRD installed and every pod of the namespace serving one log file, which the test
  writes as the trainer would (a `finetune_harness.Cluster`);
- `operator`: `finetune-operator run` watching the namespace, as a real process, as `operator_identity`: the
  admin, or (parametrized indirectly) the Helm chart's ServiceAccount with only the chart's RBAC, in which case
  the test fails when the API server refused the operator anything.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from finetune_harness import (
    ADMIN,
    Cluster,
    OperatorIdentity,
    OperatorProcess,
    TokenNotSent,
    chart_service_account,
    install_crd,
    permission_errors,
)
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kwokpods import (
    PodLogs,
    PodLogsFactory,
    register_namespace_logs,
    register_pod_logs,
    unregister_namespace_logs,
    wait_for,
)
from testcluster import DevCluster, DevClusterFailed, running_cluster


@pytest.fixture(scope="session")
def devcluster() -> Iterator[DevCluster]:
    try:
        with running_cluster(stop_if_started=os.environ.get("DEVCLUSTER_KEEP") != "1") as cluster:
            yield cluster
    except DevClusterFailed as error:
        pytest.fail(str(error), pytrace=False)


def _namespace_name(test_name: str) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", test_name.lower().removeprefix("test_")).strip("-")[:40].strip("-")
    return f"t-{stem}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def namespace(devcluster: DevCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace whose default ServiceAccount exists; deleted (and waited for) after the test."""
    core: Any = client.CoreV1Api(devcluster.api)
    name = _namespace_name(request.node.name)
    core.create_namespace({"metadata": {"name": name, "labels": {"devcluster.finetune.dev/test": "true"}}})
    wait_for(
        lambda: core.read_namespaced_service_account("default", name),
        timeout=60,
        description=f"the default ServiceAccount in {name}",
    )
    yield name
    # Pods go first and at once (grace period 0), so that one test's pods never hold simulated GPUs that the
    # next test asks for; the namespace controller then removes the rest in the background.
    core.delete_collection_namespaced_pod(name, grace_period_seconds=0)
    unregister_namespace_logs(devcluster.api, name)
    try:
        core.delete_namespace(name)
    except ApiException as error:
        if error.status != 404:
            raise
    wait_for(
        lambda: not core.list_namespaced_pod(name).items,
        timeout=120,
        interval=0.5,
        description=f"the pods of namespace {name} to be deleted",
    )


@pytest.fixture
def pod_logs(devcluster: DevCluster) -> PodLogsFactory:
    """`pod_logs(namespace, pod, container=None)` registers a log file for the pod and returns its writer."""

    def make(namespace: str, pod: str, container: str | None = None) -> PodLogs:
        return register_pod_logs(
            devcluster.api,
            namespace,
            pod,
            devcluster.pod_log_file(namespace, pod, container),
            containers=() if container is None else (container,),
        )

    return make


@pytest.fixture
def cluster(devcluster: DevCluster, namespace: str) -> Cluster:
    install_crd(devcluster.api)
    # Every pod in the test's namespace serves this file as its log: the test writes the trainer's output there.
    logs = register_namespace_logs(devcluster.api, namespace, devcluster.pod_log_file(namespace, "all-pods"))
    return Cluster(devcluster, namespace, logs)


@pytest.fixture
def operator_identity(
    request: pytest.FixtureRequest, devcluster: DevCluster, namespace: str, tmp_path: Path
) -> Iterator[OperatorIdentity]:
    """Who `operator` runs as: the admin, unless a test asks for the chart's ServiceAccount with
    `@pytest.mark.parametrize("operator_identity", [ADMIN, CHART_SERVICE_ACCOUNT], indirect=True)`."""
    name = getattr(request, "param", ADMIN)
    if name == ADMIN:
        yield OperatorIdentity(ADMIN, devcluster.kubeconfig, devcluster.api)
        return
    try:
        with chart_service_account(devcluster, namespace, tmp_path / "operator.kubeconfig") as identity:
            yield identity
    except TokenNotSent as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture
def operator(operator_identity: OperatorIdentity, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    process = OperatorProcess(namespace, operator_identity.kubeconfig, tmp_path / "operator.log")
    process.start()
    yield process
    process.stop()
    sys.stdout.write(f"\n--- operator log ---\n{process.log_path.read_text()[-6000:]}\n")
    if operator_identity.service_account is not None:
        refused = permission_errors(process.log_path)
        assert refused == [], f"the API server refused the chart's ServiceAccount: {refused[:5]}"
