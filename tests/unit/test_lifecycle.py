"""The FineTuneJob state machine, driven by API objects shaped as the API server returns them."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from conftest import make_spec
from finetune_contract.protocol import (
    EXIT_USER_ERROR,
    ErrorEvent,
    OutputEvent,
    OutputFile,
    ResolvedRun,
    ValidatedEvent,
    encode,
    termination_message,
)
from finetune_operator.api.spec import FineTuneJobSpec, Resources
from finetune_operator.api.status import ConditionType, ErrorInfo, FineTuneJobStatus, Phase
from finetune_operator.lifecycle import Action, Decision, Observation, decide
from finetune_operator.lifecycle.observation import ChildWarning
from finetune_operator.naming import workload_names
from finetune_operator.timestamps import timestamp

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
CREATED = timestamp(NOW - timedelta(minutes=10))


def observe(status: FineTuneJobStatus | None = None, **changes: Any) -> Observation:
    fields: dict[str, Any] = {
        "spec": make_spec(),
        "status": status or FineTuneJobStatus(),
        "generation": 1,
        "created_at": CREATED,
        "now": NOW,
        "names": workload_names("demo"),
    }
    fields.update(changes)
    return Observation(**fields)


def job(*conditions: tuple[str, str], suspend: bool = False, failed: int = 0) -> dict[str, Any]:
    return {
        "metadata": {"name": "demo-train"},
        "spec": {"suspend": suspend},
        "status": {
            "failed": failed,
            "conditions": [
                {"type": kind, "status": "True", "reason": reason, "message": f"{kind}: {reason}"}
                for kind, reason in conditions
            ],
        },
    }


def pod(
    name: str = "demo-train-0-abcde",
    *,
    index: int = 0,
    phase: str = "Running",
    state: dict[str, Any] | None = None,
    node: str | None = "gpu-node-0",
    conditions: list[dict[str, Any]] | None = None,
    created: str = "2026-11-28T11:55:00Z",
) -> dict[str, Any]:
    running = {"running": {"startedAt": "2026-11-28T11:56:00Z"}}
    return {
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "creationTimestamp": created,
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "spec": {"nodeName": node} if node else {},
        "status": {
            "phase": phase,
            "conditions": conditions or [],
            "containerStatuses": [{"name": "trainer", "state": state if state is not None else running}],
        },
    }


def terminated(exit_code: int, message: str = "", reason: str = "Error") -> dict[str, Any]:
    return {
        "terminated": {
            "exitCode": exit_code,
            "reason": reason,
            "message": message,
            "startedAt": "2026-11-28T11:56:00Z",
            "finishedAt": "2026-11-28T11:58:00Z",
        }
    }


def validated_status() -> FineTuneJobStatus:
    return decide(observe(validation_job=job(("Complete", "Completed")))).status


def condition(decision: Decision, kind: ConditionType) -> tuple[str, str]:
    found = next(c for c in decision.status.conditions if c.type is kind)
    return found.status, found.reason


def test_new_job_validates_its_data_before_claiming_gpus() -> None:
    decision = decide(observe())
    assert decision.status.phase is Phase.VALIDATING
    assert decision.actions == (Action.CREATE_VALIDATION,)
    assert condition(decision, ConditionType.VALIDATED) == ("Unknown", "ValidatingData")
    assert decision.status.created_at == CREATED
    assert [n.reason for n in decision.notices] == ["ValidatingData", "BatchSizeRounded"]


def test_valid_data_creates_the_training_job_and_records_row_counts() -> None:
    summary = ValidatedEvent(
        resolved=ResolvedRun(
            world_size=8,
            per_device_batch_size=1,
            gradient_accumulation_steps=1,
            effective_batch_size=8,
            train_rows=950,
            validation_rows=50,
            train_tokens=123_456,
        )
    )
    validation_pod = pod("demo-validate-x", phase="Succeeded", state=terminated(0, encode(summary), "Completed"))
    decision = decide(
        observe(
            status=decide(observe()).status,
            validation_job=job(("Complete", "Completed")),
            validation_pods=[validation_pod],
        )
    )
    assert decision.actions == (Action.CREATE_TRAINING,)
    assert decision.status.phase is Phase.QUEUED
    assert condition(decision, ConditionType.VALIDATED) == ("True", "DataValid")
    resolved = decision.status.resolved
    assert resolved is not None
    assert (resolved.train_rows, resolved.validation_rows, resolved.train_tokens) == (950, 50, 123_456)
    # 950 rows over 8 GPUs at one row each: ceil(ceil(950 / 8) / 1) / 1 steps.
    assert resolved.steps_per_epoch == 119


def test_default_batch_on_eight_gpus_is_rounded_up_to_eight_with_a_warning() -> None:
    decision = decide(observe())
    resolved = decision.status.resolved
    assert resolved is not None
    assert (resolved.world_size, resolved.per_device_batch_size, resolved.gradient_accumulation_steps) == (8, 1, 1)
    assert resolved.effective_batch_size == 8
    warnings = [n for n in decision.notices if n.reason == "BatchSizeRounded"]
    assert warnings
    assert warnings[0].type == "Warning"
    assert "= 8" in warnings[0].message


def test_cpu_shape_counts_one_process_per_pod_in_the_world_size() -> None:
    decision = decide(observe(spec=make_spec(resources={"gpusPerNode": 0, "nodes": 2})))
    resolved = decision.status.resolved
    assert resolved is not None
    assert (resolved.world_size, resolved.per_device_batch_size, resolved.gradient_accumulation_steps) == (2, 2, 1)


def test_bad_training_data_fails_with_the_line_number_and_no_gpu_job() -> None:
    error = ErrorEvent(reason="InvalidTrainingData", message='train_data line 17: missing "completion"')
    failed_pod = pod("demo-validate-x", phase="Failed", state=terminated(65, encode(error)))
    decision = decide(
        observe(
            status=decide(observe()).status,
            validation_job=job(("Failed", "PodFailurePolicy")),
            validation_pods=[failed_pod],
        )
    )
    assert decision.status.phase is Phase.FAILED
    assert Action.CREATE_TRAINING not in decision.actions
    assert decision.status.error is not None
    assert decision.status.error.reason == "InvalidTrainingData"
    assert decision.status.error.message == 'train_data line 17: missing "completion"'
    assert decision.status.error.exit_code == 65
    assert decision.status.error.pod == "demo-validate-x"
    assert condition(decision, ConditionType.VALIDATED) == ("False", "InvalidTrainingData")
    assert decision.notices[0].type == "Warning"


def test_invalid_spec_fails_at_once() -> None:
    decision = decide(observe(spec_error="spec.input.train_data: link-local addresses are not allowed"))
    assert decision.status.phase is Phase.FAILED
    assert decision.actions == ()
    assert decision.status.error is not None
    assert decision.status.error.reason == "InvalidSpec"


def test_unreadable_spec_fails_without_touching_anything() -> None:
    decision = decide(observe(spec=None, spec_error="spec.input.train_data: Field required"))
    assert decision.status.phase is Phase.FAILED
    assert decision.actions == ()
    assert decision.status.error is not None
    assert (decision.status.error.reason, decision.status.error.message) == (
        "InvalidSpec",
        "spec.input.train_data: Field required",
    )
    assert condition(decision, ConditionType.FAILED) == ("True", "InvalidSpec")


def test_unschedulable_pods_queue_the_job_with_the_scheduler_reason() -> None:
    message = "0/3 nodes are available: 2 Insufficient nvidia.com/gpu, 1 node(s) had untolerated taint."
    pending = pod(
        phase="Pending",
        state={"waiting": {"reason": "ContainerCreating"}},
        node=None,
        conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}],
    )
    decision = decide(observe(status=validated_status(), train_job=job(), train_pods=[pending]))
    assert decision.status.phase is Phase.QUEUED
    assert condition(decision, ConditionType.ADMITTED) == ("False", "Unschedulable")
    assert decision.status.message == message
    assert decision.notices[0].type == "Warning"
    assert "nvidia.com/gpu" in decision.notices[0].message


def test_scheduled_pods_that_pull_their_image_are_starting() -> None:
    waiting = pod(state={"waiting": {"reason": "ImagePullBackOff", "message": "back-off pulling"}}, phase="Pending")
    decision = decide(observe(status=validated_status(), train_job=job(), train_pods=[waiting]))
    assert decision.status.phase is Phase.STARTING
    assert "ImagePullBackOff" in (decision.status.message or "")


def test_rank0_running_means_running_and_sets_started_at_once() -> None:
    first = decide(observe(status=validated_status(), train_job=job(), train_pods=[pod()]))
    assert first.status.phase is Phase.RUNNING
    assert first.status.started_at == timestamp(NOW)
    later = decide(observe(status=first.status, train_job=job(), train_pods=[pod()], now=NOW + timedelta(minutes=5)))
    assert later.status.started_at == timestamp(NOW)
    assert later.notices == ()
    # 8 GPUs since 11:56, observed at 12:05.
    assert later.status.gpu_seconds == 8 * 9 * 60
    assert later.requeue_after is not None


def test_success_reads_weights_from_the_rank0_termination_message() -> None:
    output = OutputEvent(
        weights="s3://bucket/ns/demo/",
        files=[OutputFile(path="adapter_model.safetensors", size=16_801_880, sha256="ab" * 32)],
        metrics={"train_loss": 1.2},
    )
    done = pod(phase="Succeeded", state=terminated(0, termination_message(output), "Completed"))
    running = decide(observe(status=validated_status(), train_job=job(), train_pods=[pod()])).status
    decision = decide(observe(status=running, train_job=job(("Complete", "Completed")), train_pods=[done]))
    assert decision.status.phase is Phase.SUCCEEDED
    assert decision.status.output is not None
    assert decision.status.output.weights == "s3://bucket/ns/demo/"
    assert decision.status.output.files[0].size == 16_801_880
    assert decision.status.completed_at == timestamp(NOW)
    assert condition(decision, ConditionType.SUCCEEDED) == ("True", "TrainingSucceeded")
    assert condition(decision, ConditionType.RUNNING) == ("False", "TrainingSucceeded")
    assert decision.requeue_after is None


def test_oom_kill_is_reported_with_exit_code_pod_and_log_tail() -> None:
    oom = pod(phase="Failed", state=terminated(137, "step 40 loss 1.9\nCUDA out of memory", "OOMKilled"))
    decision = decide(
        observe(status=validated_status(), train_job=job(("Failed", "BackoffLimitExceeded")), train_pods=[oom])
    )
    error = decision.status.error
    assert error is not None
    assert (error.reason, error.exit_code, error.pod) == ("OOMKilled", 137, "demo-train-0-abcde")
    assert "CUDA out of memory" in error.message


def test_a_retried_failure_warns_and_counts_the_restart() -> None:
    failed = pod("demo-train-0-aaaaa", phase="Failed", state=terminated(1), created="2026-11-28T11:50:00Z")
    decision = decide(
        observe(status=validated_status(), train_job=job(failed=1), train_pods=[failed, pod("demo-train-0-bbbbb")])
    )
    assert decision.status.phase is Phase.RUNNING
    assert decision.status.restarts == 1
    restarts = [n for n in decision.notices if n.reason == "TrainerRestarted"]
    assert restarts
    assert "retry 1 of 3" in restarts[0].message


def test_cancel_removes_the_workload_and_keeps_the_status() -> None:
    running = decide(observe(status=validated_status(), train_job=job(), train_pods=[pod()])).status
    decision = decide(observe(status=running, spec=make_spec(cancel=True), train_job=job(), train_pods=[pod()]))
    assert decision.status.phase is Phase.CANCELED
    assert decision.actions == (Action.DELETE_WORKLOAD,)
    assert decision.status.started_at == running.started_at
    again = decide(observe(status=decision.status, spec=make_spec(cancel=True), train_job=job()))
    assert again.actions == (Action.DELETE_WORKLOAD,)
    gone = decide(observe(status=decision.status, spec=make_spec(cancel=True)))
    assert gone.actions == ()


def test_suspend_and_resume_the_training_job() -> None:
    running = decide(observe(status=validated_status(), train_job=job(), train_pods=[pod()])).status
    suspending = decide(observe(status=running, spec=make_spec(suspend=True), train_job=job(), train_pods=[pod()]))
    assert suspending.actions == (Action.SUSPEND_TRAINING,)
    assert suspending.status.phase is Phase.SUSPENDED
    suspended = decide(observe(status=suspending.status, spec=make_spec(suspend=True), train_job=job(suspend=True)))
    assert suspended.actions == ()
    resuming = decide(observe(status=suspended.status, train_job=job(suspend=True)))
    assert resuming.actions == (Action.RESUME_TRAINING,)
    assert condition(resuming, ConditionType.SUSPENDED) == ("False", "Resumed")


def test_kueue_managed_job_waits_for_admission_without_being_unsuspended() -> None:
    decision = decide(observe(status=validated_status(), kueue_managed=True, train_job=job(suspend=True)))
    assert decision.actions == ()
    assert decision.status.phase is Phase.QUEUED
    assert decision.status.reason == "AwaitingAdmission"


def test_finished_job_is_deleted_after_its_ttl() -> None:
    finished = FineTuneJobStatus(phase=Phase.SUCCEEDED, completed_at=timestamp(NOW - timedelta(seconds=30)))
    waiting = decide(observe(status=finished, spec=make_spec(ttl_seconds_after_finished=60)))
    assert waiting.actions == ()
    assert waiting.requeue_after == 30
    expired = decide(observe(status=finished, spec=make_spec(ttl_seconds_after_finished=10)))
    assert expired.actions == (Action.DELETE_FINETUNEJOB,)


def test_finished_is_final() -> None:
    finished = FineTuneJobStatus(phase=Phase.FAILED, completed_at=timestamp(NOW))
    decision = decide(observe(status=finished, spec=make_spec(cancel=True), train_job=job()))
    assert decision.status.phase is Phase.FAILED
    assert decision.actions == ()


def test_condition_transition_time_moves_only_when_its_status_changes() -> None:
    first = decide(observe(status=validated_status(), train_job=job(), train_pods=[pod()]))
    later = decide(replace(observe(status=first.status, train_job=job(), train_pods=[pod()]), now=NOW + timedelta(1)))
    before = {c.type: c.last_transition_time for c in first.status.conditions}
    after = {c.type: c.last_transition_time for c in later.status.conditions}
    assert before == after


def test_two_node_job_is_running_only_when_rank0_runs() -> None:
    two_nodes = make_spec(resources=Resources(nodes=2))
    rank1_only = [pod("demo-train-1-x", index=1), pod("demo-train-0-y", index=0, phase="Pending", state={})]
    decision = decide(observe(spec=two_nodes, status=validated_status(), train_job=job(), train_pods=rank1_only))
    assert decision.status.phase is Phase.STARTING
    assert decision.status.resolved is not None
    assert decision.status.resolved.world_size == 16


def test_finished_trainer_stays_running_until_the_job_completes() -> None:
    running = decide(observe(status=validated_status(), train_job=job(), train_pods=[pod()])).status
    done = pod(phase="Succeeded", state=terminated(0, "", "Completed"))
    decision = decide(observe(status=running, train_job=job(), train_pods=[done]))
    assert decision.status.phase is Phase.RUNNING
    assert decision.notices == ()


def test_active_deadline_is_reported_as_such() -> None:
    killed = pod(phase="Failed", state=terminated(137, "", "Error"))
    decision = decide(
        observe(status=validated_status(), train_job=job(("Failed", "DeadlineExceeded")), train_pods=[killed])
    )
    assert decision.status.error is not None
    assert decision.status.error.reason == "DeadlineExceeded"


def at(clock: str) -> datetime:
    """NOW's day at hh:mm."""
    return NOW.replace(hour=int(clock[:2]), minute=int(clock[3:]))


