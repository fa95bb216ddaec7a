"""The chart's RBAC is enough for the operator, and no more: the operator runs as the chart's ServiceAccount.

`helm template` renders the chart with the test's namespace as both the release namespace and the one watched;
its ServiceAccount, Roles and bindings are applied; a token for that ServiceAccount (TokenRequest API) goes into
a kubeconfig of its own, and the operator process runs with that kubeconfig (the `operator_identity` fixture,
finetune_harness.chart_service_account). The scenarios of test_operator.py that run both as the admin and as this
ServiceAccount (success with progress and its TTL, suspend and resume, cancel) prove that each API call the
operator makes is allowed; here access reviews prove what stays forbidden, and the Replicate API is served.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from finetune_harness import (
    CHART_SERVICE_ACCOUNT,
    Cluster,
    OperatorIdentity,
    OperatorProcess,
    permission_errors,
)
from helmchart import render_chart_text
from kubernetes import client
from kwokpods import wait_for
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
from testcluster import DevCluster, free_port

pytestmark = pytest.mark.integration

# These tests run with the operator's identity set to the chart's ServiceAccount.
AS_CHART_SERVICE_ACCOUNT = pytest.mark.parametrize("operator_identity", [CHART_SERVICE_ACCOUNT], indirect=True)


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


@AS_CHART_SERVICE_ACCOUNT
def test_operator_token_is_the_chart_service_account_and_not_an_admin(
    namespace: str, operator_identity: OperatorIdentity
) -> None:
    review = client.AuthenticationV1Api(operator_identity.api).create_self_subject_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    )
    expected = f"system:serviceaccount:{namespace}:{operator_identity.service_account}"
    assert review.status.user_info.username == expected
    assert "system:masters" not in (review.status.user_info.groups or [])


@AS_CHART_SERVICE_ACCOUNT
def test_chart_service_account_cannot_touch_secrets_or_namespaces_or_other_namespaces(
    namespace: str, operator_identity: OperatorIdentity
) -> None:
    api = operator_identity.api
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


def test_every_rendered_manifest_is_accepted_by_the_api_server(devcluster: DevCluster, namespace: str) -> None:
    for values in (
        {},
        {"watchNamespaces": [namespace], "settings": {"defaultDestination": "s3://bucket"}},
        {"api": {"enabled": True}, "settings": {"webhookAllowedNetworks": ["10.20.0.0/16"]}},
    ):
        manifests = render_chart_text(values, release=namespace, namespace=namespace)
        out = devcluster.kubectl_run("apply", "--dry-run=server", "-f", "-", stdin=manifests).stdout
        assert "deployment.apps/" in out
        assert "(server dry run)" in out


@AS_CHART_SERVICE_ACCOUNT
def test_namespace_editors_manage_finetunejobs_and_viewers_read_them(
    devcluster: DevCluster, namespace: str, operator_identity: OperatorIdentity
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


@AS_CHART_SERVICE_ACCOUNT
def test_operator_with_the_chart_rbac_serves_the_replicate_api_and_signs_webhooks(
    cluster: Cluster, operator_identity: OperatorIdentity, tmp_path: Path
) -> None:
    api_port = free_port()
    process = OperatorProcess(
        cluster.namespace,
        operator_identity.kubeconfig,
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
