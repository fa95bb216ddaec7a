"""The Helm chart (charts/finetune-operator) agrees with the code it deploys, and grants the least it needs.

The values' `settings` and the chart's CRD are checked against their source of truth (the pydantic Settings and
the models); the rendered manifests are checked with the helm binary that devcluster builds (`make unit` builds
it first).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from helmchart import CHART_DIR, lint_chart, render_chart

from finetune_operator.crdgen import CRD_FILE_NAME, custom_resource_definition, render
from finetune_operator.settings import Settings

REPO_ROOT = Path(__file__).parents[2]
VALUES = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
DOCKERFILE = REPO_ROOT / "operator" / "Dockerfile"

# What the operator does with the API (kube.py, handlers.py), as (apiGroup, resource, verb).
OPERATOR_RIGHTS = {
    *(("finetune.dev", "finetunejobs", verb) for verb in ("get", "list", "watch", "delete")),
    ("finetune.dev", "finetunejobs/status", "patch"),
    ("finetune.dev", "finetunejobs/finalizers", "update"),
    *(("batch", "jobs", verb) for verb in ("get", "list", "watch", "create", "patch", "delete")),
    *(("", "pods", verb) for verb in ("get", "list", "watch", "delete")),
    ("", "pods/status", "patch"),
    ("", "pods/log", "get"),
    *(("", resource, verb) for resource in ("configmaps", "services") for verb in ("get", "create", "delete")),
    *(("", "events", verb) for verb in ("create", "list", "watch")),
    ("", "secrets", "get"),  # the webhook signing key's one name only (resourceNames)
}
API_RIGHTS = {("finetune.dev", "finetunejobs", "create"), ("finetune.dev", "finetunejobs", "patch")}
API_AUTH_RIGHTS = {
    ("authentication.k8s.io", "tokenreviews", "create"),
    ("authorization.k8s.io", "subjectaccessreviews", "create"),
}
LEADER_ELECTION_RIGHTS = {("coordination.k8s.io", "leases", verb) for verb in ("get", "create", "patch")}
# Set by the chart from leaderElection.enabled and the release namespace, not from `settings`.
CHART_SET_SETTINGS = {"leader_election", "leader_election_namespace"}
KOPF_CRD_RIGHTS = {("apiextensions.k8s.io", "customresourcedefinitions", verb) for verb in ("list", "watch")}
KOPF_NAMESPACE_RIGHTS = {("", "namespaces", verb) for verb in ("list", "watch")}


def camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(word.capitalize() for word in rest)


def field_default(name: str) -> Any:
    return Settings.model_fields[name].get_default(call_default_factory=True)


def rights(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role.get("rules", [])
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    matches = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == f"finetune-operator{suffix}"]
    assert len(matches) == 1, f"one {kind} finetune-operator{suffix}, found {len(matches)}"
    return matches[0]


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = named(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return container


def rendered_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in operator_container(objects)["env"] if "value" in item}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No FINETUNE_* variables from the test runner's environment."""
    for name in [name for name in os.environ if name.startswith("FINETUNE_")]:
        monkeypatch.delenv(name)
    return monkeypatch


# --------------------------------------------------------------------------------------- one source of truth


def test_chart_crd_is_the_generated_crd() -> None:
    chart_crd = CHART_DIR / "crds" / CRD_FILE_NAME
    assert chart_crd.read_text() == render(custom_resource_definition()), (
        "charts/finetune-operator/crds/ is out of date with finetune_operator.api: run `make crds`"
    )
    assert chart_crd.read_text() == (REPO_ROOT / "crds" / CRD_FILE_NAME).read_text()


def test_values_settings_name_every_operator_setting_and_nothing_else() -> None:
    in_model = {camel(name) for name in Settings.model_fields if name not in CHART_SET_SETTINGS}
    in_values = set(VALUES["settings"])
    assert in_values - in_model == set(), "values.yaml settings the operator does not know"
    assert in_model - in_values == set(), "operator settings missing from values.yaml"


@pytest.mark.parametrize("name", sorted(set(Settings.model_fields) - CHART_SET_SETTINGS))
def test_values_settings_default_to_the_operator_defaults(name: str) -> None:
    assert VALUES["settings"][camel(name)] == field_default(name)


