"""The benchmark: its FLOPs count, and the code `make bench-gpu` runs Llama-2-7B-shaped on a GPU, here tiny on the
CPU, so that it is known to run before a GPU is at hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_trainer.bench import LLAMA2_7B, flops, flops_per_token, main

pytestmark = pytest.mark.trainer


def test_llama2_7b_flops_per_token_count_linear_layers_adapters_and_attention() -> None:
    # Llama 2 7B: 6.74e9 parameters, of which the embedding (32000 x 4096) is a lookup and the LM head a matmul.
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32000 * 4096
    assert LLAMA2_7B.parameters == 6_738_415_616
    assert LLAMA2_7B.linear_parameters == linear == LLAMA2_7B.parameters - 32000 * 4096 - 65 * 4096
    lora = 32 * 8 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # rank 8 on q, k, v, o, gate, up, down: ~20M
    assert flops_per_token(LLAMA2_7B, 2048) == 4 * linear + 6 * lora + 12 * 32 * 4096 * 2048


def test_attention_flops_follow_the_documents_not_the_row() -> None:
    # Four documents of 512 tokens in a 2048-token row attend over 512 tokens each: T_eff = 512, not 2048.
    tokens = 2048
    packed, _ = flops(LLAMA2_7B, tokens, 4 * 512**2, checkpointed_layers=0)
    assert packed == tokens * flops_per_token(LLAMA2_7B, 512)
    # Recomputing every layer's forward adds about half (LoRA's backward skips the frozen weights' gradients):
    # what HFU counts beyond MFU.
    model, hardware = flops(LLAMA2_7B, tokens, 4 * 512**2, checkpointed_layers=32)
    assert 1.45 < hardware / model < 1.5


def test_gpu_benchmark_code_runs_tiny_on_the_cpu_and_writes_json(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    main(["--device", "cpu", "--tiny", "--validate-mb", "--output", str(output)])
    report = json.loads(output.read_text())
    results = {result["configuration"]: result for result in report["throughput"]["configurations"]}
    assert not {"packed, varlen", "packed, flex_attention"} & set(results)  # they train on CUDA only
    assert {"unpacked", "packed, sdpa (dense block mask)", "packed, eager", "wrapped, sdpa"} <= set(results)
    for result in results.values():
        assert result["real_tokens"] > 0
        assert result["real_tokens_per_second"] > 0
        assert result["mfu"] is None  # no peak figure for a CPU
    assert results["unpacked"]["vs_unpacked"] == 1.0
    assert results["packed, checkpointing all"]["checkpointed_layers"] == 2
    # Every configuration trains on the same real tokens' documents, packed or not.
    assert results["packed, sdpa (dense block mask)"]["t_eff"] < report["throughput"]["setup"]["chunk_size"]
