"""Pods whose node stopped reporting: which count as lost, and the status patch that lets their Job replace them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator.lifecycle.lost_pods import LOST_POD_MARGIN_SECONDS, failed_status_patch, lost_pods

NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


def pod(
    name: str = "run-train-0-abcde",
    *,
    grace_ended_ago: float | None = None,
    phase: str = "Running",
    conditions: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"namespace": "team-a", "name": name, "uid": f"uid-{name}"}
    if grace_ended_ago is not None:
        ended = NOW - timedelta(seconds=grace_ended_ago)
        metadata["deletionTimestamp"] = ended.strftime("%Y-%m-%dT%H:%M:%SZ")
        metadata["deletionGracePeriodSeconds"] = 30
    status: dict[str, Any] = {"phase": phase}
    if conditions is not None:
        status["conditions"] = conditions
    return {"metadata": metadata, "status": status}


def test_a_pod_is_lost_only_once_its_grace_period_is_long_over() -> None:
    pods = [
        pod("running"),
        pod("in-grace", grace_ended_ago=-20),
        pod("just-past-grace", grace_ended_ago=LOST_POD_MARGIN_SECONDS - 1),
        pod("lost", grace_ended_ago=LOST_POD_MARGIN_SECONDS + 5),
    ]
    found = lost_pods(pods, NOW)
    assert [lost.name for lost in found] == ["lost"]
    assert found[0].overdue_seconds == LOST_POD_MARGIN_SECONDS + 5
    assert found[0].uid == "uid-lost"


def test_a_lost_running_pod_is_set_failed_with_a_disruption_condition_tied_to_its_uid() -> None:
    scheduled = [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]
    (lost,) = lost_pods([pod(grace_ended_ago=60, conditions=scheduled)], NOW)
    assert lost.needs_failing
    operations = failed_status_patch(lost, "2026-11-30T12:00:00Z")
    assert operations[0] == {"op": "test", "path": "/metadata/uid", "value": "uid-run-train-0-abcde"}
    assert operations[1] == {"op": "replace", "path": "/status/phase", "value": "Failed"}
    added = operations[2]
    assert added["path"] == "/status/conditions/-"
    assert added["value"]["type"] == "DisruptionTarget"
    assert added["value"]["status"] == "True"
    assert added["value"]["reason"] == "NodeStoppedReporting"


def test_a_disruption_condition_already_set_by_the_taint_manager_is_kept_as_it_is() -> None:
    evicted = [
        {"type": "PodScheduled", "status": "True"},
        {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"},
    ]
    (lost,) = lost_pods([pod(grace_ended_ago=60, conditions=evicted)], NOW)
    assert [operation["op"] for operation in failed_status_patch(lost, "2026-11-30T12:00:00Z")] == ["test", "replace"]


def test_a_pod_without_conditions_gets_a_conditions_list() -> None:
    (lost,) = lost_pods([pod(grace_ended_ago=60)], NOW)
    added = failed_status_patch(lost, "2026-11-30T12:00:00Z")[2]
    assert added["path"] == "/status/conditions"
    assert [condition["type"] for condition in added["value"]] == ["DisruptionTarget"]


def test_a_lost_pod_that_already_ended_is_only_deleted() -> None:
    # The API server refuses to move a pod out of a final phase; its Job has already counted it.
    succeeded, failed = lost_pods(
        [pod("done", grace_ended_ago=60, phase="Succeeded"), pod("failed", grace_ended_ago=60, phase="Failed")], NOW
    )
    assert not succeeded.needs_failing
    assert not failed.needs_failing
