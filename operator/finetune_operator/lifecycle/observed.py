"""Readers of the observed pods and Jobs, as the API server returns them: small questions, plain answers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from finetune_contract.protocol import Event, Output, OutputEvent, parse_termination_message
from finetune_operator.conventions import COMPLETION_INDEX_ANNOTATION, TRAINER_CONTAINER
from finetune_operator.lifecycle.observation import Manifest
from finetune_operator.timestamps import parse_timestamp


def completion_index(pod: Manifest) -> int | None:
    """The pod's index in its Indexed Job: 0 is the trainer's rank 0."""
    value = pod.get("metadata", {}).get("annotations", {}).get(COMPLETION_INDEX_ANNOTATION)
    return int(value) if value is not None and str(value).isdigit() else None


def newest_first(pods: Sequence[Manifest]) -> list[Manifest]:
    return sorted(pods, key=lambda pod: str(pod.get("metadata", {}).get("creationTimestamp", "")), reverse=True)


def pod_phase(pod: Manifest) -> str:
    return str(pod.get("status", {}).get("phase", "Pending"))


def deleting(pod: Manifest) -> bool:
    return bool(pod.get("metadata", {}).get("deletionTimestamp"))


def trainer_state(pod: Manifest) -> Mapping[str, Any]:
    """The trainer container's state (`waiting`, `running` or `terminated`), or {} before it has one."""
    for container in pod.get("status", {}).get("containerStatuses", []) or []:
        if container.get("name") == TRAINER_CONTAINER:
            state: Mapping[str, Any] = container.get("state") or {}
            return state
    return {}


def terminated(pod: Manifest) -> Mapping[str, Any]:
    state: Mapping[str, Any] = trainer_state(pod).get("terminated") or {}
    return state


def job_condition(job: Manifest, kind: str) -> bool:
    conditions = job.get("status", {}).get("conditions", []) or []
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)


def job_failure(job: Manifest) -> tuple[str | None, str | None]:
    """The reason and message of the Job's Failed condition, if it has one."""
    for condition in job.get("status", {}).get("conditions", []) or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            return condition.get("reason"), condition.get("message")
    return None, None


def job_failed_pods(job: Manifest | None) -> int:
    """Pods of the Job that failed and counted against its backoffLimit."""
    if job is None:
        return 0
    return int(job.get("status", {}).get("failed", 0) or 0)


def unschedulable_message(pods: Sequence[Manifest]) -> str | None:
    """The scheduler's message for the first pending pod it cannot place."""
    for pod in pods:
        if pod_phase(pod) != "Pending":
            continue
        for condition in pod.get("status", {}).get("conditions", []) or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                return str(condition.get("message") or "no node can run the trainer pod")
    return None


def scheduled(pod: Manifest) -> bool:
    """Whether the pod has been placed on a node."""
    return bool(pod.get("spec", {}).get("nodeName"))


# Waiting reasons every container goes through on its way to running: they tell nothing about trouble.
_STARTING_WAITING = frozenset(("ContainerCreating", "PodInitializing"))


def waiting_message(pods: Sequence[Manifest]) -> str | None:
    """Why a scheduled pod's trainer is held back (e.g. ImagePullBackOff), or None when nothing holds it back."""
    for pod in pods:
        if not scheduled(pod):
            continue
        waiting = trainer_state(pod).get("waiting") or {}
        reason = waiting.get("reason")
        if reason and reason not in _STARTING_WAITING:
            detail = f": {waiting['message']}" if waiting.get("message") else ""
            return f"pod {pod['metadata']['name']} is {reason}{detail}"
    return None


def termination_event(pods: Sequence[Manifest]) -> Event | None:
    """The event the newest pod with a termination message left."""
    for pod in newest_first(pods):
        message = terminated(pod).get("message")
        if message:
            return parse_termination_message(str(message))
    return None


def rank0_output(pods: Sequence[Manifest]) -> Output | None:
    """The output the newest rank-0 pod reported in its termination message."""
    for pod in newest_first(pods):
        if completion_index(pod) != 0:
            continue
        event = parse_termination_message(str(terminated(pod).get("message") or ""))
        if isinstance(event, OutputEvent):
            return Output.model_validate(event.model_dump(include={"weights", "files", "metrics"}))
    return None


# Waiting reasons of a container that retrying will not fix: the image or its configuration is wrong.
_STUCK_WAITING = {
    "ErrImagePull": "ImagePullFailed",
    "ImagePullBackOff": "ImagePullFailed",
    "InvalidImageName": "ImagePullFailed",
    "CreateContainerConfigError": "ContainerConfigError",
}
# What the scheduler says about a pod whose volume claim does not exist.
_MISSING_CLAIM = "persistentvolumeclaim"


def stuck_pod(pods: Sequence[Manifest], now: datetime, timeout: float) -> tuple[str, str] | None:
    """(reason, message) of a pod stuck on something that will not heal by itself, for longer than `timeout`."""
    for pod in pods:
        created = pod.get("metadata", {}).get("creationTimestamp")
        if not created or (now - parse_timestamp(str(created))).total_seconds() < timeout:
            continue
        name = pod.get("metadata", {}).get("name", "")
        waiting = trainer_state(pod).get("waiting") or {}
        reason = _STUCK_WAITING.get(str(waiting.get("reason")))
        if reason is not None:
            detail = waiting.get("message") or waiting.get("reason")
            return reason, f"pod {name} has been waiting for {int(timeout)}s: {detail}"
        unschedulable = unschedulable_message([pod])
        if unschedulable and _MISSING_CLAIM in unschedulable and "not found" in unschedulable:
            return "VolumeNotFound", f"pod {name} has been unschedulable for {int(timeout)}s: {unschedulable}"
    return None


def disruption(pod: Manifest) -> tuple[str, str] | None:
    """(reason, message) of the pod's DisruptionTarget condition: preemption, eviction, a drain, a lost node."""
    for condition in pod.get("status", {}).get("conditions", []) or []:
        if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
            return str(condition.get("reason") or "Disrupted"), str(condition.get("message") or "")
    return None


def failed_rank(pods: Sequence[Manifest]) -> Manifest | None:
    """A trainer pod of the current attempt that failed or was disrupted: its group cannot go on without it."""
    for pod in pods:
        if deleting(pod) and disruption(pod) is None:
            continue
        if pod_phase(pod) == "Failed" or disruption(pod) is not None:
            return pod
    return None


def disrupted_pods(pods: Sequence[Manifest]) -> frozenset[str]:
    """UIDs of the pods with a DisruptionTarget condition."""
    return frozenset(str(pod["metadata"]["uid"]) for pod in pods if disruption(pod) is not None)
