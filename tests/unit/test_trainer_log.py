"""Reading the trainer's event protocol out of its log into status fields."""

from __future__ import annotations

import itertools
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
from finetune_operator.trainer_log import MAX_SAMPLES, EventBudget, TrainerLog

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


def test_loss_history_of_a_long_run_stays_within_two_hundred_evenly_spaced_points() -> None:
    log = TrainerLog(tail_lines=10, tail_bytes=4096)
    total = 100_000
    for step in range(1, total + 1):
        log.feed(
            encode(ProgressEvent(step=step, total_steps=total, epoch=3 * step / total, loss=3 - step / total)), NOW
        )
        if step % 1000 == 0:
            log.feed(encode(EvalEvent(epoch=3 * step / total, eval_loss=2.5 - step / total)), NOW)
    history = log.status_patch()["lossHistory"]
    assert len(history["train"]) + len(history["eval"]) <= 200
    train_steps = [point["step"] for point in history["train"]]
    assert train_steps[0] == 1
    assert train_steps[-1] == total  # the newest point is always there
    spacings = {later - earlier for earlier, later in itertools.pairwise(train_steps[:-1])}
    assert len(spacings) == 1  # evenly thinned
    assert len(train_steps) > 80  # and not thinned more than it must be
    assert history["eval"][-1] == {"step": total, "epoch": 3.0, "loss": 1.5}
    assert len(history["eval"]) > 20


def test_loss_history_keeps_every_point_of_a_short_run() -> None:
    log = TrainerLog(tail_lines=10, tail_bytes=4096)
    for step in range(1, 31):
        log.feed(encode(ProgressEvent(step=step, total_steps=30, epoch=step / 10, loss=2.5 - step * 0.05)), NOW)
    log.feed(encode(EvalEvent(epoch=3, eval_loss=1.2)), NOW)
    history = log.status_patch()["lossHistory"]
    assert [point["step"] for point in history["train"]] == list(range(1, 31))
    assert history["train"][0] == {"step": 1, "epoch": 0.1, "loss": 2.45}
    assert history["eval"] == [{"step": 30, "epoch": 3.0, "loss": 1.2}]


def test_a_start_without_losses_writes_no_history() -> None:
    log = TrainerLog(tail_lines=10, tail_bytes=4096)
    log.feed(encode(StartEvent(world_size=8, total_steps=30, epochs=3)), NOW)
    assert "lossHistory" not in log.status_patch()


def test_a_burst_beyond_the_budget_keeps_the_events_in_order() -> None:
    log = TrainerLog(tail_lines=40, tail_bytes=8192, budget=EventBudget(per_second=2, now=0.0))
    for step in range(1, 11):
        log.feed(encode(ProgressEvent(step=step, total_steps=10, epoch=step / 10, loss=2.0 - step / 10)), NOW, 0.0)
    log.feed(encode(EvalEvent(epoch=1, eval_loss=1.5)), NOW, 0.0)
    patch = log.status_patch()
    assert patch["progress"]["step"] == 10, "the newest progress is never lost"
    assert patch["lossHistory"]["eval"] == [{"step": 10, "epoch": 1.0, "loss": 1.5}]
    assert len(patch["lossHistory"]["train"]) < 10, "progress beyond the budget was coalesced"