def running_since(started: str) -> dict[str, Any]:
    return {"running": {"startedAt": started}}


def test_gpu_seconds_add_up_across_a_suspend_and_a_retry() -> None:
    first = pod("demo-train-0-aaaaa", state=running_since("2026-11-28T11:56:00Z"))
    running = decide(observe(status=validated_status(), train_job=job(), train_pods=[first]))
    # Suspended at 12:05: the Job's pods are deleted, and their 9 minutes must stay counted.
    suspending = decide(
        observe(
            status=running.status, spec=make_spec(suspend=True), train_job=job(), train_pods=[first], now=at("12:05")
        )
    )
    assert suspending.status.phase is Phase.SUSPENDED
    suspended = decide(
        observe(status=suspending.status, spec=make_spec(suspend=True), train_job=job(suspend=True), now=at("12:10"))
    )
    assert suspended.status.gpu_seconds == 8 * 9 * 60
    # Resumed: a new pod from 12:15; at 12:30 it fails and is retried by a third pod from 12:31.
    second = pod("demo-train-0-bbbbb", state=running_since("2026-11-28T12:15:00Z"), created="2026-11-28T12:15:00Z")
    resumed = decide(observe(status=suspended.status, train_job=job(), train_pods=[second], now=at("12:20")))
    assert resumed.status.phase is Phase.RUNNING
    second_failed = pod(
        "demo-train-0-bbbbb",
        phase="Failed",
        state={
            "terminated": {"exitCode": 1, "startedAt": "2026-11-28T12:15:00Z", "finishedAt": "2026-11-28T12:30:00Z"}
        },
        created="2026-11-28T12:15:00Z",
    )
    third = pod("demo-train-0-ccccc", state=running_since("2026-11-28T12:31:00Z"), created="2026-11-28T12:31:00Z")
    retried = decide(
        observe(status=resumed.status, train_job=job(failed=1), train_pods=[second_failed, third], now=at("12:40"))
    )
    assert retried.status.restarts == 1
    # 8 GPUs for 11:56-12:05, 12:15-12:30 and 12:31-12:40.
    assert retried.status.gpu_seconds == 8 * (9 + 15 + 9) * 60
    assert retried.status.gpu_seconds_until == "2026-11-28T12:40:00Z"
    # Looked at again with nothing new: the count neither grows nor counts the same time twice.
    again = decide(
        observe(status=retried.status, train_job=job(failed=1), train_pods=[second_failed, third], now=at("12:40"))
    )
    assert again.status.gpu_seconds == retried.status.gpu_seconds


