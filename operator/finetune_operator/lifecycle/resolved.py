"""status.resolved: the batch plan for the job's world size, and the data sizes the validation pod reported.

The plan is known from the spec and shown from the first write. The data sizes are taken once the validation Job
is Complete, not as soon as its pod has reported them: they then arrive with the write that marks the data
valid, not in a write of their own a moment before it.
"""

from __future__ import annotations

from finetune_contract.batching import plan_batches
from finetune_contract.protocol import ValidatedEvent
from finetune_operator.api.spec import FineTuneJobSpec
from finetune_operator.api.status import Resolved
from finetune_operator.lifecycle.observation import Notice, Observation
from finetune_operator.lifecycle.observed import job_condition, termination_event


def resolve_status(spec: FineTuneJobSpec, obs: Observation) -> Resolved:
    resources = spec.resources
    plan = plan_batches(
        spec.input.train_batch_size, spec.input.micro_batch_size, resources.nodes * resources.processes_per_node
    )
    resolved = Resolved(
        world_size=plan.world_size,
        per_device_batch_size=plan.per_device_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        effective_batch_size=plan.effective_batch_size,
    )
    complete = obs.validation_job is not None and job_condition(obs.validation_job, "Complete")
    validated = termination_event(obs.validation_pods) if complete else None
    if isinstance(validated, ValidatedEvent):
        data = validated.resolved
        steps = data.steps_per_epoch
        if steps is None and data.train_rows is not None:
            steps = plan.steps_per_epoch(data.train_rows)
        resolved = resolved.model_copy(
            update={
                "train_rows": data.train_rows,
                "validation_rows": data.validation_rows,
                "train_tokens": data.train_tokens,
                "steps_per_epoch": steps,
            }
        )
    previous = obs.status.resolved
    if previous is not None:
        # The validation pod is removed with its Job: keep the data sizes it reported once.
        kept = previous.model_dump(by_alias=False, exclude_none=True)
        resolved = resolved.model_copy(update={k: v for k, v in kept.items() if getattr(resolved, k) is None})
    return resolved


def batch_notices(spec: FineTuneJobSpec, resolved: Resolved) -> list[Notice]:
    """A Warning when the global batch does not split evenly over the GPUs."""
    asked = spec.input.train_batch_size
    if resolved.effective_batch_size == asked:
        return []
    return [
        Notice(
            "Warning",
            "BatchSizeRounded",
            f"train_batch_size {asked} does not split evenly over {resolved.world_size} GPUs: "
            f"training uses {resolved.per_device_batch_size} per GPU x {resolved.world_size} GPUs x "
            f"{resolved.gradient_accumulation_steps} accumulation steps = {resolved.effective_batch_size}",
        )
    ]