def test_image_runs_as_the_user_the_chart_requires() -> None:
    dockerfile = DOCKERFILE.read_text()
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    assert user is not None, "the Dockerfile sets a numeric USER uid:gid"
    assert int(user[1]) == VALUES["podSecurityContext"]["runAsUser"] != 0
    assert int(user[2]) == VALUES["podSecurityContext"]["runAsGroup"]
    assert 'ENTRYPOINT ["finetune-operator"]' in dockerfile
    assert "trainer" not in re.findall(r"pip install (.*)", dockerfile)[-1], "the operator image has no trainer extra"


# --------------------------------------------------------------------------------------- rendered manifests


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"watchNamespaces": ["team-a", "team-b"], "metrics": {"serviceMonitor": {"enabled": True}}},
        {"api": {"enabled": True}},
    ],
)
def test_chart_passes_helm_lint(values: dict[str, Any]) -> None:
    assert "1 chart(s) linted, 0 chart(s) failed" in lint_chart(values)


def test_default_install_watches_every_namespace_with_cluster_wide_rights() -> None:
    objects = render_chart()
    kinds = [
        "ServiceAccount",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        *["ClusterRole"] * 4,
        *["ClusterRoleBinding"] * 2,
    ]
    assert sorted(obj["kind"] for obj in objects) == sorted(kinds)
    assert [role["metadata"]["name"] for role in of_kind(objects, "Role")] == ["finetune-operator-leader-election"]
    assert rights(named(objects, "Role", "-leader-election")) == LEADER_ELECTION_RIGHTS
    assert named(objects, "Role", "-leader-election")["metadata"]["namespace"] == "finetune-system"
    assert rights(named(objects, "ClusterRole")) == OPERATOR_RIGHTS
    assert rights(named(objects, "ClusterRole", "-discovery")) == KOPF_CRD_RIGHTS
    for suffix in ("", "-discovery"):
        binding = named(objects, "ClusterRoleBinding", suffix)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": f"finetune-operator{suffix}",
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "finetune-operator", "namespace": "finetune-system"}
        ]
    args = operator_container(objects)["args"]
    assert args[0] == "run"
    assert "--all-namespaces" in args
    assert not [arg for arg in args if arg.startswith("--namespace")]


