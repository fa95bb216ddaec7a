"""The benchmark's LoRA step loop: the code `make bench-trainer` runs Llama-2-7B-shaped on a GPU, here tiny on the
CPU, so that it is known to run before a GPU is at hand."""

from __future__ import annotations

import pytest

from finetune_trainer.bench import LLAMA2_7B_SHAPE, bench_lora_step_loop, lora_flops_per_token

pytestmark = pytest.mark.trainer

TINY_SHAPE = {**LLAMA2_7B_SHAPE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY_SHAPE.update(num_attention_heads=4, num_key_value_heads=4, vocab_size=256)


def test_lora_step_loop_runs_and_counts_flops_as_documented() -> None:
    result = bench_lora_step_loop(TINY_SHAPE, "cpu", steps=2, micro_batch=2, sequence=32)
    assert result["tokens_per_second_per_gpu"] > 0
    assert result["flops_per_token"] == 4 * result["parameters"] + 12 * 2 * 64 * 32
    assert result["mfu"] is None  # no peak figure for a CPU


def test_llama2_7b_flops_per_token_match_the_published_parameter_count() -> None:
    # Llama 2 7B: 6.74e9 parameters; at 2048 tokens, 4N + 12·L·d·T = 26.96e9 + 3.22e9 FLOPs per token.
    flops = lora_flops_per_token(6_738_415_616, 32, 4096, 2048)
    assert flops == 4 * 6_738_415_616 + 12 * 32 * 4096 * 2048
    assert 30.1e9 < flops < 30.3e9