def test_gpu_seconds_are_written_at_most_once_a_minute_of_running_time() -> None:
    running = decide(observe(status=validated_status(), train_job=job(), train_pods=[pod()])).status
    soon = decide(observe(status=running, train_job=job(), train_pods=[pod()], now=NOW + timedelta(seconds=30)))
    assert soon.status == running, "nothing a user sees changed: no write"
    later = decide(observe(status=running, train_job=job(), train_pods=[pod()], now=NOW + timedelta(seconds=61)))
    assert later.status.gpu_seconds == 8 * (4 * 60 + 61)


def test_a_pod_that_cannot_pull_its_image_for_ten_minutes_fails_the_job_and_frees_its_gpus() -> None:
    waiting = {"waiting": {"reason": "ImagePullBackOff", "message": 'pull "trainer:nope": not found'}}
    stuck = pod(state=waiting, phase="Pending", created="2026-11-28T11:49:00Z")
    decision = decide(observe(status=validated_status(), train_job=job(), train_pods=[stuck]))
    assert decision.status.phase is Phase.FAILED
    assert decision.status.error is not None
    assert decision.status.error.reason == "ImagePullFailed"
    assert 'pull "trainer:nope": not found' in decision.status.error.message
    assert decision.actions == (Action.DELETE_WORKLOAD,)
    fresh = pod(state=waiting, phase="Pending", created="2026-11-28T11:55:00Z")
    assert (
        decide(observe(status=validated_status(), train_job=job(), train_pods=[fresh])).status.phase is Phase.STARTING
    )


