"""Pods whose node stopped reporting: no kubelet will ever confirm their end, so the operator does.

The taint manager evicts a pod from a NotReady node after its toleration (settings.lost_node_seconds); the pod then
stays terminating for good, and the training Job (its podFailurePolicy makes it replace only Failed pods) waits
for it forever. Past its grace period and a margin, the operator does what the pod garbage collector does for a
node marked out-of-service: it sets the pod Failed with a DisruptionTarget condition, so that the Job counts a
disruption (not a failure) and makes a replacement, and deletes it without grace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from finetune_operator.timestamps import parse_timestamp

# A live kubelet confirms a pod's end within seconds of its grace period; this long after it, none will.
LOST_POD_MARGIN_SECONDS = 30.0
TERMINAL_PHASES = frozenset(("Succeeded", "Failed"))
DISRUPTION_CONDITION = "DisruptionTarget"
NODE_LOST_REASON = "NodeStoppedReporting"


@dataclass(frozen=True)
class LostPod:
    namespace: str
    name: str
    uid: str
    overdue_seconds: float
    # Set the pod Failed first: a pod that already ended only needs deleting.
    needs_failing: bool
    # Whether it has a True DisruptionTarget condition already (the taint manager's), and a conditions list at all.
    marked_disrupted: bool
    has_conditions: bool


def _past_grace(pod: Mapping[str, Any], now: datetime) -> float | None:
    """Seconds since a terminating pod's grace period ended; None if it is not terminating."""
    # The API server sets deletionTimestamp to the end of the grace period.
    grace_ends = pod["metadata"].get("deletionTimestamp")
    return None if not grace_ends else (now - parse_timestamp(str(grace_ends))).total_seconds()


def lost_pods(pods: Iterable[Mapping[str, Any]], now: datetime) -> list[LostPod]:
    """The pods still terminating LOST_POD_MARGIN_SECONDS after their grace period ended."""
    found = []
    for pod in pods:
        overdue = _past_grace(pod, now)
        if overdue is None or overdue < LOST_POD_MARGIN_SECONDS:
            continue
        metadata, status = pod["metadata"], pod.get("status") or {}
        found.append(
            LostPod(
                namespace=metadata["namespace"],
                name=metadata["name"],
                uid=metadata["uid"],
                overdue_seconds=overdue,
                needs_failing=status.get("phase") not in TERMINAL_PHASES,
                marked_disrupted=any(
                    condition.get("type") == DISRUPTION_CONDITION and condition.get("status") == "True"
                    for condition in status.get("conditions") or ()
                ),
                has_conditions="conditions" in status,
            )
        )
    return found


def failed_status_patch(pod: LostPod, now: str) -> list[dict[str, Any]]:
    """A JSON patch for pods/status: only the pod with this UID, phase Failed, and a DisruptionTarget condition."""
    operations: list[dict[str, Any]] = [
        {"op": "test", "path": "/metadata/uid", "value": pod.uid},
        {"op": "replace", "path": "/status/phase", "value": "Failed"},
    ]
    if not pod.marked_disrupted:
        condition = {
            "type": DISRUPTION_CONDITION,
            "status": "True",
            "reason": NODE_LOST_REASON,
            "message": "finetune-operator: the pod's node stopped reporting and its grace period is long over",
            "lastTransitionTime": now,
        }
        if pod.has_conditions:
            operations.append({"op": "add", "path": "/status/conditions/-", "value": condition})
        else:
            operations.append({"op": "add", "path": "/status/conditions", "value": [condition]})
    return operations
