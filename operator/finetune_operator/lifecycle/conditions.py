"""Status conditions: one per type, lastTransitionTime moving only when the status does."""

from __future__ import annotations

from collections.abc import Sequence

from finetune_operator.api.status import Condition, ConditionType, FineTuneJobStatus


def set_condition(
    conditions: Sequence[Condition],
    *,
    kind: ConditionType,
    state: str,
    reason: str,
    message: str,
    now: str,
    generation: int,
) -> list[Condition]:
    """Conditions with `kind` set; lastTransitionTime moves only when the status changes."""
    existing = next((c for c in conditions if c.type is kind), None)
    transition = existing.last_transition_time if existing and existing.status == state else now
    updated = Condition(
        type=kind,
        status=state,
        reason=reason,
        message=message,
        last_transition_time=transition,
        observed_generation=generation,
    )
    others = [c for c in conditions if c.type is not kind]
    return sorted([*others, updated], key=lambda c: list(ConditionType).index(c.type))


def condition_status(status: FineTuneJobStatus, kind: ConditionType) -> str | None:
    return next((c.status for c in status.conditions if c.type is kind), None)