def test_a_missing_volume_claim_fails_the_job_after_the_timeout() -> None:
    message = '0/3 nodes are available: persistentvolumeclaim "datasets" not found.'
    pending = pod(
        phase="Pending",
        node=None,
        state={},
        created="2026-11-28T11:40:00Z",
        conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}],
    )
    decision = decide(observe(status=validated_status(), train_job=job(), train_pods=[pending]))
    assert decision.status.phase is Phase.FAILED
    assert decision.status.reason == "VolumeNotFound"
    assert 'persistentvolumeclaim "datasets" not found' in (decision.status.message or "")


def test_the_job_controllers_failed_create_is_shown_while_no_pod_exists() -> None:
    warning = ChildWarning(
        kind="Job",
        name="demo-train",
        reason="FailedCreate",
        message='pods "demo-train-0-x" is forbidden: exceeded quota: gpus',
        first_seen=NOW,
    )
    decision = decide(observe(status=validated_status(), train_job=job(), warnings=[warning]))
    assert decision.status.phase is Phase.QUEUED
    assert decision.status.reason == "FailedCreate"
    assert "exceeded quota: gpus" in (decision.status.message or "")
    assert condition(decision, ConditionType.ADMITTED) == ("False", "FailedCreate")
    with_pod = decide(observe(status=validated_status(), train_job=job(), train_pods=[pod()], warnings=[warning]))
    assert with_pod.status.phase is Phase.RUNNING, "once a pod exists the Job's old warning says nothing"


