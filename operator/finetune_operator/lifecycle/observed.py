"""Readers of the observed pods and Jobs, as the API server returns them: small questions, plain answers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finetune_contract.protocol import Event, Output, OutputEvent, parse_termination_message
from finetune_operator.conventions import COMPLETION_INDEX_ANNOTATION, TRAINER_CONTAINER
from finetune_operator.lifecycle.observation import Manifest


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


def waiting_message(pods: Sequence[Manifest]) -> str | None:
    """Why scheduled pods are not running yet (e.g. ImagePullBackOff), or None when none is scheduled."""
    scheduled = [pod for pod in pods if pod.get("spec", {}).get("nodeName")]
    if not scheduled:
        return None
    for pod in scheduled:
        waiting = trainer_state(pod).get("waiting") or {}
        if waiting.get("reason"):
            detail = f": {waiting['message']}" if waiting.get("message") else ""
            return f"pod {pod['metadata']['name']} is {waiting['reason']}{detail}"
    return "the trainer pods are starting"


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
