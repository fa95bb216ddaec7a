"""The workload manifests: what the API server is asked to create for a FineTuneJob."""

from __future__ import annotations

import json
import posixpath
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import make_spec
from finetune_contract.protocol import EXIT_USER_ERROR
from finetune_operator.api import FineTuneJobSpec
from finetune_operator.conventions import (
    COMPONENT_LABEL,
    JOB_NAME_LABEL,
    KUEUE_QUEUE_LABEL,
    MANAGED_BY_LABEL,
    TRAINER_CONTAINER,
    Component,
)
from finetune_operator.naming import component_selector, workload_names
from finetune_operator.resolution import InvalidSpec, Owner, RunInfo, resolve_run, resolve_trainer_config
from finetune_operator.settings import Settings
from finetune_operator.workload import (
    TRAINER_ARGV,
    build_config_map,
    build_service,
    build_train_job,
    build_validation_job,
)

SETTINGS = Settings(
    trainer_image="registry.example/trainer:1.0",
    default_destination="s3://finetunes",
    master_port=29500,
)
OWNER = Owner(name="llama-demo", namespace="research", uid="5f2c9e4e-uid", labels={})
REPO_ROOT = Path(__file__).resolve().parents[2]
# A pod on a node that stops reporting is evicted after settings.lost_node_seconds, not Kubernetes' five minutes.
LOST_NODE_TOLERATIONS = [
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 120},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 120},
]
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def run_of(spec: FineTuneJobSpec, owner: Owner = OWNER, settings: Settings = SETTINGS) -> RunInfo:
    return resolve_run(owner, spec, settings)


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = job["spec"]["template"]["spec"]
    return spec


def trainer(job: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec(job)["containers"]
    assert [container["name"] for container in containers] == [TRAINER_CONTAINER]
    return containers[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {variable["name"]: variable.get("value", variable.get("valueFrom")) for variable in container["env"]}


def test_children_have_deterministic_names() -> None:
    names = workload_names("llama-demo")
    assert (names.config_map, names.validation_job, names.train_job, names.service) == (
        "llama-demo-input",
        "llama-demo-validate",
        "llama-demo-train",
        "llama-demo-workers",
    )


def test_qlora_job_requests_eight_a40s() -> None:
    job = build_train_job(run_of(make_spec(input={"train_data": "s3://b/t.jsonl", "peft_method": "qlora"})))
    amounts = {"cpu": "32", "memory": "192Gi", "nvidia.com/gpu": "8"}
    assert trainer(job)["resources"] == {"requests": amounts, "limits": amounts}
    assert pod_spec(job)["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A40"}
    assert pod_spec(job)["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        *LOST_NODE_TOLERATIONS,
    ]
    assert job["spec"]["completionMode"] == "Indexed"
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (1, 1)


def test_single_node_job_runs_torchrun_locally_without_a_service() -> None:
    spec = make_spec()
    job = build_train_job(run_of(spec))
    assert build_service(run_of(spec)) is None
    assert "subdomain" not in pod_spec(job)
    assert trainer(job)["command"] == list(TRAINER_ARGV)
    assert env_of(trainer(job)) == {
        "NNODES": "1",
        "NPROC_PER_NODE": "8",
        "NODE_RANK": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}},
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "OMP_NUM_THREADS": "4",
    }


