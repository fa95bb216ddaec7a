"""`make bench-trainer`: what packing buys, measured on one mixed-length data set in one run.

Prints the share of real (non-pad) tokens among the tokens processed, and real tokens per second, with and without
packing, on the tiny Llama (CPU or GPU). With a GPU it also runs a Llama-2-7B-shaped (random weights) LoRA step
loop and prints tokens/s per GPU and MFU, counting LoRA training FLOPs per token as 4N + 12·L·d·T (forward 2N and
the backward's activation gradients 2N over the frozen base's N parameters, plus attention scores and values
forward and backward, 12·L·d·T for sequence length T; the adapters' own FLOPs are negligible and activation
recomputation is not counted, as usual for MFU).
"""

from __future__ import annotations

import io
import json
import random
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from finetune_contract.inputs import TrainingInput
from finetune_trainer.data import Split

WORDS = ("the", "model", "learns", "to", "pack", "tokens", "into", "long", "short", "rows", "of", "data", "fast")
# Dense bf16 tensor-core peaks (no sparsity), by device name: what MFU divides by.
PEAK_BF16_TFLOPS = {"A40": 149.7, "A100": 312.0, "H100": 989.4, "H200": 989.4, "L40S": 362.1, "A10": 125.0}


def mixed_length_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Text rows with a long tail of lengths, like real instruction data: most short, a few near the chunk."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = min(int(rng.lognormvariate(3.6, 0.8)), 400)
        rows.append({"text": " ".join(rng.choice(WORDS) for _ in range(max(words, 3)))})
    return rows


def _run(
    model_dir: Path, rows: list[dict[str, str]], inputs: TrainingInput, steps: int, workdir: Path
) -> dict[str, float]:
    from finetune_trainer.model import load_base_model, load_tokenizer
    from finetune_trainer.train import build_trainer

    trainer = build_trainer(
        inputs,
        Split("text", rows, []),
        load_base_model(model_dir, inputs, 0),
        load_tokenizer(model_dir),
        output_dir=workdir,
        callbacks=[],
    )
    trainer.args.max_steps = steps
    trainer.args.save_strategy = "no"
    real = processed = 0
    for index, batch in enumerate(trainer.get_train_dataloader()):
        if index >= steps * trainer.args.gradient_accumulation_steps:
            break
        processed += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    started = time.perf_counter()
    with redirect_stdout(io.StringIO()):
        trainer.train()
    elapsed = time.perf_counter() - started
    tokens = next(entry["num_tokens"] for entry in reversed(trainer.state.log_history) if "num_tokens" in entry)
    return {"real_token_share": real / processed, "real_tokens_per_second": tokens / elapsed, "seconds": elapsed}


def bench_packing(rows: int = 160, chunk_size: int = 512, steps: int = 8) -> dict[str, Any]:
    from finetune_trainer.tiny_model import save_tiny_llama

    data = mixed_length_rows(rows)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model_dir = save_tiny_llama(root / "model", [row["text"] for row in data], hidden_size=64, layers=2)
        base = {
            "train_data": "bench.jsonl",
            "train_batch_size": 8,
            "micro_batch_size": 8,
            "chunk_size": chunk_size,
            "learning_rate": 1e-3,
            "num_train_epochs": 1,
        }
        results: dict[str, Any] = {}
        for name, extra in (
            ("unpacked", {}),
            ("packed", {"pack_sequences": True}),
            ("wrapped", {"pack_sequences": True, "wrap_packed_sequences": True}),
        ):
            inputs = TrainingInput.model_validate({**base, **extra})
            results[name] = _run(model_dir, data, inputs, steps, root / name)
    results["speedup_packed_vs_unpacked"] = (
        results["packed"]["real_tokens_per_second"] / results["unpacked"]["real_tokens_per_second"]
    )
    return results


LLAMA2_7B_SHAPE: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}


def lora_flops_per_token(parameters: int, layers: int, width: int, sequence: int) -> int:
    """LoRA training FLOPs per token: 4N for the frozen base (see the module docstring) + 12·L·d·T attention."""
    return 4 * parameters + 12 * layers * width * sequence


def bench_lora_step_loop(
    shape: dict[str, Any], device: str, steps: int = 10, micro_batch: int = 4, sequence: int = 2048
) -> dict[str, Any]:
    """LoRA (rank 8, all linear layers) steps on a random Llama of `shape`, bf16, activation checkpointing on.

    `make bench-trainer` runs it Llama-2-7B-shaped on a GPU; the tests run the same loop tiny on the CPU.
    """
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_trainer.model import lora_config

    config = LlamaConfig(**shape)

    def synchronize() -> None:  # GPU kernels run asynchronously: wait for them before reading the clock
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    torch.set_default_dtype(torch.bfloat16)  # build the weights (13 GB at 7B) in bf16 directly on the device
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    frozen = sum(parameter.numel() for parameter in model.parameters())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[no-untyped-call]
    model.enable_input_require_grads()  # type: ignore[no-untyped-call]
    model = get_peft_model(model, lora_config(TrainingInput(train_data="bench.jsonl")))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (micro_batch, sequence), device=device)
    warmup = 3
    for step in range(steps + warmup):
        if step == warmup:
            synchronize()
            started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize()
    elapsed = time.perf_counter() - started
    tokens_per_second = steps * micro_batch * sequence / elapsed
    flops_per_token = lora_flops_per_token(frozen, config.num_hidden_layers, config.hidden_size, sequence)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else device
    peak = next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)
    return {
        "device": name,
        "parameters": frozen,
        "tokens_per_second_per_gpu": tokens_per_second,
        "flops_per_token": flops_per_token,
        "peak_bf16_tflops": peak,
        "mfu": tokens_per_second * flops_per_token / (peak * 1e12) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
    }


def main() -> None:
    import torch

    packing = bench_packing()
    print("packing on one mixed-length data set (tiny Llama, %s):" % ("GPU" if torch.cuda.is_available() else "CPU"))
    for name in ("unpacked", "packed", "wrapped"):
        result = packing[name]
        print(
            f"  {name:9s} real-token share {result['real_token_share']:6.1%}   "
            f"real tokens/s {result['real_tokens_per_second']:9.0f}"
        )
    print(f"  packed vs unpacked: {packing['speedup_packed_vs_unpacked']:.2f}x real tokens/s")
    report: dict[str, Any] = {"packing": packing}
    if torch.cuda.is_available():
        lora = bench_lora_step_loop(LLAMA2_7B_SHAPE, "cuda")
        report["llama2_7b_lora"] = lora
        mfu = f"{lora['mfu']:.1%}" if lora["mfu"] is not None else "unknown (no peak figure for this device)"
        print(
            f"Llama-2-7B-shaped LoRA on {lora['device']}: {lora['tokens_per_second_per_gpu']:.0f} tokens/s per GPU, "
            f"MFU {mfu} (peak {lora['peak_bf16_tflops']} TFLOPS bf16 dense)"
        )
    else:
        print("no GPU here: the Llama-2-7B-shaped LoRA step loop (tokens/s per GPU, MFU) runs only with one")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
