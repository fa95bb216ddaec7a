"""The chart's RBAC is enough for the operator, and no more: the operator runs as the chart's ServiceAccount.

`helm template` renders the chart with the test's namespace as both the release namespace and the one watched;
its ServiceAccount, Roles and bindings are applied; a token for that ServiceAccount (TokenRequest API) goes into
a kubeconfig of its own, and the operator process runs with that kubeconfig. A FineTuneJob driven through
validation, training, progress, success and its TTL, and another through suspend and cancel, then proves that
each API call the operator makes is allowed; access reviews prove what stays forbidden.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_harness import DESTINATION, Cluster, OperatorProcess, install_crd, trainer_log_lines
from helmchart import helm_binary, render_chart, render_chart_text
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kwokpods import register_namespace_logs, terminate_pod, wait_for
from replicate.client import Client
from replicate_harness import (
    LOOPBACK_WEBHOOKS,
    SIGNING_SECRET,
    WebhookReceiver,
    create_signing_secret,
    new_signing_key,
    running_receiver,
    service_account_token,
    wait_until_serving,
)
from testcluster import DevCluster, free_port, new_api_client

from finetune_contract.protocol import (
    OutputEvent,
    OutputFile,
    termination_message,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(helm_binary() is None, reason="no helm binary: run `make cluster-binaries`"),
]

RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
TOTAL_STEPS = 6
OUTPUT = OutputEvent(
    weights=f"{DESTINATION}/chart-rbac/",
    files=[OutputFile(path="adapter_model.safetensors", size=16_801_880, sha256="c" * 64)],
    metrics={"train_loss": 1.1},
)


@dataclass(frozen=True)
class ChartIdentity:
    """The chart's RBAC applied in a test namespace, and a kubeconfig that authenticates as its ServiceAccount."""

    namespace: str
    service_account: str
    kubeconfig: Path
    api: client.ApiClient


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


def _fail_unless_the_token_is_sent(api: client.ApiClient) -> None:
    try:
        client.AuthenticationV1Api(api).create_self_subject_review(
            {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        )
    except ApiException as error:
        if error.status in (401, 403) and "system:anonymous" in str(error.body):
            pytest.fail(
                "the kubernetes client sent no bearer token, so the operator would act as system:anonymous: "
                "kubernetes==36.0.0/36.0.1 drop it (kubernetes-client/python#2582); use kubernetes>=36.0.2",
                pytrace=False,
            )
        raise


@pytest.fixture
def chart_identity(devcluster: DevCluster, namespace: str, tmp_path: Path) -> Iterator[ChartIdentity]:
    install_crd(devcluster.api)
    # The release is named like the namespace, so the cluster-scoped objects of two tests never collide.
    # With the Replicate API on: its rights are the most the chart grants.
    values = {"watchNamespaces": [namespace], "api": {"enabled": True}}
    rendered = render_chart(values, release=namespace, namespace=namespace)
    rbac = [obj for obj in rendered if obj["kind"] in RBAC_KINDS]
    manifests = yaml.safe_dump_all(rbac)
    kubectl(devcluster, "apply", "--server-side", "-f", "-", stdin=manifests)
    service_account = next(obj for obj in rbac if obj["kind"] == "ServiceAccount")["metadata"]["name"]
    kubeconfig = service_account_kubeconfig(devcluster, namespace, service_account, tmp_path / "operator.kubeconfig")
    api = new_api_client(kubeconfig)
    try:
        _fail_unless_the_token_is_sent(api)
        yield ChartIdentity(namespace, service_account, kubeconfig, api)
    finally:
        closing: Any = api
        closing.close()
        kubectl(devcluster, "delete", "--ignore-not-found", "--wait=false", "-f", "-", stdin=manifests)


@pytest.fixture
def cluster(devcluster: DevCluster, namespace: str, chart_identity: ChartIdentity) -> Cluster:
    logs = register_namespace_logs(devcluster.api, namespace, devcluster.pod_log_file(namespace, "all-pods"))
    return Cluster(devcluster, namespace, logs)


@pytest.fixture
def operator(chart_identity: ChartIdentity, tmp_path: Path) -> Iterator[OperatorProcess]:
    process = OperatorProcess(chart_identity.namespace, chart_identity.kubeconfig, tmp_path / "operator.log")
    process.start()
    yield process
    process.stop()
    sys.stdout.write(f"\n--- operator log ---\n{process.log_path.read_text()[-6000:]}\n")


def allowed(api: client.ApiClient, verb: str, resource: str, namespace: str | None = None, **more: str) -> bool:
    """Whether the identity of `api` may do this, as the API server's authorizer says (SelfSubjectAccessReview)."""
    attributes: dict[str, str] = {"verb": verb, "resource": resource, **more}
    if namespace is not None:
        attributes["namespace"] = namespace
    review = client.AuthorizationV1Api(api).create_self_subject_access_review(
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes},
        }
    )
    return bool(review.status.allowed)


