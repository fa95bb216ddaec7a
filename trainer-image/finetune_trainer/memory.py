"""The memory plan: which decoder layers recompute their activations in the backward pass.

Recomputing a layer (activation checkpointing) costs its forward again: under LoRA, whose backward skips the frozen
weights' gradients, half as much work again. So the trainer checkpoints only as many layers as the device's memory
needs: none, every n-th layer, or all. The estimate counts, per device: the frozen weights, the adapters with their
gradients and Adam states, the logits and loss for one micro batch, and the activations each layer keeps for the
backward pass (all of them for a layer that is not checkpointed, only its input for one that is, plus one layer's
worth while it is recomputed).

Activations kept by one Llama decoder layer, per token, in bf16 (2 bytes) unless said: the normalised inputs and
residuals (4h), q, k, v and the attention output (4h), the MLP's gate, up, SiLU and product (4i), each LoRA module's
input after dropout and the dropout mask (3 bytes per input feature: 6h + i over q, k, v, o, gate, up, down):
34h + 11i bytes. At Llama 2 7B's h = 4096, i = 11008 that is 254 KiB per token per layer; 8192 tokens (micro batch 4
at chunk_size 2048) over 32 layers would be 68 GB, more than an A40 has, while one micro batch of 2048 tokens
without any checkpointing fits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from finetune_contract.trainer_config import ActivationCheckpointing
from finetune_trainer.model import LLAMA_TARGET_MODULES

# Held back from the device's memory: the CUDA context, cuBLAS/NCCL workspaces, allocator fragmentation.
RESERVED_FRACTION = 0.10
RESERVED_BYTES = 2 << 30
ADAPTER_BYTES_PER_PARAMETER = 16  # fp32 weight, gradient and two Adam moments
LOGIT_BYTES_PER_VOCAB_ENTRY = 10  # bf16 logits, their fp32 copy for the loss, and its fp32 gradient
NF4_BYTES_PER_PARAMETER = 0.5 + 1 / 64 * 1.1  # 4-bit weights and (double-quantised) block scales


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    context: int  # max_position_embeddings

    @classmethod
    def of(cls, config: dict[str, Any]) -> ModelShape:
        """From a Llama checkpoint's config.json."""
        heads = int(config["num_attention_heads"])
        return cls(
            layers=int(config["num_hidden_layers"]),
            hidden=int(config["hidden_size"]),
            intermediate=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            context=int(config["max_position_embeddings"]),
        )

    @property
    def kv_width(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    @property
    def layer_linear_parameters(self) -> int:
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_width
        return attention + 3 * self.hidden * self.intermediate

    @property
    def linear_parameters(self) -> int:
        """Every matmul weight: the decoder layers' projections and the LM head (not the embedding, a lookup)."""
        return self.layers * self.layer_linear_parameters + self.vocab * self.hidden

    @property
    def parameters(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.linear_parameters + self.vocab * self.hidden + norms

    def lora_parameters(self, rank: int) -> int:
        """LoRA A and B of every targeted module: rank x (in + out) each."""
        h, kv, i = self.hidden, self.kv_width, self.intermediate
        shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h)}
        shapes |= {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        return self.layers * sum(rank * sum(shapes[name]) for name in LLAMA_TARGET_MODULES)

    @property
    def activation_bytes_per_token_per_layer(self) -> int:
        return 34 * self.hidden + 11 * self.intermediate


@dataclass(frozen=True)
class CheckpointingPlan:
    every_n_layers: int | None  # None: no checkpointing; 1: every layer
    checkpointed_layers: int
    estimated_bytes: int
    budget_bytes: int
    forced: bool

    @property
    def enabled(self) -> bool:
        return self.every_n_layers is not None

    def sft_config(self) -> dict[str, Any]:
        """SFTConfig's arguments for this plan."""
        if self.every_n_layers is None:
            return {"activation_checkpointing": False}
        return {
            "activation_checkpointing": True,
            "activation_checkpointing_kwargs": {"use_reentrant": False, "every_n_layers": self.every_n_layers},
        }

    def describe(self) -> str:
        if self.every_n_layers is None:
            what = "activation checkpointing off"
        elif self.every_n_layers == 1:
            what = "activation checkpointing on every layer"
        else:
            what = (
                f"activation checkpointing on every {self.every_n_layers}th layer ({self.checkpointed_layers} layers)"
            )
        why = "forced by the operator's setting" if self.forced else "chosen from the memory estimate"
        return (
            f"{what}, {why}: about {self.estimated_bytes / 2**30:.1f} GiB of "
            f"{self.budget_bytes / 2**30:.1f} GiB usable per device"
        )


def _checkpointed(layers: int, every_n_layers: int | None) -> int:
    return 0 if every_n_layers is None else -(-layers // every_n_layers)


def estimate_bytes(
    shape: ModelShape, *, tokens: int, every_n_layers: int | None, quantized: bool, lora_rank: int
) -> int:
    """Peak device memory of one training step with `tokens` tokens per micro batch (see the module docstring)."""
    frozen_linear = shape.layers * shape.layer_linear_parameters
    embeddings = 2 * shape.vocab * shape.hidden  # the embedding and the LM head stay bf16 under QLoRA too
    weights = int(frozen_linear * NF4_BYTES_PER_PARAMETER) + 2 * embeddings if quantized else 2 * shape.parameters
    adapters = shape.lora_parameters(lora_rank) * ADAPTER_BYTES_PER_PARAMETER
    logits = tokens * shape.vocab * LOGIT_BYTES_PER_VOCAB_ENTRY
    per_layer = tokens * shape.activation_bytes_per_token_per_layer
    checkpointed = _checkpointed(shape.layers, every_n_layers)
    activations = (shape.layers - checkpointed) * per_layer + checkpointed * tokens * 2 * shape.hidden
    recompute = per_layer if checkpointed else 0
    return weights + adapters + logits + activations + recompute


def device_memory_bytes(device: str) -> int:
    """Memory of a device ("cuda:N"), or the host's RAM for "cpu"."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def usable_bytes(device_bytes: int) -> int:
    return int(device_bytes * (1 - RESERVED_FRACTION)) - RESERVED_BYTES


def plan_checkpointing(
    shape: ModelShape,
    *,
    device_bytes: int,
    micro_batch: int,
    chunk_size: int,
    quantized: bool,
    lora_rank: int,
    choice: ActivationCheckpointing = "auto",
) -> CheckpointingPlan:
    """The fewest checkpointed layers whose estimate fits the device; every layer when none does."""
    budget = usable_bytes(device_bytes)
    tokens = micro_batch * chunk_size

    def plan(every_n_layers: int | None, forced: bool) -> CheckpointingPlan:
        estimate = estimate_bytes(
            shape, tokens=tokens, every_n_layers=every_n_layers, quantized=quantized, lora_rank=lora_rank
        )
        return CheckpointingPlan(
            every_n_layers, _checkpointed(shape.layers, every_n_layers), estimate, budget, forced=forced
        )

    if choice == "off":
        return plan(None, forced=True)
    if choice == "all":
        return plan(1, forced=True)
    if isinstance(choice, int):
        return plan(choice, forced=True)
    # From no checkpointing through every layer: n = layers checkpoints one layer, n = 1 all of them.
    for every_n_layers in (None, *range(shape.layers, 0, -1)):
        candidate = plan(every_n_layers, forced=False)
        if candidate.estimated_bytes <= budget:
            return candidate
    return plan(1, forced=False)


# For a trainer built without a plan (the tests' and the benchmark's small runs): every layer keeps its activations.
NO_CHECKPOINTING = CheckpointingPlan(None, 0, 0, 0, forced=True)
