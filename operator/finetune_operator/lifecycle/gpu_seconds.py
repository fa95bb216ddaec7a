"""GPU-seconds: the time the trainer containers held their GPUs, counted as time passes.

Pods do not last: suspending a job deletes them, and a retried Job's failed pods may be removed. So the count is
never recomputed from the pods in sight; each observation adds the GPU time the pods held since the count was last
taken (`status.gpuSecondsUntil`) and moves that mark to now. A pod that disappears between two observations takes
with it only the time since the last count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

from finetune_operator.lifecycle.observation import Manifest
from finetune_operator.lifecycle.observed import trainer_state
from finetune_operator.timestamps import parse_timestamp


def gpu_seconds(gpus_per_pod: int, pods: Sequence[Manifest], since: datetime | None, until: datetime) -> int:
    """GPU-seconds the trainer containers held between `since` (None: from their start) and `until`."""
    total = 0.0
    for pod in pods:
        state = trainer_state(pod)
        started = (state.get("running") or state.get("terminated") or {}).get("startedAt")
        if not started:
            continue
        finished = (state.get("terminated") or {}).get("finishedAt")
        start = parse_timestamp(started)
        end = min(parse_timestamp(finished), until) if finished else until
        if since is not None:
            start = max(start, since)
        total += max(0.0, (end - start).total_seconds()) * gpus_per_pod
    return math.floor(total)
