"""The examples in examples/ are valid FineTuneJobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.api import API_VERSION, KIND, FineTuneJobSpec

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("finetunejob*.yaml"))


def load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


def test_both_examples_exist() -> None:
    assert [path.name for path in EXAMPLES] == ["finetunejob-qlora-2node.yaml", "finetunejob.yaml"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_is_a_valid_finetunejob(path: Path) -> None:
    document = load(path)
    assert (document["apiVersion"], document["kind"]) == (API_VERSION, KIND)
    FineTuneJobSpec.model_validate(document["spec"])


def test_minimal_example_sets_only_train_data() -> None:
    document = load(EXAMPLES[1])
    assert document["spec"] == {"input": {"train_data": document["spec"]["input"]["train_data"]}}


def test_two_node_example_takes_credentials_by_reference() -> None:
    spec = FineTuneJobSpec.model_validate(load(EXAMPLES[0])["spec"])
    assert (spec.resources.nodes, spec.input.peft_method) == (2, "qlora")
    assert [source.secret_ref.name for source in spec.env_from if source.secret_ref] == ["s3-credentials"]
    assert all(variable.value is None for variable in spec.env)


def test_demo_job_trains_on_the_cpu_of_an_executor_node_with_credentials_by_reference() -> None:
    document = load(Path(__file__).parents[2] / "examples" / "demo" / "finetunejob.yaml")
    assert (document["apiVersion"], document["kind"]) == (API_VERSION, KIND)
    spec = FineTuneJobSpec.model_validate(document["spec"])
    assert (spec.resources.gpus_per_node, spec.resources.node_selector) == (
        0,
        {"devcluster.finetune.dev/executor": "true"},
    )
    assert [toleration.key for toleration in spec.resources.tolerations] == ["devcluster.finetune.dev/executor"]
    assert [source.secret_ref.name for source in spec.env_from if source.secret_ref] == ["local-s3-credentials"]
    assert all(variable.name != "AWS_SECRET_ACCESS_KEY" for variable in spec.env)
