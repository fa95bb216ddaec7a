"""The examples in examples/ are valid FineTuneJobs, and the recorded demo run is one the operator reads."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_contract.protocol import (
    EvalEvent,
    OutputEvent,
    ProgressEvent,
    SampleEvent,
    StartEvent,
    ValidatedEvent,
    parse_line,
    parse_termination_message,
)
from finetune_operator.api import API_VERSION, KIND, FineTuneJobSpec
from finetune_operator.trainer_log import TrainerLog

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("finetunejob*.yaml"))
DEMO = Path(__file__).parents[2] / "examples" / "demo"
NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


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


def test_the_recorded_demo_run_still_parses_with_the_protocol() -> None:
    """`make demo` plays examples/demo/ into a simulated pod: every event in it must still be one the operator reads."""
    lines = (DEMO / "train.log").read_text().splitlines()
    events = []
    for number, line in enumerate(lines, start=1):
        event = parse_line(line)
        if '"ftj"' in line:
            assert event is not None, f"examples/demo/train.log line {number} no longer parses: {line[:200]}"
            events.append(event)
    [start] = [event for event in events if isinstance(event, StartEvent)]
    steps = [event.step for event in events if isinstance(event, ProgressEvent)]
    assert steps == list(range(1, start.total_steps + 1))
    assert [event.epoch for event in events if isinstance(event, EvalEvent)] == [1, 2, 3][: start.epochs]
    assert len([event for event in events if isinstance(event, SampleEvent)]) == start.epochs
    assert isinstance(events[-1], OutputEvent)
    validated = parse_termination_message((DEMO / "validate-termination.json").read_text())
    assert isinstance(validated, ValidatedEvent)
    assert validated.resolved.steps_per_epoch is not None
    assert validated.resolved.steps_per_epoch * start.epochs == start.total_steps
    # What the operator's log follower makes of it: the whole run, to 100 %, with both loss curves.
    log = TrainerLog(tail_lines=40, tail_bytes=8192)
    for line in lines:
        log.feed(line, NOW)
    log.flush(NOW)
    patch = log.status_patch()
    assert (patch["progress"]["step"], patch["progress"]["percent"]) == (start.total_steps, 100)
    assert len(patch["lossHistory"]["train"]) == start.total_steps
    assert len(patch["lossHistory"]["eval"]) == start.epochs


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
