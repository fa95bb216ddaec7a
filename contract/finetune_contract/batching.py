"""The batch plan: how Replicate's global `train_batch_size` maps onto W data-parallel devices.

`train_batch_size` is the global batch. With world size W, each device takes
`m = min(micro_batch_size, ceil(train_batch_size / W))` examples per forward pass and gradients are accumulated
over `a = ceil(train_batch_size / (m * W))` passes, so the effective global batch is `m * W * a`: never smaller
than asked for, and equal to it whenever W divides it evenly. Operator (status.resolved) and trainer share this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    per_device_batch_size: int
    gradient_accumulation_steps: int

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_batch_size * self.world_size * self.gradient_accumulation_steps

    def steps_per_epoch(self, train_rows: int) -> int:
        """Optimizer steps in one epoch over `train_rows` examples (each rank sees ceil(rows / W) of them)."""
        batches_per_rank = math.ceil(math.ceil(train_rows / self.world_size) / self.per_device_batch_size)
        return max(1, math.ceil(batches_per_rank / self.gradient_accumulation_steps))


def plan_batches(train_batch_size: int, micro_batch_size: int, world_size: int) -> BatchPlan:
    if min(train_batch_size, micro_batch_size, world_size) < 1:
        raise ValueError("train_batch_size, micro_batch_size and world_size must all be at least 1")
    per_device = min(micro_batch_size, math.ceil(train_batch_size / world_size))
    accumulation = math.ceil(train_batch_size / (per_device * world_size))
    return BatchPlan(world_size, per_device, accumulation)