@pytest.mark.parametrize(
    ("build", "command"), [(build_train_job, "train"), (build_validation_job, "validate")], ids=["train", "validate"]
)
def test_trainer_pods_run_the_trainer_images_command_on_the_mounted_input(
    build: Callable[[RunInfo], dict[str, Any]], command: str
) -> None:
    from finetune_trainer.cli import parser

    run = run_of(make_spec())
    job = build(run)
    argv = trainer(job)["command"]
    # The program is the trainer distribution's console script, the image's entrypoint.
    scripts = tomllib.loads((REPO_ROOT / "trainer-image" / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[argv[0]] == "finetune_trainer.cli:main"
    dockerfile = (REPO_ROOT / "trainer-image" / "Dockerfile").read_text()
    assert f"ENTRYPOINT {json.dumps([argv[0]])}" in dockerfile
    # The trainer's own parser reads the arguments as the command, with its input where the ConfigMap is mounted.
    parsed = parser().parse_args(argv[1:])
    assert parsed.command == command
    [mount] = [m for m in trainer(job)["volumeMounts"] if m["name"] == "input"]
    [volume] = [v for v in pod_spec(job)["volumes"] if v["name"] == "input"]
    assert volume["configMap"]["name"] == run.names.config_map
    assert parsed.input == posixpath.join(mount["mountPath"], *build_config_map(run)["data"])


def test_two_node_job_wires_torchrun_through_headless_service() -> None:
    spec = make_spec(resources={"nodes": 2})
    job = build_train_job(run_of(spec))
    service = build_service(run_of(spec))

    assert service is not None
    assert service["metadata"]["name"] == "llama-demo-workers"
    assert service["spec"] == {
        "clusterIP": "None",
        "publishNotReadyAddresses": True,
        "selector": {JOB_NAME_LABEL: "llama-demo", COMPONENT_LABEL: "training"},
        "ports": [{"name": "rendezvous", "port": 29500, "targetPort": 29500, "protocol": "TCP"}],
    }
    # The Service selects exactly the training pods.
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert pod_spec(job)["subdomain"] == "llama-demo-workers"
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (2, 2)
    env = env_of(trainer(job))
    assert env["NNODES"] == "2"
    assert env["MASTER_ADDR"] == "llama-demo-train-0.llama-demo-workers"


def test_kueue_label_is_copied_and_job_created_suspended() -> None:
    owner = Owner(
        name="llama-demo", namespace="research", uid="u", labels={KUEUE_QUEUE_LABEL: "a40-queue", "team": "x"}
    )
    job = build_train_job(run_of(make_spec(), owner=owner))
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "a40-queue"
    assert "team" not in job["metadata"]["labels"]
    assert job["spec"]["suspend"] is True


def test_job_without_queue_runs_unless_suspended() -> None:
    assert build_train_job(run_of(make_spec()))["spec"]["suspend"] is False
    assert build_train_job(run_of(make_spec().model_copy(update={"suspend": True})))["spec"]["suspend"] is True
    assert KUEUE_QUEUE_LABEL not in build_train_job(run_of(make_spec()))["metadata"]["labels"]


def test_user_error_exit_code_fails_job_without_retry_and_disruptions_are_not_failures() -> None:
    rules = [
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [EXIT_USER_ERROR]},
        },
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    train = build_train_job(run_of(make_spec(backoffLimit=5)))
    assert train["spec"]["backoffLimit"] == 5
    assert train["spec"]["podFailurePolicy"] == {"rules": rules}
    assert pod_spec(train)["restartPolicy"] == "Never"
    validation = build_validation_job(run_of(make_spec()))
    assert validation["spec"]["podFailurePolicy"] == {"rules": rules}
    assert validation["spec"]["backoffLimit"] == 2
    assert pod_spec(validation)["restartPolicy"] == "Never"


def test_deadline_is_passed_to_the_job_only_when_set() -> None:
    assert "activeDeadlineSeconds" not in build_train_job(run_of(make_spec()))["spec"]
    job = build_train_job(run_of(make_spec(activeDeadlineSeconds=21600)))
    assert job["spec"]["activeDeadlineSeconds"] == 21600


def test_validation_runs_on_cpu_only() -> None:
    job = build_validation_job(run_of(make_spec()))
    container = trainer(job)
    assert container["command"] == ["finetune-trainer", "validate", "--input", "/etc/finetune/input.json"]
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"cpu": "2", "memory": "8Gi"},
    }
    assert "nodeSelector" not in pod_spec(job)
    assert "tolerations" not in pod_spec(job)
    assert job["metadata"]["name"] == "llama-demo-validate"


