"""ttlSecondsAfterFinished: a finished FineTuneJob is deleted this long after it completed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from finetune_operator.api.spec import FineTuneJobSpec
from finetune_operator.api.status import FineTuneJobStatus
from finetune_operator.timestamps import parse_timestamp


@dataclass(frozen=True)
class TtlDecision:
    delete_now: bool = False
    requeue_after: float | None = None


def ttl_after_finished(spec: FineTuneJobSpec | None, status: FineTuneJobStatus, now: datetime) -> TtlDecision:
    """Delete now, look again when the TTL runs out, or nothing (no TTL, or not finished)."""
    ttl = spec.ttl_seconds_after_finished if spec is not None else None
    if ttl is None or status.completed_at is None:
        return TtlDecision()
    remaining = (parse_timestamp(status.completed_at) - now).total_seconds() + ttl
    if remaining <= 0:
        return TtlDecision(delete_now=True)
    return TtlDecision(requeue_after=remaining)
