"""The generated CRD on a real API server: bad specs are refused at create with messages that name the field,
defaults are filled in from the same pydantic models, `kubectl get ftj` shows the printer columns, and
`kubectl explain` documents every spec field."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_harness import install_crd
from kubernetes import client
from kubernetes.client.rest import ApiException
from kwokpods import wait_for
from testcluster import DevCluster

from finetune_operator.api import API_VERSION, GROUP, KIND, PLURAL, VERSION, FineTuneJobSpec
from finetune_operator.crdgen import custom_resource_definition

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).parents[2] / "examples"
TRAIN_DATA = "https://datasets.example.com/train.jsonl"


@pytest.fixture(scope="module")
def objects(devcluster: DevCluster) -> client.CustomObjectsApi:
    install_crd(devcluster.api)
    return client.CustomObjectsApi(devcluster.api)


def manifest(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}


def create(objects: client.CustomObjectsApi, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = objects.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body, field_validation="Strict"
    )
    return created


def rejection(error: ApiException) -> str:
    """The API server's message for a refused request: 422 Invalid, or 400 for strict decoding errors."""
    assert error.status in (400, 422), error.body
    message: str = json.loads(error.body)["message"]
    return message


def with_input(**fields: Any) -> dict[str, Any]:
    return {"input": {"train_data": TRAIN_DATA, **fields}}


# (case, spec, the field path the message must name, a fragment of the message)
BAD_SPECS = [
    (
        "micro-batch-over-train-batch",
        with_input(micro_batch_size=8, train_batch_size=4),
        "spec.input.micro_batch_size",
        "micro_batch_size must not exceed train_batch_size",
    ),
    (
        "wrap-without-pack",
        with_input(wrap_packed_sequences=True),
        "spec.input.wrap_packed_sequences",
        "wrap_packed_sequences needs pack_sequences: true",
    ),
    (
        "ftp-train-data",
        {"input": {"train_data": "ftp://files.example.com/train.jsonl"}},
        "spec.input.train_data",
        "must be a https://, s3://, gs:// or pvc:// URI",
    ),
    (
        "http-validation-data",
        with_input(validation_data="http://files.example.com/val.jsonl"),
        "spec.input.validation_data",
        "must be a https://, s3://, gs:// or pvc:// URI",
    ),
    (
        "negative-epochs",
        with_input(num_train_epochs=-1),
        "spec.input.num_train_epochs",
        "greater than or equal to 1",
    ),
    ("zero-learning-rate", with_input(learning_rate=0), "spec.input.learning_rate", "greater than 0"),
    ("dropout-one", with_input(lora_dropout=1), "spec.input.lora_dropout", "less than 1"),
    ("peft-dora", with_input(peft_method="dora"), "spec.input.peft_method", 'Unsupported value: "dora"'),
    (
        "chunk-size-over-max",
        with_input(chunk_size=65536),
        "spec.input.chunk_size",
        "less than or equal to 32768",
    ),
    ("unknown-input", with_input(epochs=3), "spec.input.epochs", "unknown field"),
    (
        "negative-gpus-per-node",
        {**with_input(), "resources": {"gpusPerNode": -1}},
        "spec.resources.gpusPerNode",
        "greater than or equal to 0",
    ),
    (
        "zero-nodes",
        {**with_input(), "resources": {"nodes": 0}},
        "spec.resources.nodes",
        "greater than or equal to 1",
    ),
    (
        "memory-not-a-quantity",
        {**with_input(), "resources": {"memory": "lots"}},
        "spec.resources.memory",
        "should match",
    ),
    (
        "http-destination",
        {**with_input(), "destination": "http://bucket.example.com/out/"},
        "spec.destination",
        "must be a s3://, gs:// or pvc:// URI",
    ),
    (
        "ftp-weights",
        {**with_input(), "model": {"weights": "ftp://weights.example.com/llama"}},
        "spec.model.weights",
        "must be a hf://, https://, s3://, gs:// or pvc:// URI",
    ),
    ("missing-train-data", {"input": {"num_train_epochs": 1}}, "spec.input.train_data", "Required value"),
    (
        "ftp-webhook",
        {**with_input(), "webhook": {"url": "ftp://hooks.example.com/"}},
        "spec.webhook.url",
        "spec.webhook.url must be an http:// or https:// URL",
    ),
    (
        "unknown-webhook-event",
        {**with_input(), "webhook": {"url": "https://hooks.example.com/", "events": ["finished"]}},
        "spec.webhook.events[0]",
        'Unsupported value: "finished"',
    ),
]