def test_spec_placement_is_added_to_the_gpu_defaults() -> None:
    spec = make_spec(
        resources={
            "gpuProduct": "NVIDIA-A100-SXM4-80GB",
            "gpusPerNode": 4,
            "nodeSelector": {"zone": "b", "pool": "train"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}],
            "priorityClassName": "training-low",
        }
    )
    job = build_train_job(run_of(spec))
    assert pod_spec(job)["nodeSelector"] == {
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
        "pool": "train",
        "zone": "b",
    }
    assert pod_spec(job)["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        *LOST_NODE_TOLERATIONS,
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"},
    ]
    assert pod_spec(job)["priorityClassName"] == "training-low"
    assert trainer(job)["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert env_of(trainer(job))["NPROC_PER_NODE"] == "4"
    assert env_of(trainer(job))["OMP_NUM_THREADS"] == "8"


def test_cpu_shape_requests_no_gpu_and_runs_one_process_per_pod() -> None:
    spec = make_spec(resources={"gpusPerNode": 0, "cpu": "4", "memory": "16Gi"})
    job = build_train_job(run_of(spec))
    amounts = {"cpu": "4", "memory": "16Gi"}
    assert trainer(job)["resources"] == {"requests": amounts, "limits": amounts}
    assert not {"nodeSelector", "affinity"} & set(pod_spec(job))
    assert pod_spec(job)["tolerations"] == LOST_NODE_TOLERATIONS  # and no GPU toleration
    env = env_of(trainer(job))
    assert (env["NNODES"], env["NPROC_PER_NODE"], env["OMP_NUM_THREADS"]) == ("1", "1", "4")
    config = run_of(spec).trainer_config
    assert (config.gpus_per_node, config.world_size) == (0, 1)


def test_cpu_shape_runs_validation_and_training_where_the_spec_places_them() -> None:
    node_selector = {"pool": "cpu"}
    tolerations = [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]
    spec = make_spec(resources={"gpusPerNode": 0, "nodeSelector": node_selector, "tolerations": tolerations})
    validation, training = build_validation_job(run_of(spec)), build_train_job(run_of(spec))
    assert (pod_spec(validation)["nodeSelector"], pod_spec(validation)["tolerations"]) == (node_selector, tolerations)
    assert pod_spec(training)["nodeSelector"] == node_selector
    assert pod_spec(training)["tolerations"] == LOST_NODE_TOLERATIONS + tolerations
    for job in (validation, training):
        assert "nvidia.com/gpu" not in trainer(job)["resources"]["limits"]


def test_cpu_pods_of_a_multi_node_job_prefer_a_node_each() -> None:
    job = build_train_job(run_of(make_spec(resources={"gpusPerNode": 0, "nodes": 2})))
    assert pod_spec(job)["affinity"] == {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "labelSelector": {"matchLabels": component_selector(OWNER.name, Component.TRAINING)},
                        "topologyKey": "kubernetes.io/hostname",
                    },
                }
            ]
        }
    }
    assert env_of(trainer(job))["NPROC_PER_NODE"] == "1"
    assert "affinity" not in pod_spec(build_train_job(run_of(make_spec(resources={"nodes": 2}))))


@pytest.mark.parametrize("build", ["validation", "training"])
def test_trainer_pods_run_restricted(build: str) -> None:
    job = build_validation_job(run_of(make_spec())) if build == "validation" else build_train_job(run_of(make_spec()))
    assert pod_spec(job)["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert trainer(job)["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert trainer(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert pod_spec(job)["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod_spec(job)


def test_trainer_service_account_comes_from_settings() -> None:
    settings = SETTINGS.model_copy(update={"trainer_service_account": "trainer-storage"})
    job = build_train_job(run_of(make_spec(), settings=settings))
    assert pod_spec(job)["serviceAccountName"] == "trainer-storage"
    assert "automountServiceAccountToken" not in pod_spec(job)


def test_training_pods_mount_input_shared_memory_scratch_and_workspace() -> None:
    job = build_train_job(run_of(make_spec(resources={"sharedMemory": "64Gi"})))
    assert pod_spec(job)["volumes"] == [
        {"name": "input", "configMap": {"name": "llama-demo-input"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}},
        {"name": "scratch", "emptyDir": {}},
        {"name": "workspace", "emptyDir": {}},
    ]
    assert trainer(job)["volumeMounts"] == [
        {"name": "input", "mountPath": "/etc/finetune", "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": "/tmp"},
        {"name": "workspace", "mountPath": "/workspace"},
    ]


def test_pvc_claims_are_mounted_read_only_except_the_destination() -> None:
    spec = make_spec(
        input={
            "train_data": "pvc://datasets/chat/train.jsonl",
            "validation_data": "pvc://datasets/chat/val.jsonl",
        },
        model={"weights": "pvc://models/llama-2-7b"},
        destination="pvc://outputs/runs/",
    )
    for job in (
        build_train_job(run_of(spec)),
        build_validation_job(run_of(spec)),
    ):
        claims = [volume for volume in pod_spec(job)["volumes"] if "persistentVolumeClaim" in volume]
        assert claims == [
            {"name": "pvc-0", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}},
            {"name": "pvc-1", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
            {"name": "pvc-2", "persistentVolumeClaim": {"claimName": "outputs"}},
        ]
        mounts = [mount for mount in trainer(job)["volumeMounts"] if mount["name"].startswith("pvc-")]
        assert mounts == [
            {"name": "pvc-0", "mountPath": "/mnt/pvc/datasets", "readOnly": True},
            {"name": "pvc-1", "mountPath": "/mnt/pvc/models", "readOnly": True},
            {"name": "pvc-2", "mountPath": "/mnt/pvc/outputs"},
        ]


def test_a_claim_shared_by_data_and_destination_is_mounted_once_writable() -> None:
    spec = make_spec(input={"train_data": "pvc://work/data/train.jsonl"}, destination="pvc://work/out/")
    job = build_train_job(run_of(spec))
    claims = [volume for volume in pod_spec(job)["volumes"] if "persistentVolumeClaim" in volume]
    assert claims == [{"name": "pvc-0", "persistentVolumeClaim": {"claimName": "work"}}]


def test_secrets_only_by_reference() -> None:
    spec = make_spec(
        env=[
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}},
            {"name": "LOG_LEVEL", "value": "debug"},
        ],
        envFrom=[{"secretRef": {"name": "s3-credentials"}}],
        imagePullSecrets=[{"name": "registry"}],
    )
    for job in (
        build_train_job(run_of(spec)),
        build_validation_job(run_of(spec)),
    ):
        container = trainer(job)
        assert container["env"][-2:] == [
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}},
            {"name": "LOG_LEVEL", "value": "debug"},
        ]
        assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
        assert pod_spec(job)["imagePullSecrets"] == [{"name": "registry"}]
    config_map = build_config_map(run_of(spec))
    assert "hub" not in json.dumps(config_map)
    assert "s3-credentials" not in json.dumps(config_map)