def permission_errors(log_path: Path) -> list[str]:
    pattern = re.compile(r"forbidden|\b403\b|not enough permissions|unauthorized|\b401\b", re.IGNORECASE)
    return [line for line in log_path.read_text().splitlines() if pattern.search(line)]


def test_operator_token_is_the_chart_service_account_and_not_an_admin(chart_identity: ChartIdentity) -> None:
    review = client.AuthenticationV1Api(chart_identity.api).create_self_subject_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    )
    expected = f"system:serviceaccount:{chart_identity.namespace}:{chart_identity.service_account}"
    assert review.status.user_info.username == expected
    assert "system:masters" not in (review.status.user_info.groups or [])


def test_chart_service_account_cannot_touch_secrets_or_namespaces_or_other_namespaces(
    chart_identity: ChartIdentity,
) -> None:
    api, namespace = chart_identity.api, chart_identity.namespace
    for verb in ("get", "list", "watch", "create", "update", "patch", "delete"):
        assert not allowed(api, verb, "secrets", namespace), f"{verb} secrets in its namespace"
        assert not allowed(api, verb, "secrets"), f"{verb} secrets cluster-wide"
        assert not allowed(api, verb, "secrets", namespace, name="registry-credentials"), f"{verb} a named Secret"
    assert allowed(api, "get", "secrets", namespace, name=SIGNING_SECRET), "the webhook signing key, by its name"
    for verb in ("list", "watch", "update", "delete"):
        assert not allowed(api, verb, "secrets", namespace, name=SIGNING_SECRET), f"{verb} the signing key"
    for verb in ("create", "delete", "update", "patch"):
        assert not allowed(api, verb, "namespaces"), f"{verb} namespaces"
    assert not allowed(api, "create", "pods", namespace), "the Job controller makes the pods, not the operator"
    assert not allowed(api, "list", "finetunejobs", "default", group="finetune.dev"), "only its watched namespace"
    assert not allowed(api, "create", "rolebindings", namespace, group="rbac.authorization.k8s.io")
    assert not allowed(api, "update", "finetunejobs", namespace, group="finetune.dev"), "users own the spec"
    # What it does need, so that the forbidden answers above are not those of a broken identity:
    assert allowed(api, "patch", "finetunejobs", namespace, group="finetune.dev", subresource="status")
    assert allowed(api, "update", "finetunejobs", namespace, group="finetune.dev", subresource="finalizers")
    assert allowed(api, "get", "pods", namespace, subresource="log")
    assert allowed(api, "create", "tokenreviews", group="authentication.k8s.io")
    assert allowed(api, "create", "subjectaccessreviews", group="authorization.k8s.io")


