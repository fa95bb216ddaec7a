"""The workload manifests pass the real API server's validation, and it keeps every field as we wrote it."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from testcluster import DevCluster

from finetune_operator.api import FineTuneJobSpec
from finetune_operator.conventions import KUEUE_QUEUE_LABEL
from finetune_operator.resolution import Owner, resolve_run
from finetune_operator.settings import Settings
from finetune_operator.workload import build_config_map, build_service, build_train_job, build_validation_job

pytestmark = pytest.mark.integration

SPEC = FineTuneJobSpec.model_validate(
    {
        "input": {"train_data": "pvc://datasets/chat/train.jsonl", "peft_method": "qlora"},
        "model": {"weights": "pvc://models/llama-2-7b"},
        "destination": "s3://out/run/",
        "resources": {
            "nodes": 2,
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        },
        "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}}],
        "envFrom": [{"secretRef": {"name": "s3-credentials"}}],
        "imagePullSecrets": [{"name": "registry"}],
        "activeDeadlineSeconds": 3600,
    }
)
SETTINGS = Settings(trainer_image="registry.example/trainer:1.0")


def assert_kept(ours: Any, theirs: Any, path: str = "") -> None:
    """Everything we wrote is in what the server returns, unchanged (it may add defaults)."""
    if isinstance(ours, dict):
        assert isinstance(theirs, dict), path
        for key, value in ours.items():
            assert key in theirs, f"{path}.{key} was dropped"
            assert_kept(value, theirs[key], f"{path}.{key}")
    elif isinstance(ours, list):
        assert isinstance(theirs, list), path
        assert len(ours) == len(theirs), path
        for index, (mine, served) in enumerate(zip(ours, theirs, strict=True)):
            assert_kept(mine, served, f"{path}[{index}]")
    else:
        assert ours == theirs, f"{path}: {ours!r} became {theirs!r}"


def test_manifests_are_accepted_and_kept_as_written(devcluster: DevCluster, namespace: str) -> None:
    owner = Owner(name="manifests", namespace=namespace, uid="0b5e1f8e-0000-4000-8000-000000000000", labels={})
    queued = Owner(owner.name, namespace, owner.uid, labels={KUEUE_QUEUE_LABEL: "a40"})
    run = resolve_run(owner, SPEC, SETTINGS)
    service = build_service(run)
    assert service is not None
    core = client.CoreV1Api(devcluster.api)
    batch = client.BatchV1Api(devcluster.api)
    api = devcluster.api

    # Dry run: the server validates and defaults, and nothing is left for the garbage collector.
    for manifest, create in (
        (build_config_map(run), core.create_namespaced_config_map),
        (service, core.create_namespaced_service),
        (build_validation_job(run), batch.create_namespaced_job),
        (build_train_job(run), batch.create_namespaced_job),
        (build_train_job(resolve_run(queued, SPEC, SETTINGS)), batch.create_namespaced_job),
    ):
        served = api.sanitize_for_serialization(create(namespace, manifest, dry_run="All"))
        assert_kept(manifest, served)
