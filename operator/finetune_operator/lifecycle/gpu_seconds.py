"""GPU-seconds: the time the trainer containers held their GPUs, summed over the pods observed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

from finetune_operator.lifecycle.observation import Manifest
from finetune_operator.lifecycle.observed import trainer_state
from finetune_operator.timestamps import parse_timestamp


def gpu_seconds(gpus_per_pod: int, pods: Sequence[Manifest], now: datetime) -> int:
    """Seconds each trainer container ran (to `now` while it runs), times its GPUs."""
    total = 0.0
    for pod in pods:
        state = trainer_state(pod)
        started = (state.get("running") or state.get("terminated") or {}).get("startedAt")
        if not started:
            continue
        finished = (state.get("terminated") or {}).get("finishedAt")
        end = parse_timestamp(finished) if finished else now
        total += max(0.0, (end - parse_timestamp(started)).total_seconds()) * gpus_per_pod
    return math.floor(total)