@pytest.mark.parametrize(("spec", "field", "fragment"), [case[1:] for case in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_is_rejected_at_create_naming_the_field(
    objects: client.CustomObjectsApi, namespace: str, spec: dict[str, Any], field: str, fragment: str
) -> None:
    with pytest.raises(ApiException) as raised:
        create(objects, namespace, manifest("bad", spec))
    message = rejection(raised.value)
    assert field in message
    assert fragment in message


# (case, spec at create, merge patch of the spec, a fragment of the message)
FORBIDDEN_UPDATES = [
    (
        "uncancel",
        {**with_input(), "cancel": True},
        {"cancel": False},
        "a canceled FineTuneJob stays canceled",
    ),
    ("change-input", with_input(), {"input": {"num_train_epochs": 5}}, "spec.input is immutable"),
    ("change-model", with_input(), {"model": {"name": "meta/llama-2-13b"}}, "spec.model is immutable"),
    ("change-resources", with_input(), {"resources": {"nodes": 2}}, "spec.resources is immutable"),
    (
        "change-destination",
        {**with_input(), "destination": "s3://out/a/"},
        {"destination": "s3://out/b/"},
        "spec.destination is immutable",
    ),
    ("add-destination", with_input(), {"destination": "s3://out/a/"}, "spec.destination is immutable"),
]


@pytest.mark.parametrize(
    ("spec", "patch", "fragment"),
    [case[1:] for case in FORBIDDEN_UPDATES],
    ids=[c[0] for c in FORBIDDEN_UPDATES],
)
def test_forbidden_update_is_rejected(
    objects: client.CustomObjectsApi,
    namespace: str,
    spec: dict[str, Any],
    patch: dict[str, Any],
    fragment: str,
) -> None:
    create(objects, namespace, manifest("immutable", spec))
    with pytest.raises(ApiException) as raised:
        objects.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "immutable", {"spec": patch})
    assert fragment in rejection(raised.value)


def test_allowed_updates_are_accepted(objects: client.CustomObjectsApi, namespace: str) -> None:
    create(objects, namespace, manifest("mutable", with_input()))
    for patch in ({"suspend": True}, {"suspend": False}, {"backoffLimit": 5}, {"cancel": True}):
        updated = objects.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "mutable", {"spec": patch})
        assert patch.items() <= updated["spec"].items()


# (field, a value at create, another value): each may change until the training Job exists, and not after.
FIXED_ONCE_RUNNING_CHANGES = [
    ("image", "registry.example/trainer:1", "registry.example/trainer:2"),
    ("imagePullSecrets", [{"name": "a"}], [{"name": "b"}]),
    ("env", [{"name": "LOG_LEVEL", "value": "info"}], [{"name": "LOG_LEVEL", "value": "debug"}]),
    ("envFrom", [{"secretRef": {"name": "s3-a"}}], [{"secretRef": {"name": "s3-b"}}]),
    ("backoffLimit", 3, 5),
    ("activeDeadlineSeconds", 3600, 7200),
]


@pytest.mark.parametrize(
    ("field", "before", "after"), FIXED_ONCE_RUNNING_CHANGES, ids=[c[0] for c in FIXED_ONCE_RUNNING_CHANGES]
)
def test_fields_the_training_job_is_built_from_are_fixed_once_it_exists(
    objects: client.CustomObjectsApi, namespace: str, field: str, before: Any, after: Any
) -> None:
    name = f"fixed-{field.lower()}"
    create(objects, namespace, manifest(name, {**with_input(), field: before}))
    # Before the Job exists the change is taken: it is used when the Job is created.
    objects.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": {field: after}})
    objects.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": {"phase": "Running", "workload": {"job": f"{name}-train"}}}
    )
    with pytest.raises(ApiException) as raised:
        objects.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": {field: before}})
    message = rejection(raised.value)
    assert f"spec.{field}" in message
    assert "cannot change once the training Job exists" in message
    # The fields the operator acts on at once stay open.
    for allowed in ({"suspend": True}, {"ttlSecondsAfterFinished": 60}, {"cancel": True}):
        objects.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": allowed})