def test_a_name_held_by_another_object_blocks_the_job_with_a_warning() -> None:
    conflict = "ConfigMap ns/demo-input (controller: none)"
    decision = decide(observe(name_conflicts=[conflict]))
    assert decision.status.phase is Phase.VALIDATING
    assert decision.status.reason == "NameConflict"
    assert conflict in (decision.status.message or "")
    assert condition(decision, ConditionType.VALIDATED) == ("Unknown", "NameConflict")
    assert (decision.notices[0].type, decision.notices[0].reason) == ("Warning", "NameConflict")


def test_a_child_the_api_server_refuses_fails_the_job() -> None:
    refusal = ErrorInfo(reason="CreateRejected", message="the API server refused Job ns/demo-train: exceeded quota")
    decision = decide(observe(status=validated_status(), rejected=refusal))
    assert decision.status.phase is Phase.FAILED
    assert decision.status.error == refusal
    assert condition(decision, ConditionType.FAILED) == ("True", "CreateRejected")


def two_nodes() -> FineTuneJobSpec:
    return make_spec(resources=Resources(nodes=2))


def test_a_failed_rank_of_a_multi_node_run_restarts_the_whole_group() -> None:
    rank1 = pod("demo-train-1-abcde", index=1, phase="Failed", state=terminated(1, reason="Error"))
    running = decide(observe(spec=two_nodes(), status=validated_status(), train_job=job(), train_pods=[pod(), rank1]))
    assert running.status.phase is Phase.STARTING
    assert running.status.reason == "RestartingGroup"
    assert running.actions == (Action.RESTART_TRAINING,)
    assert running.status.restarts == 1
    deleting_job = job()
    deleting_job["metadata"]["deletionTimestamp"] = "2026-11-28T12:00:00Z"
    stopping = decide(observe(spec=two_nodes(), status=running.status, train_job=deleting_job, train_pods=[pod()]))
    assert (stopping.status.reason, stopping.actions) == ("RestartingGroup", ())
    again = decide(observe(spec=two_nodes(), status=stopping.status))
    assert again.actions == (Action.CREATE_TRAINING,)
    assert again.status.restarts == 1


