"""Reading the trainer's event protocol out of its log into status fields."""

from __future__ import annotations

from datetime import UTC, datetime

from finetune_contract.protocol import (
    EvalEvent,
    OutputEvent,
    ProgressEvent,
    SampleEvent,
    StartEvent,
    encode,
)
from finetune_operator.api.status import LOG_FOLLOWER_FIELDS
from finetune_operator.trainer_log import MAX_SAMPLES, TrainerLog

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


def test_progress_events_become_status_progress() -> None:
    log = TrainerLog(tail_lines=40, tail_bytes=8192)
    log.feed(encode(StartEvent(world_size=8, total_steps=300, epochs=3)), NOW)
    log.feed("plain log line from transformers", NOW)
    log.feed(
        encode(
            ProgressEvent(
                step=40,
                total_steps=300,
                epoch=0.4,
                loss=1.93456,
                learning_rate=1e-4,
                tokens_per_second=15200.26,
                eta_seconds=2710.2,
            )
        ),
        NOW,
    )
    log.feed(encode(EvalEvent(epoch=1, eval_loss=1.71, perplexity=5.5)), NOW)
    patch = log.status_patch()
    assert patch["progress"] == {
        "epoch": 1.0,
        "totalEpochs": 3,
        "step": 40,
        "totalSteps": 300,
        "percent": 13,
        "trainLoss": 1.9346,
        "evalLoss": 1.71,
        "learningRate": 1e-4,
        "tokensPerSecond": 15200.3,
        "etaSeconds": 2711,
        "lastHeartbeat": "2026-11-28T12:00:00Z",
    }
    assert "plain log line from transformers" in patch["logs"]
    assert log.events == 3


def test_the_newest_samples_are_kept() -> None:
    log = TrainerLog(tail_lines=40, tail_bytes=8192)
    for epoch in range(MAX_SAMPLES + 2):
        log.feed(encode(SampleEvent(epoch=epoch, prompt="Q", completion=f"A{epoch}")), NOW)
    patch = log.status_patch()
    assert len(patch["validationSamples"]) == MAX_SAMPLES
    assert patch["validationSamples"][-1] == {
        "epoch": MAX_SAMPLES + 1,
        "prompt": "Q",
        "completion": f"A{MAX_SAMPLES + 1}",
    }


def test_the_output_event_completes_progress_and_leaves_the_output_to_the_state_machine() -> None:
    log = TrainerLog(tail_lines=40, tail_bytes=8192)
    log.feed(encode(StartEvent(world_size=8, total_steps=30, epochs=3)), NOW)
    log.feed(encode(ProgressEvent(step=29, total_steps=30, epoch=2.9, loss=1.2)), NOW)
    log.feed(encode(OutputEvent(weights="s3://b/ns/job/", metrics={"train_loss": 1.1})), NOW)
    patch = log.status_patch()
    assert (patch["progress"]["step"], patch["progress"]["percent"]) == (30, 100)
    assert "output" not in patch


def test_the_log_follower_writes_only_its_own_status_fields() -> None:
    log = TrainerLog(tail_lines=40, tail_bytes=8192)
    for event in (
        StartEvent(world_size=8, total_steps=30, epochs=3),
        ProgressEvent(step=3, total_steps=30, epoch=0.3, loss=1.9),
        EvalEvent(epoch=1, eval_loss=1.7),
        SampleEvent(epoch=1, prompt="Q", completion="A"),
        OutputEvent(weights="s3://b/ns/job/"),
    ):
        log.feed(encode(event), NOW)
    assert set(log.status_patch()) == LOG_FOLLOWER_FIELDS


def test_log_tail_stays_within_its_line_and_byte_bounds() -> None:
    log = TrainerLog(tail_lines=20, tail_bytes=512)
    for number in range(10_000):
        log.feed(f"line {number} " + "x" * 40, NOW)
    tail = log.tail
    assert len(tail.encode()) <= 512
    assert tail.splitlines()[-1].startswith("line 9999 ")
    assert len(tail.splitlines()) <= 20


def test_garbage_and_unknown_events_are_plain_log_lines() -> None:
    log = TrainerLog(tail_lines=10, tail_bytes=4096)
    for line in ['{"ftj": 1, "event": "telemetry", "x": 1}', '{"ftj": 1, "event": "progress"}', "{not json", "{}"]:
        log.feed(line, NOW)
    assert log.events == 0
    assert "progress" not in log.status_patch()