def test_minimal_spec_comes_back_with_every_default(objects: client.CustomObjectsApi, namespace: str) -> None:
    spec = {"input": {"train_data": TRAIN_DATA}}
    created = create(objects, namespace, manifest("minimal", spec))
    # One source of truth: the API server's defaults are the pydantic models' defaults.
    assert created["spec"] == FineTuneJobSpec.model_validate(spec).model_dump(mode="json", exclude_none=True)


def test_explicit_nulls_are_accepted_as_unset(objects: client.CustomObjectsApi, namespace: str) -> None:
    spec = {
        "input": {"train_data": TRAIN_DATA, "validation_data": None, "validation_prompt": None},
        "destination": None,
    }
    created = create(objects, namespace, manifest("nulls", spec))
    assert FineTuneJobSpec.model_validate(created["spec"]) == FineTuneJobSpec.model_validate(with_input())


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("finetunejob*.yaml")), ids=lambda path: path.name)
def test_example_is_accepted(objects: client.CustomObjectsApi, namespace: str, path: Path) -> None:
    body = yaml.safe_load(path.read_text())
    created = create(objects, namespace, body)
    assert created["spec"] == FineTuneJobSpec.model_validate(body["spec"]).model_dump(mode="json", exclude_none=True)


def test_kubectl_get_shows_the_printer_columns(
    devcluster: DevCluster, objects: client.CustomObjectsApi, namespace: str
) -> None:
    create(objects, namespace, manifest("columns", with_input()))
    status = {
        "phase": "Running",
        "progress": {"percent": 42, "trainLoss": 1.93, "epoch": 1.3},
        "resolved": {
            "worldSize": 8,
            "perDeviceBatchSize": 1,
            "gradientAccumulationSteps": 1,
            "effectiveBatchSize": 8,
        },
        "output": {"weights": "s3://out/columns/"},
    }
    objects.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "columns", {"status": status})

    header, row = devcluster.kubectl_run("get", "ftj", "-n", namespace).stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "AGE"]
    assert row.split()[:4] == ["columns", "Running", "42", "1.93"]

    header, row = devcluster.kubectl_run("get", "ftj", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "AGE", "EPOCH", "GPUS", "WEIGHTS"]
    assert row.split()[:4] == ["columns", "Running", "42", "1.93"]
    assert row.split()[-3:] == ["1.3", "8", "s3://out/columns/"]


def spec_fields(schema: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """(path, description) of every field under a schema, list items' fields included."""
    for name, field in (schema.get("properties") or {}).items():
        yield (*path, name), str(field.get("description", ""))
        yield from spec_fields(field.get("items", field) if field.get("type") == "array" else field, (*path, name))


def test_kubectl_explain_documents_every_spec_field(devcluster: DevCluster, objects: client.CustomObjectsApi) -> None:
    schema = custom_resource_definition()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    fields = list(spec_fields(schema))
    assert len(fields) > 60

    def explain(path: tuple[str, ...]) -> str | None:
        result = subprocess.run(
            [
                str(devcluster.kubectl),
                f"--kubeconfig={devcluster.kubeconfig}",
                "explain",
                ".".join(("ftj.spec", *path)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return result.stdout if result.returncode == 0 else None

    # The API server publishes a new CRD's schema to kubectl a moment after it is Established.
    wait_for(lambda: explain(fields[-1][0]), timeout=60, description="the CRD's schema in kubectl explain")
    for path, description in fields:
        out = explain(path)
        assert out is not None, f"kubectl explain ftj.spec.{'.'.join(path)} fails"
        assert f"FIELD: {path[-1]} <" in out
        documented = " ".join(out.split("DESCRIPTION:", 1)[1].split())
        assert description, f"spec.{'.'.join(path)} has no description"
        assert " ".join(description.split()) in documented, f"spec.{'.'.join(path)}: {documented[:300]}"