def test_a_user_error_on_one_rank_is_left_to_the_jobs_failure_policy() -> None:
    rank1 = pod("demo-train-1-abcde", index=1, phase="Failed", state=terminated(EXIT_USER_ERROR))
    decision = decide(observe(spec=two_nodes(), status=validated_status(), train_job=job(), train_pods=[pod(), rank1]))
    assert Action.RESTART_TRAINING not in decision.actions


def test_a_group_that_keeps_failing_stops_at_the_backoff_limit() -> None:
    rank1 = pod("demo-train-1-abcde", index=1, phase="Failed", state=terminated(1))
    status = validated_status().model_copy(update={"restarts": 3})
    decision = decide(observe(spec=two_nodes(), status=status, train_job=job(), train_pods=[pod(), rank1]))
    assert decision.status.phase is Phase.FAILED
    assert decision.status.reason == "BackoffLimitExceeded"
    assert decision.actions == (Action.DELETE_WORKLOAD,)


def test_a_disrupted_pod_is_announced_once_and_counted_as_a_restart() -> None:
    evicted = pod("demo-train-0-old", phase="Failed", state=terminated(137), created="2026-11-28T11:50:00Z")
    evicted["metadata"]["uid"] = "pod-old"
    evicted["status"]["conditions"] = [
        {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI", "message": "drain"}
    ]
    first = decide(observe(status=validated_status(), train_job=job(), train_pods=[evicted, pod()]))
    assert [n.reason for n in first.notices if n.reason == "TrainerDisrupted"] == ["TrainerDisrupted"]
    assert first.status.restarts == 1
    again = decide(
        observe(
            status=first.status, train_job=job(), train_pods=[evicted, pod()], known_disruptions=frozenset({"pod-old"})
        )
    )
    assert "TrainerDisrupted" not in [n.reason for n in again.notices]
    assert again.status.restarts == 1


# --- what a lifecycle costs in status writes ----------------------------------------------------------------


def written_fields(before: FineTuneJobStatus, after: FineTuneJobStatus) -> set[str]:
    """The status fields a write of `after` over `before` carries (the reconciler writes nothing when empty)."""
    old = before.model_dump(mode="json", by_alias=True, exclude_none=True)
    new = after.model_dump(mode="json", by_alias=True, exclude_none=True)
    return {key for key in old.keys() | new.keys() if old.get(key) != new.get(key)}


def validation_pod(phase: str, state: dict[str, Any]) -> dict[str, Any]:
    return pod("demo-validate-x", phase=phase, state=state, node="cpu-node-0")


def test_a_normal_lifecycle_writes_once_per_phase_and_once_more_for_a_minute_of_gpu_time() -> None:
    report = ValidatedEvent(
        resolved=ResolvedRun(
            world_size=8, per_device_batch_size=1, gradient_accumulation_steps=1, effective_batch_size=8, train_rows=950
        )
    )
    validating = validation_pod("Running", running_since("2026-11-28T12:00:01Z"))
    reported = validation_pod("Succeeded", terminated(0, encode(report), "Completed"))
    output = OutputEvent(weights="s3://bucket/ns/demo/", files=[], metrics={})
    trainer_done = terminated(0, termination_message(output), "Completed")
    trainer_done["terminated"]["finishedAt"] = "2026-11-28T12:03:30Z"
    created = "2026-11-28T12:01:00Z"
    # What the watches show, in order, as the reconciles after each event see it: (time, observation).
    seen: list[tuple[str, dict[str, Any]]] = [
        ("12:00", {}),
        ("12:00", {"validation_job": job(), "validation_pods": [validating]}),
        # The validation pod has reported; the Job controller has not marked its Job Complete yet.
        ("12:01", {"validation_job": job(), "validation_pods": [reported]}),
        ("12:01", {"validation_job": job(("Complete", "Completed")), "validation_pods": [reported]}),
        ("12:01", {"train_job": job()}),
        ("12:01", {"train_job": job(), "train_pods": [pod(phase="Pending", state={}, node=None, created=created)]}),
        ("12:01", {"train_job": job(), "train_pods": [pod(phase="Pending", state={}, created=created)]}),
        (
            "12:01",
            {
                "train_job": job(),
                "train_pods": [
                    pod(phase="Pending", state={"waiting": {"reason": "ContainerCreating"}}, created=created)
                ],
            },
        ),
        (
            "12:02",
            {"train_job": job(), "train_pods": [pod(state=running_since("2026-11-28T12:02:00Z"), created=created)]},
        ),
        (
            "12:02",
            {"train_job": job(), "train_pods": [pod(state=running_since("2026-11-28T12:02:00Z"), created=created)]},
        ),
        (
            "12:03",
            {"train_job": job(), "train_pods": [pod(state=running_since("2026-11-28T12:02:00Z"), created=created)]},
        ),
        # The trainer has exited; its pod, then its Job, follow.
        ("12:04", {"train_job": job(), "train_pods": [pod(state=trainer_done, created=created)]}),
        ("12:04", {"train_job": job(), "train_pods": [pod(phase="Succeeded", state=trainer_done, created=created)]}),
        (
            "12:04",
            {
                "train_job": job(("Complete", "Completed")),
                "train_pods": [pod(phase="Succeeded", state=trainer_done, created=created)],
            },
        ),
        (
            "12:05",
            {
                "train_job": job(("Complete", "Completed")),
                "train_pods": [pod(phase="Succeeded", state=trainer_done, created=created)],
            },
        ),
    ]
    status = FineTuneJobStatus()
    writes: list[tuple[Phase, set[str]]] = []
    for clock, objects in seen:
        after = decide(observe(status=status, now=at(clock), **objects)).status
        fields = written_fields(status, after)
        if fields:
            writes.append((after.phase, fields))
        status = after

    assert [phase for phase, _ in writes] == [
        Phase.VALIDATING,
        Phase.QUEUED,
        Phase.STARTING,
        Phase.RUNNING,
        Phase.RUNNING,
        Phase.SUCCEEDED,
    ]
    assert writes[4][1] == {"gpuSeconds", "gpuSecondsUntil"}, "a minute of running time, and nothing else"
    assert not [fields for _, fields in writes if fields <= {"message", "conditions"}], "no write for a note alone"
    resolved_writes = [index for index, (_, fields) in enumerate(writes) if "resolved" in fields]
    assert resolved_writes == [0, 1], "the plan at once, the data sizes with the write that marks the data valid"
    assert status.resolved is not None
    assert status.resolved.train_rows == 950
    assert status.message == "the trainer finished and wrote the weights"
    # 8 GPUs from 12:02:00 to the trainer's exit at 12:03:30, all counted at the end.
    assert status.gpu_seconds == 8 * 90


def test_pods_scheduled_and_starting_wait_for_the_next_write() -> None:
    starting = decide(observe(status=validated_status(), train_job=job())).status
    assert (starting.phase, starting.message) == (Phase.STARTING, "waiting for the trainer pods to start")
    scheduled = [pod(phase="Pending", state={"waiting": {"reason": "ContainerCreating"}})]
    assert decide(observe(status=starting, train_job=job(), train_pods=scheduled)).status == starting
    # Written anyway (here: the spec changed), the status says where the pods are.
    spec_changed = decide(observe(status=starting, generation=2, train_job=job(), train_pods=scheduled)).status
    assert spec_changed.message == "the trainer pods are starting"
    assert condition(Decision(spec_changed), ConditionType.ADMITTED) == ("True", "PodsScheduled")


def test_a_pod_held_back_by_its_image_is_written_at_once_and_so_is_its_end() -> None:
    starting = decide(observe(status=validated_status(), train_job=job())).status
    backoff = pod(phase="Pending", state={"waiting": {"reason": "ImagePullBackOff", "message": "back-off pulling"}})
    held = decide(observe(status=starting, train_job=job(), train_pods=[backoff])).status
    assert held.message == "pod demo-train-0-abcde is ImagePullBackOff: back-off pulling"
    pulled = pod(phase="Pending", state={"waiting": {"reason": "ContainerCreating"}})
    after = decide(observe(status=held, train_job=job(), train_pods=[pulled])).status
    assert after.message == "the trainer pods are starting", "the trouble is over: the status must not keep it"


def test_the_data_sizes_wait_for_the_validation_job_to_complete() -> None:
    report = ValidatedEvent(
        resolved=ResolvedRun(
            world_size=8, per_device_batch_size=1, gradient_accumulation_steps=1, effective_batch_size=8, train_rows=950
        )
    )
    reported = validation_pod("Succeeded", terminated(0, encode(report), "Completed"))
    validating = decide(observe()).status
    assert decide(observe(status=validating, validation_job=job(), validation_pods=[reported])).status == validating


def test_a_stopped_trainer_whose_pod_is_being_deleted_has_its_gpu_time_counted_at_once() -> None:
    running = decide(observe(status=validated_status(), train_job=job(), train_pods=[pod()])).status
    stopped = pod(state=terminated(137, reason="Error"))
    stopped["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = "2026-11-28T12:00:20Z"
    kept = decide(observe(status=running, train_job=job(), train_pods=[stopped], now=NOW + timedelta(seconds=30)))
    assert kept.status.gpu_seconds == running.gpu_seconds, "its pod stays: counted at the next transition"
    stopped["metadata"]["deletionTimestamp"] = "2026-11-28T12:00:25Z"
    going = decide(observe(status=running, train_job=job(), train_pods=[stopped], now=NOW + timedelta(seconds=30)))
    assert going.status.gpu_seconds == (running.gpu_seconds or 0) + 8 * 20
