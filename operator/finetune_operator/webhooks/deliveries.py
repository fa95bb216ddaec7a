"""The webhook plan, pure: which events a FineTuneJob's status calls for, when each message is due, and what a
success or a failure does to the delivery state (`status.webhook`).

- `start` once, when the job is first seen; `completed` once, when it has finished. `logs` and `output` whenever
  they change, one message of each kind waiting at a time (it sends the latest object), at most one such message
  per `intermediate_spacing`; `completed` supersedes those still waiting.
- Each URL gets its messages in order: a message waits while an earlier one to the same URL is retried.
- A failed attempt is retried after 1, 2, 4, ... seconds (at most `max_interval` apart) until an attempt made
  `window` after the first one also fails; a refused address is given up at once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from finetune_operator.api.spec import WebhookEvent, WebhookSpec
from finetune_operator.api.status import FineTuneJobStatus, WebhookDelivery, WebhookStatus

Target = Literal["url", "completedUrl"]
INTERMEDIATE_EVENTS: frozenset[str] = frozenset(("output", "logs"))


@dataclass(frozen=True)
class RetryPolicy:
    first_retry: float = 1.0
    max_interval: float = 600.0
    window: float = 3600.0
    intermediate_spacing: float = 0.5

    def delay(self, attempts: int) -> float:
        """Seconds before the next attempt after `attempts` failed ones."""
        return float(min(self.first_retry * 2 ** max(attempts - 1, 0), self.max_interval))


def stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_stamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def message_id(uid: str, sequence: int) -> str:
    return f"msg_{uid.replace('-', '')}_{sequence}"


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def targets(spec: WebhookSpec, event: WebhookEvent) -> list[Target]:
    found: list[Target] = ["url"] if event in spec.events else []
    if event == "completed" and spec.completed_url is not None and not (found and spec.completed_url == spec.url):
        found.append("completedUrl")
    return found


def target_url(spec: WebhookSpec, target: Target) -> str | None:
    return spec.url if target == "url" else spec.completed_url


def notice(
    spec: WebhookSpec, status: FineTuneJobStatus, state: WebhookStatus, uid: str, now: datetime
) -> WebhookStatus:
    """`state` with the messages that `status` calls for added (the same state when it calls for none)."""
    subscribed = set(spec.events) | ({"completed"} if spec.completed_url is not None else set())
    noticed = list(state.noticed)
    changes: dict[str, Any] = {}
    events: list[WebhookEvent] = []
    if "start" not in noticed:
        noticed.append("start")
        events.append("start")
    if status.phase.finished and "completed" not in noticed:
        noticed.append("completed")
        events.append("completed")
    elif "completed" not in noticed:
        output = None if status.output is None else status.output.model_dump(mode="json")
        intermediate: tuple[tuple[WebhookEvent, Any, str], ...] = (
            ("logs", status.logs, "logs_digest"),
            ("output", output, "output_digest"),
        )
        for event, value, field in intermediate:
            if event in subscribed and value and digest(value) != getattr(state, field):
                changes[field] = digest(value)
                events.append(event)
    if noticed != state.noticed:
        changes["noticed"] = noticed
    pending = list(state.pending)
    sequence = state.sequence
    for event in events:
        for target in targets(spec, event):
            if event == "completed":
                # The completed object carries the final logs and output: messages still waiting for them go.
                pending = [d for d in pending if not (d.target == target and d.event in INTERMEDIATE_EVENTS)]
            elif any(d.target == target and d.event == event for d in pending):
                continue  # one waiting message of a kind: it sends the latest object when it goes
            sequence += 1
            pending.append(
                WebhookDelivery(id=message_id(uid, sequence), event=event, target=target, next_attempt_at=stamp(now))
            )
    if pending != state.pending:
        changes.update(sequence=sequence, pending=pending)
    return state.model_copy(update=changes) if changes else state


def _heads(state: WebhookStatus) -> Iterator[WebhookDelivery]:
    """The first waiting message of each URL: the only one that may go."""
    seen: set[str] = set()
    for delivery in state.pending:
        if delivery.target not in seen:
            seen.add(delivery.target)
            yield delivery


def _due_at(state: WebhookStatus, delivery: WebhookDelivery, policy: RetryPolicy) -> datetime:
    due = parse_stamp(delivery.next_attempt_at)
    if delivery.event in INTERMEDIATE_EVENTS and state.last_intermediate_at is not None:
        due = max(due, parse_stamp(state.last_intermediate_at) + timedelta(seconds=policy.intermediate_spacing))
    return due


def due(state: WebhookStatus, now: datetime, policy: RetryPolicy) -> list[WebhookDelivery]:
    """The messages to send now, at most one per URL."""
    return [delivery for delivery in _heads(state) if _due_at(state, delivery, policy) <= now]


def next_due(state: WebhookStatus, policy: RetryPolicy) -> datetime | None:
    """When the next message falls due, or None when none waits."""
    times = [_due_at(state, delivery, policy) for delivery in _heads(state)]
    return min(times, default=None)


def delivered(state: WebhookStatus, delivery: WebhookDelivery, now: datetime) -> WebhookStatus:
    changes: dict[str, Any] = {
        "pending": [d for d in state.pending if d.id != delivery.id],
        "delivered": state.delivered + 1,
        "last_delivered": delivery.id,
    }
    if delivery.event in INTERMEDIATE_EVENTS:
        changes["last_intermediate_at"] = stamp(now)
    return state.model_copy(update=changes)


def attempt_failed(
    state: WebhookStatus,
    delivery: WebhookDelivery,
    now: datetime,
    error: str,
    policy: RetryPolicy,
    *,
    permanent: bool = False,
) -> WebhookStatus:
    """`delivery` failed now: retry it later, or give it up (refused address, or past the retry window)."""
    attempts = delivery.attempts + 1
    first = delivery.first_attempt_at or stamp(now)
    if permanent or (now - parse_stamp(first)).total_seconds() >= policy.window:
        return state.model_copy(
            update={
                "pending": [d for d in state.pending if d.id != delivery.id],
                "failed": state.failed + 1,
                "last_error": f"{delivery.event} message {delivery.id} given up after {attempts} attempts: {error}",
            }
        )
    retry = delivery.model_copy(
        update={
            "attempts": attempts,
            "first_attempt_at": first,
            "next_attempt_at": stamp(now + timedelta(seconds=policy.delay(attempts))),
            "last_error": error,
        }
    )
    return state.model_copy(
        update={
            "pending": [retry if d.id == delivery.id else d for d in state.pending],
            "last_error": f"{delivery.event} message {delivery.id}, attempt {attempts}: {error}",
        }
    )