def test_listed_namespaces_get_a_role_each_and_no_cluster_wide_operator_rights() -> None:
    objects = render_chart({"watchNamespaces": ["team-a", "team-b"]})
    roles = [role for role in of_kind(objects, "Role") if role["metadata"]["name"] == "finetune-operator"]
    assert sorted(role["metadata"]["namespace"] for role in roles) == ["team-a", "team-b"]
    assert all(rights(role) == OPERATOR_RIGHTS for role in roles)
    bindings = [b for b in of_kind(objects, "RoleBinding") if b["metadata"]["name"] == "finetune-operator"]
    assert sorted(binding["metadata"]["namespace"] for binding in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["subjects"][0]["namespace"] == "finetune-system"
        assert binding["roleRef"]["kind"] == "Role"
    cluster_roles = {role["metadata"]["name"] for role in of_kind(objects, "ClusterRole")}
    assert cluster_roles == {"finetune-operator-discovery", "finetune-operator-edit", "finetune-operator-view"}
    assert rights(named(objects, "ClusterRole", "-discovery")) == KOPF_CRD_RIGHTS | KOPF_NAMESPACE_RIGHTS
    assert [b["metadata"]["name"] for b in of_kind(objects, "ClusterRoleBinding")] == ["finetune-operator-discovery"]
    args = operator_container(objects)["args"]
    assert "--namespace=team-a" in args
    assert "--namespace=team-b" in args
    assert "--all-namespaces" not in args


@pytest.mark.parametrize("watch", [[], ["team-a"]], ids=["all-namespaces", "one-namespace"])
@pytest.mark.parametrize("api", [False, True], ids=["without-api", "with-api"])
def test_no_role_reads_secrets_but_the_signing_key_or_uses_wildcards_or_escalation_verbs(
    watch: list[str], api: bool
) -> None:
    objects = render_chart({"watchNamespaces": watch, "api": {"enabled": api}})
    roles = of_kind(objects, "ClusterRole") + of_kind(objects, "Role")
    assert roles
    for role in roles:
        for rule in role["rules"]:
            if "secrets" in rule["resources"]:
                assert rule == {
                    "apiGroups": [""],
                    "resources": ["secrets"],
                    "resourceNames": ["finetune-webhook-signing-key"],
                    "verbs": ["get"],
                }, f"{role['metadata']['name']}: Secrets other than the signing key's one name"
        for group, resource, verb in rights(role):
            where = f"{role['kind']} {role['metadata']['name']}: {group}/{resource} {verb}"
            assert "*" not in (group, resource, verb), where
            assert verb not in ("escalate", "bind", "impersonate"), where
            assert not resource.startswith(("roles", "clusterroles", "rolebindings", "clusterrolebindings")), where


def test_the_signing_key_secret_the_operator_may_read_is_the_one_its_setting_names() -> None:
    objects = render_chart({"settings": {"webhookSigningSecret": "team-webhook-key"}})
    rules = [rule for rule in named(objects, "ClusterRole")["rules"] if "secrets" in rule["resources"]]
    assert [rule["resourceNames"] for rule in rules] == [["team-webhook-key"]]
    assert rendered_env(objects)["FINETUNE_WEBHOOK_SIGNING_SECRET"] == "team-webhook-key"


def test_the_replicate_api_is_off_by_default() -> None:
    objects = render_chart()
    assert not [arg for arg in operator_container(objects)["args"] if arg.startswith("--api-listen")]
    assert [service["metadata"]["name"] for service in of_kind(objects, "Service")] == ["finetune-operator-metrics"]
    assert rights(named(objects, "ClusterRole")) == OPERATOR_RIGHTS
    assert not [role for role in of_kind(objects, "ClusterRole") if rights(role) & API_AUTH_RIGHTS]


@pytest.mark.parametrize("watch", [[], ["team-a"]], ids=["all-namespaces", "one-namespace"])
def test_the_replicate_api_gets_a_service_and_the_rights_to_review_callers_and_act_for_them(watch: list[str]) -> None:
    objects = render_chart({"watchNamespaces": watch, "api": {"enabled": True, "port": 9000}})
    container = operator_container(objects)
    assert "--api-listen=0.0.0.0:9000" in container["args"]
    assert {port["name"]: port["containerPort"] for port in container["ports"]}["api"] == 9000
    service = named(objects, "Service", "-api")
    assert service["spec"]["ports"] == [{"name": "api", "port": 80, "targetPort": "api", "protocol": "TCP"}]
    assert service["spec"]["selector"] == named(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert rights(named(objects, "ClusterRole", "-api-auth")) == API_AUTH_RIGHTS
    assert named(objects, "ClusterRoleBinding", "-api-auth")["roleRef"]["name"] == "finetune-operator-api-auth"
    namespaced = [role for role in of_kind(objects, "Role") if role["metadata"]["name"] == "finetune-operator"]
    operator_roles = namespaced if watch else [named(objects, "ClusterRole")]
    assert operator_roles
    assert all(rights(role) == OPERATOR_RIGHTS | API_RIGHTS for role in operator_roles)


def test_namespace_users_may_manage_finetunejobs_through_the_built_in_roles() -> None:
    objects = render_chart()
    edit = named(objects, "ClusterRole", "-edit")
    view = named(objects, "ClusterRole", "-view")
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in edit["metadata"]["labels"]
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert {verb for _, resource, verb in rights(edit) if resource == "finetunejobs"} >= {"create", "patch", "delete"}
    assert {resource for _, resource, _ in rights(edit)} == {"finetunejobs"}, "users never write status"
    assert {verb for _, _, verb in rights(view)} == {"get", "list", "watch"}
    without = render_chart({"rbac": {"aggregateToDefaultRoles": False}})
    assert {role["metadata"]["name"] for role in of_kind(without, "ClusterRole")} == {
        "finetune-operator",
        "finetune-operator-discovery",
    }


def test_two_replicas_elect_a_leader_and_a_drain_keeps_one_running() -> None:
    objects = render_chart()
    deployment = named(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    env = rendered_env(objects)
    assert env["FINETUNE_LEADER_ELECTION"] == "true"
    assert env["FINETUNE_LEADER_ELECTION_NAMESPACE"] == "finetune-system"
    pod_name = next(item for item in operator_container(objects)["env"] if item["name"] == "POD_NAME")
    assert pod_name["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    budget = named(objects, "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    single = render_chart({"replicaCount": 1, "leaderElection": {"enabled": False}})
    assert not of_kind(single, "PodDisruptionBudget")
    assert "FINETUNE_LEADER_ELECTION" not in rendered_env(single)
    assert not of_kind(single, "Role")


def test_operator_runs_as_non_root_with_a_read_only_root_filesystem() -> None:
    objects = render_chart()
    deployment = named(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "finetune-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = operator_container(objects)
    assert container["image"] == "ghcr.io/finetune-operator/operator:0.1.0"
    assert container["command"] == ["finetune-operator"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]


def test_liveness_probe_asks_the_operator_health_endpoint_and_metrics_are_served() -> None:
    objects = render_chart()
    container = operator_container(objects)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    assert "--liveness=http://0.0.0.0:8081/healthz" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    service = named(objects, "Service", "-metrics")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    assert service["spec"]["selector"] == named(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert not of_kind(objects, "ServiceMonitor"), "a ServiceMonitor needs the Prometheus Operator: off by default"
    with_monitor = render_chart({"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    monitor = of_kind(with_monitor, "ServiceMonitor")[0]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "metrics"


def test_rendered_settings_give_the_operator_its_own_defaults(clean_env: pytest.MonkeyPatch) -> None:
    env = rendered_env(render_chart({"leaderElection": {"enabled": False}}))
    assert all(name.startswith("FINETUNE_") for name in env)
    assert "FINETUNE_DEFAULT_DESTINATION" not in env, "a null setting leaves the variable unset"
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert Settings() == Settings.model_validate({name: field_default(name) for name in Settings.model_fields})


def test_settings_set_at_install_reach_the_operator(clean_env: pytest.MonkeyPatch) -> None:
    changed = {
        "trainerImage": "registry.example.com/trainer:1.2.3",
        "modelWeights": {"meta/llama-2-7b": "s3://weights/llama-2-7b/", "meta/llama-2-13b": "s3://weights/13b/"},
        "defaultDestination": "s3://finetune-outputs",
        "trainerServiceAccount": "trainer",
        "validationCpu": "500m",
        "progressIntervalSeconds": 0.5,
        "logTailBytes": 1_000_000 // 20,
        "metricsPort": 9090,
    }
    objects = render_chart({"settings": changed})
    for name, value in rendered_env(objects).items():
        clean_env.setenv(name, value)
    settings = Settings()
    assert settings.trainer_image == changed["trainerImage"]
    assert settings.model_weights == changed["modelWeights"]
    assert settings.default_destination == "s3://finetune-outputs"
    assert settings.trainer_service_account == "trainer"
    assert settings.validation_cpu == "500m"
    assert settings.progress_interval_seconds == 0.5
    assert settings.log_tail_bytes == 50_000
    assert settings.metrics_port == 9090
    assert {port["name"]: port["containerPort"] for port in operator_container(objects)["ports"]}["metrics"] == 9090
    assert json.loads(rendered_env(objects)["FINETUNE_MODEL_WEIGHTS"]) == changed["modelWeights"]


def test_the_data_location_is_published_for_kubectl_ftj_to_every_authenticated_user() -> None:
    assert not [obj for obj in render_chart() if obj["metadata"]["name"] == "kubectl-ftj"], "unset: nothing published"
    objects = render_chart({"client": {"dataLocation": "s3://finetune-data/uploads"}})
    config_map = named_exactly(objects, "ConfigMap", "kubectl-ftj")
    assert config_map["metadata"]["namespace"] == "finetune-system"
    assert config_map["data"] == {"dataLocation": "s3://finetune-data/uploads"}
    role = named_exactly(objects, "Role", "finetune-operator-client-config")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["kubectl-ftj"], "verbs": ["get"]}
    ]
    binding = named_exactly(objects, "RoleBinding", "finetune-operator-client-config")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:authenticated"}
    ]


def named_exactly(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name]
    return found