def test_config_map_holds_the_resolved_trainer_input() -> None:
    run = run_of(make_spec())
    config_map = build_config_map(run)
    assert config_map["metadata"]["name"] == "llama-demo-input"
    assert list(config_map["data"]) == ["input.json"]
    stored = json.loads(config_map["data"]["input.json"])
    assert stored == json.loads(
        resolve_trainer_config(OWNER.name, OWNER.namespace, OWNER.uid, run.spec, SETTINGS).model_dump_json()
    )
    assert stored["destination"] == "s3://finetunes/research/llama-demo/5f2c9e4e-uid/", "each run writes apart"
    assert stored["run_uid"] == "5f2c9e4e-uid"


def test_every_child_is_labelled_and_owned_by_the_finetunejob() -> None:
    spec = make_spec(resources={"nodes": 2})
    service = build_service(run_of(spec))
    assert service is not None
    children = {
        "input": build_config_map(run_of(spec)),
        "validation": build_validation_job(run_of(spec)),
        "rendezvous": service,
        "training": build_train_job(run_of(spec)),
    }
    for component, child in children.items():
        labels = {
            "app.kubernetes.io/name": "finetune-trainer",
            "app.kubernetes.io/instance": "llama-demo",
            MANAGED_BY_LABEL: "finetune-operator",
            COMPONENT_LABEL: component,
            JOB_NAME_LABEL: "llama-demo",
        }
        assert child["metadata"]["labels"] == labels
        assert child["metadata"]["namespace"] == "research"
        assert child["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "name": "llama-demo",
                "uid": "5f2c9e4e-uid",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        if child["kind"] == "Job":
            assert child["spec"]["template"]["metadata"]["labels"] == labels


def test_training_pods_are_selected_by_component() -> None:
    job = build_train_job(run_of(make_spec()))
    selector = component_selector(OWNER.name, Component.TRAINING)
    assert selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize(
    "name",
    [
        "a" * 63,  # the CRD caps names at MAX_NAME_LENGTH
        "llama-2-7b-fine-tune-of-the-customer-support-transcripts-2024q3",
        "7b-run",
        "team.llama.v2",
    ],
)
def test_long_names_stay_valid_dns_labels(name: str) -> None:
    names = workload_names(name)
    for child in (names.config_map, names.validation_job, names.train_job, names.service):
        assert DNS_LABEL.match(child), child
        assert len(child) <= 63
    # Indexed Job pods are named <job>-<index> (nodes <= 64), and that hostname is a DNS label too.
    assert len(f"{names.train_job}-63") <= 63
    owner = Owner(name=name, namespace="ns", uid="u", labels={})
    labels = build_train_job(run_of(make_spec(), owner=owner))["metadata"]["labels"]
    assert all(len(value) <= 63 for value in labels.values())


def test_shortened_names_stay_unique() -> None:
    first = "x" * 60 + "-a"
    second = "x" * 60 + "-b"
    assert workload_names(first) != workload_names(second)
    assert workload_names(first) == workload_names(first)


def test_invalid_spec_is_reported_before_any_manifest() -> None:
    settings = SETTINGS.model_copy(update={"default_destination": None})
    with pytest.raises(InvalidSpec, match=r"^spec\.destination: "):
        resolve_run(OWNER, make_spec(), settings)


def test_manifests_are_deterministic() -> None:
    spec = make_spec(resources={"nodes": 3, "nodeSelector": {"b": "2", "a": "1"}})
    first = json.dumps(build_train_job(run_of(spec)))
    second = json.dumps(
        build_train_job(run_of(make_spec(resources={"nodes": 3, "nodeSelector": {"a": "1", "b": "2"}})))
    )
    assert first == second
