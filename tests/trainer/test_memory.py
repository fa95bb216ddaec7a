"""The memory plan: activation checkpointing only where the device's memory needs it, or as the operator forces."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_contract.trainer_config import ActivationCheckpointing
from finetune_trainer.bench import LLAMA2_7B
from finetune_trainer.memory import plan_checkpointing

pytestmark = pytest.mark.trainer

A40 = 46068 * 2**20  # what torch reports for an A40's 48 GB


def test_llama2_7b_on_an_a40_checkpoints_only_when_the_activations_do_not_fit() -> None:
    one = plan_checkpointing(LLAMA2_7B, device_bytes=A40, micro_batch=1, chunk_size=2048, quantized=False, lora_rank=8)
    four = plan_checkpointing(LLAMA2_7B, device_bytes=A40, micro_batch=4, chunk_size=2048, quantized=False, lora_rank=8)
    # One 2048-token sequence per GPU (the defaults on 8 GPUs) keeps every activation: no recomputation.
    assert not one.enabled
    assert one.estimated_bytes <= one.budget_bytes
    # Four of them would hold ~68 GB of activations: every layer recomputes.
    assert four.every_n_layers == 1
    assert four.checkpointed_layers == 32
    assert four.estimated_bytes <= four.budget_bytes
    # In between, only some layers are checkpointed.
    two = plan_checkpointing(LLAMA2_7B, device_bytes=A40, micro_batch=2, chunk_size=2048, quantized=False, lora_rank=8)
    assert 0 < two.checkpointed_layers < 32
    assert "every" in two.describe()


def test_qlora_frees_memory_for_activations() -> None:
    lora = plan_checkpointing(LLAMA2_7B, device_bytes=A40, micro_batch=2, chunk_size=2048, quantized=False, lora_rank=8)
    qlora = plan_checkpointing(LLAMA2_7B, device_bytes=A40, micro_batch=2, chunk_size=2048, quantized=True, lora_rank=8)
    assert qlora.checkpointed_layers < lora.checkpointed_layers


@pytest.mark.parametrize(("choice", "every_n_layers", "checkpointed"), [("off", None, 0), ("all", 1, 32), (3, 3, 11)])
def test_the_operator_setting_forces_the_plan(
    choice: ActivationCheckpointing, every_n_layers: int | None, checkpointed: int
) -> None:
    plan = plan_checkpointing(
        LLAMA2_7B, device_bytes=A40, micro_batch=1, chunk_size=2048, quantized=False, lora_rank=8, choice=choice
    )
    assert (plan.every_n_layers, plan.checkpointed_layers, plan.forced) == (every_n_layers, checkpointed, True)
    assert "forced by the operator's setting" in plan.describe()


def test_the_trainer_checkpoints_the_layers_the_plan_names(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers.modeling_layers import GradientCheckpointingLayer

    from conftest import build_tiny_trainer, learnable_rows
    from finetune_trainer.memory import ModelShape
    from finetune_trainer.model import read_model_config

    shape = ModelShape.of(read_model_config(tiny_model_dir))
    assert shape.layers == 2
    plan = plan_checkpointing(
        shape, device_bytes=2**34, micro_batch=4, chunk_size=64, quantized=False, lora_rank=8, choice=2
    )
    trainer = build_tiny_trainer(tiny_model_dir, tmp_path, learnable_rows(8), checkpointing=plan)
    trainer.args.max_steps = 1
    trainer.train()
    layers = [module for module in trainer.model.modules() if isinstance(module, GradientCheckpointingLayer)]
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
