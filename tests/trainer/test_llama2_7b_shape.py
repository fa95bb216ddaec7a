"""Figures about Llama 2 7B that the README and the benchmark give, checked on a model of its shape on PyTorch's
meta device (shapes only: no memory, no weights): its parameter count, the adapter's size at rank 8, and the
training FLOPs per token the benchmark's MFU divides by."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_trainer.bench import LLAMA2_7B, LORA_RANK, flops_per_token, llama_config

pytestmark = pytest.mark.trainer

PUBLISHED_PARAMETERS = 6_738_415_616  # Llama-2-7b-hf, as published
SEQUENCE = 2048


@pytest.fixture(scope="module")
def llama2_7b_with_lora() -> Any:
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_contract.inputs import TrainingInput
    from finetune_trainer.model import lora_config

    with torch.device("meta"):
        base = LlamaForCausalLM(LlamaConfig(**llama_config(LLAMA2_7B)))
    assert sum(parameter.numel() for parameter in base.parameters()) == LLAMA2_7B.parameters == PUBLISHED_PARAMETERS
    return get_peft_model(base, lora_config(TrainingInput(train_data="train.jsonl")))  # Replicate's default rank 8


def test_lora_at_rank_8_on_every_linear_layer_trains_20m_parameters_of_llama_2_7b(llama2_7b_with_lora: Any) -> None:
    trainable, total = llama2_7b_with_lora.get_nb_trainable_parameters()
    # 32 layers x rank 8 x (4 attention projections of 4096+4096, 3 MLP ones of 4096+11008)
    assert trainable == LLAMA2_7B.lora_parameters(LORA_RANK) == 19_988_480  # "~20M"
    assert total - trainable == PUBLISHED_PARAMETERS
    assert round(trainable / PUBLISHED_PARAMETERS, 3) == 0.003  # "0.3%"


def test_the_benchmarks_flops_per_token_match_a_count_of_a_llama_2_7b_training_step(llama2_7b_with_lora: Any) -> None:
    """4·N_lin + 6·N_lora + 12·L·d·T (bench.py) against the FLOPs PyTorch counts in one forward and backward of the
    model of Llama-2-7B's shape at T = 2048, without activation checkpointing."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.zeros((1, SEQUENCE), dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        llama2_7b_with_lora(input_ids=ids, labels=ids).loss.backward()
    counted = counter.get_total_flops() / SEQUENCE
    # Exact but for one thing the formula leaves in (0.3%): the first layer's q, k and v projections read the frozen
    # embedding, so no gradient flows to their input, through the base weights or the LoRA A matrices.
    first_layer_qkv = 3 * (LLAMA2_7B.hidden * LLAMA2_7B.hidden + LLAMA2_7B.hidden * LORA_RANK)
    assert flops_per_token(LLAMA2_7B, SEQUENCE) - counted == 2 * first_layer_qkv
