"""Why a Job failed, in words a user can search for: the trainer's error event, else the container's state."""

from __future__ import annotations

from collections.abc import Sequence

from finetune_contract.protocol import EXIT_USER_ERROR, ErrorEvent, parse_termination_message
from finetune_operator.api.status import ErrorInfo
from finetune_operator.lifecycle.observation import Manifest
from finetune_operator.lifecycle.observed import job_failure, newest_first, pod_phase, terminated

# How much of a container's last output a failure message quotes when the trainer left no error event.
LAST_OUTPUT_CHARS = 1024


def pod_failure(job: Manifest, pods: Sequence[Manifest], default_reason: str) -> ErrorInfo:
    """What went wrong, from the newest failed pod: the trainer's error event, else the container's state."""
    job_reason, job_message = job_failure(job)
    if job_reason == "DeadlineExceeded":  # the Job controller stopped the pods: their exit codes say nothing
        return ErrorInfo(reason=job_reason, message=job_message or "spec.activeDeadlineSeconds was exceeded")
    for pod in newest_first(pods):
        state = terminated(pod)
        exit_code = state.get("exitCode")
        if pod_phase(pod) != "Failed" or exit_code in (None, 0):
            continue
        name = str(pod.get("metadata", {}).get("name", ""))
        raw_message = str(state.get("message") or "").strip()
        event = parse_termination_message(raw_message)
        container_reason = str(state.get("reason") or "Error")
        if isinstance(event, ErrorEvent):
            reason, message = event.reason, event.message
        elif exit_code == EXIT_USER_ERROR:
            reason, message = "InvalidInput", "the trainer rejected the inputs (exit code 65)"
        elif container_reason == "OOMKilled":
            reason, message = "OOMKilled", "the trainer ran out of memory (OOMKilled)"
        else:
            reason, message = default_reason, f"the trainer exited with code {exit_code} ({container_reason})"
        if raw_message and not isinstance(event, ErrorEvent):
            message = f"{message}; last output: {raw_message[-LAST_OUTPUT_CHARS:]}"
        return ErrorInfo(reason=reason, message=message, exit_code=int(exit_code), pod=name)
    return ErrorInfo(reason=job_reason or default_reason, message=job_message or "the Job failed")
