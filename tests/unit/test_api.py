"""The FineTuneJob API models, the batch plan and the trainer -> operator protocol."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import ValidationError

from finetune_contract.batching import plan_batches
from finetune_contract.inputs import TrainingInput
from finetune_contract.protocol import (
    TERMINATION_MESSAGE_LIMIT,
    CheckpointEvent,
    ErrorEvent,
    EvalEvent,
    Event,
    OutputEvent,
    OutputFile,
    ProgressEvent,
    ResolvedRun,
    SampleEvent,
    StartEvent,
    ValidatedEvent,
    encode,
    parse_line,
    parse_termination_message,
    termination_message,
)
from finetune_operator.api import FineTuneJobSpec
from finetune_operator.api.status import (
    LOG_FOLLOWER_FIELDS,
    STATE_MACHINE_FIELDS,
    WEBHOOK_DISPATCHER_FIELDS,
    FineTuneJobStatus,
)

TRAIN_DATA = "https://data.example/train.jsonl"

# Replicate's training inputs for meta/llama-2-7b and their defaults.
REPLICATE_DEFAULTS = {
    "num_train_epochs": 3,
    "train_batch_size": 4,
    "micro_batch_size": 4,
    "num_validation_samples": 50,
    "validation_data": None,
    "validation_batch_size": 1,
    "run_validation": True,
    "validation_prompt": None,
    "learning_rate": 1e-4,
    "pack_sequences": False,
    "wrap_packed_sequences": False,
    "chunk_size": 2048,
    "peft_method": "lora",
    "seed": 42,
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
}


def test_input_defaults_equal_replicates() -> None:
    assert TrainingInput(train_data=TRAIN_DATA).model_dump() == {
        "train_data": TRAIN_DATA,
        **REPLICATE_DEFAULTS,
    }


def test_a_replicate_input_object_is_accepted_verbatim() -> None:
    replicate_input = {
        "train_data": TRAIN_DATA,
        "num_train_epochs": 1,
        "lora_rank": 16,
        "peft_method": "qlora",
    }
    spec = FineTuneJobSpec.model_validate({"input": replicate_input})
    assert spec.input.model_dump(exclude_defaults=True) == replicate_input


def test_kubernetes_fields_default_to_eight_a40s_on_one_node() -> None:
    spec = FineTuneJobSpec.model_validate({"input": {"train_data": TRAIN_DATA}})
    dumped = spec.model_dump(exclude_none=True)
    assert dumped["model"] == {"name": "meta/llama-2-7b"}
    assert dumped["resources"]["gpusPerNode"] == 8
    assert dumped["resources"]["gpuProduct"] == "NVIDIA-A40"
    assert dumped["resources"]["nodes"] == 1
    assert (dumped["suspend"], dumped["cancel"], dumped["backoffLimit"]) == (False, False, 3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"micro_batch_size": 8, "train_batch_size": 4}, "micro_batch_size must not exceed train_batch_size"),
        ({"wrap_packed_sequences": True}, "wrap_packed_sequences needs pack_sequences"),
    ],
)
def test_cross_field_rules(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainingInput.model_validate({"train_data": TRAIN_DATA, **fields})


def test_wrap_with_pack_is_accepted() -> None:
    inputs = TrainingInput(train_data=TRAIN_DATA, pack_sequences=True, wrap_packed_sequences=True)
    assert (inputs.pack_sequences, inputs.wrap_packed_sequences) == (True, True)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"learning_rate": 0}, "learning_rate\n  Input should be greater than 0"),
        ({"lora_dropout": 1}, "lora_dropout\n  Input should be less than 1"),
        ({"num_train_epochs": 0}, "num_train_epochs\n  Input should be greater than or equal to 1"),
        ({"chunk_size": 65536}, "chunk_size\n  Input should be less than or equal to 32768"),
        ({"peft_method": "dora"}, "peft_method\n  Input should be 'lora' or 'qlora'"),
        ({"unknown_input": 1}, "unknown_input\n  Extra inputs are not permitted"),
    ],
)
def test_out_of_range_inputs_are_rejected_naming_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)) as raised:
        TrainingInput.model_validate({"train_data": TRAIN_DATA, **fields})
    assert raised.value.error_count() == 1


@pytest.mark.parametrize("quantity", ["lots", "32 cores", "1.5.2Gi"])
def test_resource_quantities_are_checked(quantity: str) -> None:
    with pytest.raises(ValidationError, match=r"resources\.memory\n  String should match pattern") as raised:
        FineTuneJobSpec.model_validate({"input": {"train_data": TRAIN_DATA}, "resources": {"memory": quantity}})
    assert raised.value.errors()[0]["input"] == quantity


def test_default_batch_plan_on_eight_gpus_gives_eight() -> None:
    plan = plan_batches(train_batch_size=4, micro_batch_size=4, world_size=8)
    assert (plan.per_device_batch_size, plan.gradient_accumulation_steps, plan.effective_batch_size) == (
        1,
        1,
        8,
    )


@pytest.mark.parametrize(
    ("train", "micro", "world", "expected"),
    [
        (64, 4, 8, (4, 2, 64)),  # accumulation makes up the global batch
        (32, 4, 8, (4, 1, 32)),
        (4, 4, 1, (4, 1, 4)),
        (10, 2, 16, (1, 1, 16)),  # never smaller than asked for
    ],
)
def test_batch_plan(train: int, micro: int, world: int, expected: tuple[int, int, int]) -> None:
    plan = plan_batches(train, micro, world)
    assert (
        plan.per_device_batch_size,
        plan.gradient_accumulation_steps,
        plan.effective_batch_size,
    ) == expected


def test_steps_per_epoch_counts_optimizer_steps() -> None:
    plan = plan_batches(train_batch_size=64, micro_batch_size=4, world_size=8)
    assert plan.steps_per_epoch(1000) == 16  # 125 rows per rank, 32 micro batches, 2 per step


EVENTS: list[Event] = [
    StartEvent(
        world_size=8,
        total_steps=300,
        epochs=3,
        resolved=ResolvedRun(
            world_size=8, per_device_batch_size=1, gradient_accumulation_steps=1, effective_batch_size=8
        ),
    ),
    ProgressEvent(step=40, total_steps=300, epoch=0.4, loss=1.93, learning_rate=1e-4, tokens_per_second=15200.0),
    EvalEvent(epoch=1, eval_loss=1.71, perplexity=5.5),
    SampleEvent(epoch=1, prompt="Q: 2+2?", completion="4"),
    CheckpointEvent(epoch=1, uri="s3://bucket/run/checkpoints/epoch-1"),
    OutputEvent(
        weights="s3://bucket/run/",
        files=[OutputFile(path="adapter_model.safetensors", size=16801880, sha256="ab" * 32)],
        metrics={"train_loss": 1.2},
    ),
    ValidatedEvent(
        resolved=ResolvedRun(
            world_size=8,
            per_device_batch_size=1,
            gradient_accumulation_steps=1,
            effective_batch_size=8,
            train_rows=950,
        )
    ),
    ErrorEvent(reason="InvalidTrainingData", message='train_data line 17: missing "completion"'),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda event: event.event)
def test_protocol_round_trip(event: Event) -> None:
    line = encode(event)
    assert "\n" not in line
    assert json.loads(line)["ftj"] == 1
    assert parse_line(line) == event


@pytest.mark.parametrize(
    "line",
    [
        "Loading checkpoint shards: 100%",
        '{"event": "progress", "step": 1}',  # no protocol version: not ours
        '{"ftj": 1, "event": "telemetry", "x": 1}',  # an event this operator does not know
        '{"ftj": 1, "event": "progress"',  # cut off
        '{"ftj": 1, "event": "progress", "step": "many"}',
    ],
)
def test_other_lines_are_not_events(line: str) -> None:
    assert parse_line(line) is None


def test_termination_message_fits_and_keeps_the_weights() -> None:
    output = OutputEvent(
        weights="s3://bucket/run/",
        files=[OutputFile(path=f"shard-{index:05}.safetensors", size=index, sha256="0" * 64) for index in range(200)],
        metrics={"train_loss": 1.2},
    )
    message = termination_message(output)
    assert len(message.encode()) <= TERMINATION_MESSAGE_LIMIT
    parsed = parse_termination_message(message)
    assert isinstance(parsed, OutputEvent)
    assert parsed.weights == "s3://bucket/run/"
    assert parsed.metrics == {"train_loss": 1.2}


def test_small_termination_message_is_the_whole_output() -> None:
    [output] = [event for event in EVENTS if isinstance(event, OutputEvent)]
    assert parse_termination_message(termination_message(output)) == output


def test_every_status_field_has_exactly_one_writer() -> None:
    wire_names = {field.alias or name for name, field in FineTuneJobStatus.model_fields.items()}
    writers = (STATE_MACHINE_FIELDS, LOG_FOLLOWER_FIELDS, WEBHOOK_DISPATCHER_FIELDS)
    assert sum(len(fields) for fields in writers) == len(wire_names), "a field with two writers"
    assert wire_names == STATE_MACHINE_FIELDS | LOG_FOLLOWER_FIELDS | WEBHOOK_DISPATCHER_FIELDS
