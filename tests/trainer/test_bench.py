"""The benchmark's LoRA step loop: the code `make bench-trainer` runs Llama-2-7B-shaped on a GPU, here tiny on the
CPU, so that it is known to run before a GPU is at hand. The FLOP count itself is checked against PyTorch's count of a
Llama-2-7B-shaped step (test_llama2_7b_shape.py)."""

from __future__ import annotations

import pytest

from finetune_trainer.bench import LLAMA2_7B_SHAPE, bench_lora_step_loop, lora_flops_per_token

pytestmark = pytest.mark.trainer

TINY_SHAPE = {**LLAMA2_7B_SHAPE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY_SHAPE.update(num_attention_heads=4, num_key_value_heads=4, vocab_size=256)


def test_lora_step_loop_runs_and_counts_flops_of_its_own_model() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        parameters = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**TINY_SHAPE)).parameters())
    result = bench_lora_step_loop(TINY_SHAPE, "cpu", steps=2, micro_batch=2, sequence=32)
    assert result["tokens_per_second_per_gpu"] > 0
    assert result["parameters"] == parameters
    assert result["flops_per_token"] == lora_flops_per_token(parameters, 2, 64, 32)
    assert result["mfu"] is None  # no peak figure for a CPU


@pytest.mark.cuda
def test_on_a_gpu_the_step_loop_reports_the_mfu_against_the_devices_peak() -> None:
    result = bench_lora_step_loop(TINY_SHAPE, "cuda", steps=2, micro_batch=2, sequence=32)
    assert result["tokens_per_second_per_gpu"] > 0
    assert result["peak_memory_gib"] > 0
    # A device the peak table knows (A40, A100, H100, ...) gets an MFU; another gets none rather than a guess.
    assert (result["mfu"] is None) == (result["peak_bf16_tflops"] is None)
    assert result["mfu"] is None or 0 < result["mfu"] < 1
