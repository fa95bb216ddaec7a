"""crds/ is generated from the pydantic models, is structural, and carries their rules and defaults."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.crdgen import CRD_FILE_NAME, custom_resource_definition, render

CRD_PATH = Path(__file__).parents[2] / "crds" / CRD_FILE_NAME


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return custom_resource_definition()


def root_schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def spec_schema(crd: dict[str, Any], *path: str) -> dict[str, Any]:
    node: dict[str, Any] = root_schema(crd)["properties"]["spec"]
    for name in path:
        node = node["properties"][name]
    return node


def schema_nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from schema_nodes(child, f"{path}.{name}")
    if "items" in node:
        yield from schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_nodes(node["additionalProperties"], f"{path}{{}}")


def test_crds_directory_matches_the_models(crd: dict[str, Any]) -> None:
    assert CRD_PATH.read_text() == render(crd), "crds/ is out of date with finetune_operator.api: run `make crds`"


def test_crd_names_and_versions(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == "finetunejobs.finetune.dev"
    assert crd["spec"]["names"] == {
        "kind": "FineTuneJob",
        "listKind": "FineTuneJobList",
        "plural": "finetunejobs",
        "singular": "finetunejob",
        "shortNames": ["ftj"],
        "categories": ["finetune"],
    }
    assert crd["spec"]["scope"] == "Namespaced"
    [version] = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_schema_is_structural(crd: dict[str, Any]) -> None:
    text = yaml.safe_dump(root_schema(crd))
    assert "$ref" not in text
    assert "anyOf" not in text
    assert "title" not in text
    for path, node in schema_nodes(root_schema(crd)):
        assert "type" in node, f"schema node {path or '<root>'} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(bound, True) is True, f"{path}: {bound} must be a boolean in OpenAPI v3"


def test_strings_and_lists_under_cel_rules_are_bounded(crd: dict[str, Any]) -> None:
    # The API server refuses CEL rules whose estimated cost over the largest allowed value exceeds its budget.
    for path, node in schema_nodes(root_schema(crd)["properties"]["spec"]):
        if "x-kubernetes-validations" not in node or path == "":
            continue
        for inner_path, inner in schema_nodes(node, path):
            if inner["type"] == "string" and "enum" not in inner:
                assert "maxLength" in inner, f"{inner_path} is under a CEL rule and has no maxLength"
            if inner["type"] == "array":
                assert "maxItems" in inner, f"{inner_path} is under a CEL rule and has no maxItems"
            if inner["type"] == "object" and "additionalProperties" in inner:
                assert "maxProperties" in inner, f"{inner_path} is under a CEL rule and has no maxProperties"


def test_cross_field_and_immutability_rules_are_present(crd: dict[str, Any]) -> None:
    input_rules = {rule["rule"]: rule for rule in spec_schema(crd, "input")["x-kubernetes-validations"]}
    assert input_rules["self.micro_batch_size <= self.train_batch_size"]["fieldPath"] == ".micro_batch_size"
    assert input_rules["!self.wrap_packed_sequences || self.pack_sequences"]["fieldPath"] == ".wrap_packed_sequences"
    for field in ("input", "model", "resources", "destination"):
        rules = [rule["rule"] for rule in spec_schema(crd, field)["x-kubernetes-validations"]]
        assert "self == oldSelf" in rules, f"spec.{field} is not immutable"
    assert [rule["rule"] for rule in spec_schema(crd)["x-kubernetes-validations"]] == [
        "has(self.destination) == has(oldSelf.destination)"
    ]
    assert [rule["rule"] for rule in spec_schema(crd, "cancel")["x-kubernetes-validations"]] == [
        "oldSelf == false || self == true"
    ]


@pytest.mark.parametrize(
    ("path", "schemes"),
    [
        (("input", "train_data"), "https|s3|gs|pvc"),
        (("input", "validation_data"), "https|s3|gs|pvc"),
        (("model", "weights"), "hf|https|s3|gs|pvc"),
        (("destination",), "s3|gs|pvc"),
    ],
)
def test_uri_fields_check_their_schemes(crd: dict[str, Any], path: tuple[str, ...], schemes: str) -> None:
    rules = [rule["rule"] for rule in spec_schema(crd, *path)["x-kubernetes-validations"]]
    assert f"self.matches('^({schemes})://[^/].*$')" in rules


def test_defaults_are_in_the_schema(crd: dict[str, Any]) -> None:
    input_properties = spec_schema(crd, "input")["properties"]
    assert input_properties["learning_rate"]["default"] == 1e-4
    assert input_properties["peft_method"] == {
        "default": "lora",
        "description": "LoRA, or QLoRA on a 4-bit NF4 base.",
        "enum": ["lora", "qlora"],
        "type": "string",
    }
    assert spec_schema(crd, "input")["required"] == ["train_data"]
    # Objects built by a default_factory default to {} so that the defaults nested in them apply at admission.
    assert spec_schema(crd, "resources")["default"] == {}
    assert spec_schema(crd, "model")["default"] == {}
    assert spec_schema(crd, "resources", "gpusPerNode")["default"] == 8
    assert spec_schema(crd, "resources", "nodeSelector")["default"] == {}
    assert spec_schema(crd, "env")["default"] == []


def test_optional_fields_are_nullable_and_bounds_translated(crd: dict[str, Any]) -> None:
    assert spec_schema(crd, "input", "validation_data")["nullable"] is True
    assert "default" not in spec_schema(crd, "input", "validation_data")
    learning_rate = spec_schema(crd, "input", "learning_rate")
    assert (learning_rate["minimum"], learning_rate["exclusiveMinimum"]) == (0, True)
    dropout = spec_schema(crd, "input", "lora_dropout")
    assert (dropout["maximum"], dropout["exclusiveMaximum"]) == (1, True)


def test_conditions_are_a_map_keyed_by_type(crd: dict[str, Any]) -> None:
    conditions = root_schema(crd)["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]


def test_printer_columns(crd: dict[str, Any]) -> None:
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [(column["name"], column["jsonPath"], column.get("priority", 0)) for column in columns] == [
        ("Phase", ".status.phase", 0),
        ("Progress", ".status.progress.percent", 0),
        ("Loss", ".status.progress.trainLoss", 0),
        ("Age", ".metadata.creationTimestamp", 0),
        ("Epoch", ".status.progress.epoch", 1),
        ("GPUs", ".status.resolved.worldSize", 1),
        ("Weights", ".status.output.weights", 1),
    ]