def test_operator_with_the_chart_rbac_runs_a_job_to_success_and_deletes_it_after_its_ttl(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    name = cluster.apply_example("finetunejob.yaml", name="chart-rbac", ttlSecondsAfterFinished=3)
    cluster.wait_phase(name, "Validating")
    cluster.pass_validation(name)
    running = cluster.wait_phase(name, "Running")
    assert running["resolved"]["trainRows"] == 950
    pod = cluster.wait_pod(name, "training")

    lines = trainer_log_lines(TOTAL_STEPS, sample=("Who am I?", "The chart's ServiceAccount."))
    cluster.logs.write("Loading checkpoint shards: 100%|##########| 2/2", *lines)
    progressed = cluster.wait_status(
        name, lambda s: s.get("progress", {}).get("step") == TOTAL_STEPS, "progress from the followed pod log"
    )
    assert progressed["progress"]["percent"] == 100
    assert progressed["progress"]["evalLoss"] == 1.2
    assert progressed["validationSamples"][0]["completion"] == "The chart's ServiceAccount."
    assert progressed["logs"].endswith(lines[-1])

    terminate_pod(cluster.api, cluster.namespace, pod, 0, message=termination_message(OUTPUT))
    done = cluster.wait_phase(name, "Succeeded")
    assert done["output"]["weights"] == OUTPUT.weights
    assert done["output"]["files"][0]["sha256"] == "c" * 64
    assert {"ValidatingData", "TrainingRunning", "TrainingSucceeded"} <= cluster.event_reasons(name)

    wait_for(
        lambda: cluster.is_gone(name), timeout=60, description="the operator to delete the FineTuneJob after its TTL"
    )
    assert permission_errors(operator.log_path) == []


def test_operator_with_the_chart_rbac_suspends_resumes_and_cancels_a_job(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    name = cluster.apply_example("finetunejob.yaml", name="chart-rbac-cancel")
    cluster.pass_validation(name)
    first = cluster.wait_pod(name, "training")
    cluster.wait_phase(name, "Running")
    cluster.patch_spec(name, suspend=True)
    cluster.wait_phase(name, "Suspended")
    assert cluster.batch.read_namespaced_job(f"{name}-train", cluster.namespace).spec.suspend is True
    cluster.patch_spec(name, suspend=False)
    cluster.wait_pod(name, "training", exclude=frozenset({first}))
    cluster.wait_phase(name, "Running")

    cluster.patch_spec(name, cancel=True)
    cluster.wait_phase(name, "Canceled")
    wait_for(lambda: not cluster.jobs(name), timeout=60, description="the operator to delete the Jobs")
    selector = f"finetune.dev/job-name={name}"
    wait_for(
        lambda: not cluster.core.list_namespaced_config_map(cluster.namespace, label_selector=selector).items,
        timeout=60,
        description="the operator to delete the input ConfigMap",
    )
    assert permission_errors(operator.log_path) == []


def test_every_rendered_manifest_is_accepted_by_the_api_server(devcluster: DevCluster, namespace: str) -> None:
    for values in (
        {},
        {"watchNamespaces": [namespace], "settings": {"defaultDestination": "s3://bucket"}},
        {"api": {"enabled": True}, "settings": {"webhookAllowedNetworks": ["10.20.0.0/16"]}},
    ):
        manifests = render_chart_text(values, release=namespace, namespace=namespace)
        out = kubectl(devcluster, "apply", "--dry-run=server", "-f", "-", stdin=manifests)
        assert "deployment.apps/" in out
        assert "(server dry run)" in out


def test_namespace_editors_manage_finetunejobs_and_viewers_read_them(
    devcluster: DevCluster, namespace: str, chart_identity: ChartIdentity
) -> None:
    rbac = client.RbacAuthorizationV1Api(devcluster.api)
    for user, role in (("alice", "edit"), ("bob", "view")):
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": f"{user}-{role}"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
            },
        )
    authorization = client.AuthorizationV1Api(devcluster.api)

    def may(user: str, verb: str) -> bool:
        review = authorization.create_subject_access_review(
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": user,
                    "resourceAttributes": {
                        "namespace": namespace,
                        "verb": verb,
                        "group": "finetune.dev",
                        "resource": "finetunejobs",
                    },
                },
            }
        )
        return bool(review.status.allowed)

    # The aggregation controller folds the chart's roles into edit/view in a moment.
    def aggregated() -> bool:
        return may("alice", "create") and may("bob", "list")

    wait_for(aggregated, timeout=60, description="the aggregated roles")
    assert may("alice", "delete")
    assert not may("bob", "create")
    assert not may("bob", "delete")


def test_operator_with_the_chart_rbac_serves_the_replicate_api_and_signs_webhooks(
    cluster: Cluster, chart_identity: ChartIdentity, tmp_path: Path
) -> None:
    api_port = free_port()
    process = OperatorProcess(
        chart_identity.namespace,
        chart_identity.kubeconfig,
        tmp_path / "operator.log",
        args=("--api-listen", f"127.0.0.1:{api_port}"),
        env=LOOPBACK_WEBHOOKS,
    )
    key = new_signing_key()
    create_signing_secret(cluster.api, cluster.namespace, key)
    token = service_account_token(cluster.api, cluster.namespace, "ml-engineer", ("create", "get", "list", "patch"))
    with running_receiver(WebhookReceiver(key)) as receiver:
        process.start()
        try:
            wait_until_serving(f"http://127.0.0.1:{api_port}/v1/trainings")
            client = Client(api_token=token, base_url=f"http://127.0.0.1:{api_port}")
            training = client.trainings.create(
                model="meta/llama-2-7b",
                version="v1",
                input={"train_data": "https://datasets.example.com/train.jsonl"},
                destination=f"{cluster.namespace}/chart-bot",
                webhook=receiver.url,
            )
            assert [t.id for t in client.trainings.list()] == [training.id]
            client.trainings.cancel(training.id)
            wait_for(lambda: client.trainings.get(training.id).status == "canceled", timeout=60, description="canceled")
            wait_for(
                lambda: [d for d in receiver.accepted() if d.body["status"] == "canceled"],
                timeout=60,
                description="the signed completed webhook",
            )
        finally:
            process.stop()
            sys.stdout.write(f"\n--- operator log ---\n{process.log_path.read_text()[-6000:]}\n")
    assert receiver.unverified == []
    # The access log shows the 401 of the probe that waited for the server: only the operator's own calls count.
    assert [line for line in permission_errors(process.log_path) if "aiohttp.access" not in line] == []
