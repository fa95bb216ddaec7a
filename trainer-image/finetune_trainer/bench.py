"""`make bench-trainer` (CPU) and `make bench-gpu`: what packing, the attention implementations and the memory plan
buy, measured through the trainer itself (`build_trainer`, TRL's collator and packing, PEFT) in one run.

Every configuration trains the same LoRA adapter on the same rows of one mixed-length data set (a long tail of
lengths, like real instruction data), on a random Llama built in memory (no download), starting from the same
weights, for two epochs of which the second is timed: every configuration sees the same real tokens (unpacked rows
lose what lies past chunk_size; the tokens counted are the ones trained on). Model and data set-up, and the first
epoch (kernel selection for each batch shape, flex attention's compilation), are not timed. On the CPU the time is
the process's CPU time, since the machine may be shared; on a GPU it is wall-clock time.

FLOPs per real token: 4·N_lin + 6·N_lora + 12·L·d·T_eff. N_lin counts the matmul weights of the decoder layers and
the LM head (not the embedding, a lookup); the frozen base costs its forward (2N) and the backward's activation
gradients (2N), the adapters also their weight gradients (6N); attention scores and values cost 12·L·d·T per token
forward and backward, with T_eff = Σℓ²/Σℓ over the documents of a row, since a document attends only to itself.
MFU divides these by the device's dense bf16 peak; HFU adds the forward that activation checkpointing recomputes.
Real tokens per second are compared with the first configuration, unpacked rows under `sdpa`.

`--tiny` runs the GPU benchmark's code on a small model on any device (the tests use it on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune_contract.inputs import TrainingInput
from finetune_contract.trainer_config import ActivationCheckpointing
from finetune_trainer.attention import VARLEN
from finetune_trainer.memory import ModelShape, device_memory_bytes, plan_checkpointing

WORDS = ("the", "model", "learns", "to", "pack", "tokens", "into", "long", "short", "rows", "of", "data", "fast")
# Dense bf16 tensor-core peaks (no sparsity), by device name: what MFU divides by.
PEAK_BF16_TFLOPS = {"A40": 149.7, "A100": 312.0, "H100": 989.4, "H200": 989.4, "L40S": 362.1, "A10": 125.0}
LORA_RANK = 8
# Attention implementations that cannot train on the CPU: torch's varlen kernels are CUDA's, and flex attention has
# no backward on the CPU (its forward is tested there against each document alone).
CUDA_ONLY = frozenset((VARLEN, "flex_attention"))
# And one that cannot run on a GPU at 7B: eager attention keeps the whole packed row's attention matrix per head and
# layer for the backward pass (8192² fp32 entries each at micro batch 4 and chunk_size 2048).
CPU_ONLY = frozenset(("eager",))


def llama_config(shape: ModelShape) -> dict[str, Any]:
    return {
        "num_hidden_layers": shape.layers,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "vocab_size": shape.vocab,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "max_position_embeddings": shape.context,
    }


LLAMA2_7B = ModelShape(layers=32, hidden=4096, intermediate=11008, vocab=32000, heads=32, kv_heads=32, context=4096)
# Large enough on two CPU cores that a step's matmuls, not its overhead, take the time.
CPU_MODEL = ModelShape(layers=4, hidden=256, intermediate=688, vocab=1024, heads=4, kv_heads=4, context=4096)
TINY_MODEL = ModelShape(layers=2, hidden=64, intermediate=128, vocab=512, heads=4, kv_heads=4, context=4096)


@dataclass(frozen=True)
class Setup:
    """One benchmark: a model shape, a data set and the batch shape, the same for every configuration."""

    shape: ModelShape
    rows: int
    median_words: float
    chunk_size: int
    micro_batch: int


CPU_SETUP = Setup(CPU_MODEL, rows=160, median_words=40, chunk_size=256, micro_batch=8)
GPU_SETUP = Setup(LLAMA2_7B, rows=300, median_words=300, chunk_size=2048, micro_batch=4)
TINY_SETUP = Setup(TINY_MODEL, rows=32, median_words=12, chunk_size=64, micro_batch=4)


@dataclass(frozen=True)
class Configuration:
    name: str
    attention: str
    pack: bool = False
    wrap: bool = False
    checkpointing: ActivationCheckpointing = "off"


CONFIGURATIONS = (
    Configuration("unpacked", "sdpa"),
    Configuration("packed, sdpa (dense block mask)", "sdpa", pack=True),
    Configuration("packed, eager", "eager", pack=True),
    Configuration("packed, flex_attention", "flex_attention", pack=True),
    Configuration("packed, varlen", VARLEN, pack=True),
    Configuration("wrapped, sdpa", "sdpa", pack=True, wrap=True),
    Configuration("packed, memory plan", "best", pack=True, checkpointing="auto"),
    Configuration("packed, checkpointing all", "best", pack=True, checkpointing="all"),
)


def lora_parameters_per_layer(shape: ModelShape) -> int:
    return shape.lora_parameters(LORA_RANK) // shape.layers


def flops(shape: ModelShape, tokens: int, squared_lengths: int, checkpointed_layers: int) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of training on `tokens` tokens whose documents' squared lengths sum to
    `squared_lengths` (so T_eff = squared_lengths / tokens); see the module docstring."""
    linear = shape.linear_parameters
    lora = shape.lora_parameters(LORA_RANK)
    attention = 12 * shape.layers * shape.hidden * squared_lengths
    model = tokens * (4 * linear + 6 * lora) + attention
    layer_forward = tokens * (2 * shape.layer_linear_parameters + 2 * lora_parameters_per_layer(shape))
    recomputed = checkpointed_layers * (layer_forward + 4 * shape.hidden * squared_lengths)
    return float(model), float(model + recomputed)


def flops_per_token(shape: ModelShape, sequence: float) -> float:
    """4·N_lin + 6·N_lora + 12·L·d·T for documents of length `sequence`."""
    return (
        4 * shape.linear_parameters + 6 * shape.lora_parameters(LORA_RANK) + 12 * shape.layers * shape.hidden * sequence
    )


def mixed_length_rows(count: int, median_words: float, seed: int = 0) -> list[dict[str, str]]:
    """Text rows with a long tail of lengths: most short, a few longer than the chunk."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = max(3, int(rng.lognormvariate(0, 0.8) * median_words))
        rows.append({"text": " ".join(rng.choice(WORDS) for _ in range(words))})
    return rows


@dataclass
class _Tally:
    """Real tokens and squared document lengths of each micro batch, with the time it started."""

    starts: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    squared: list[int] = field(default_factory=list)


def _document_lengths(inputs: dict[str, Any]) -> list[int]:
    if "cu_seq_lens_q" in inputs:
        lengths: list[int] = inputs["cu_seq_lens_q"].diff().tolist()
        return lengths
    return [int(length) for length in inputs["attention_mask"].sum(dim=-1).tolist()]


def _count_batches(trainer: Any, tally: _Tally, synchronize: Callable[[], None], clock: Callable[[], float]) -> None:
    compute_loss = trainer.compute_loss

    def counted(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        synchronize()
        lengths = _document_lengths(inputs)
        tally.starts.append(clock())
        tally.tokens.append(sum(lengths))
        tally.squared.append(sum(length * length for length in lengths))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = counted


def _clock(device: str) -> Callable[[], float]:
    """Wall time on a GPU; on the CPU, this process's CPU time, which other work on a shared machine leaves alone."""
    return time.perf_counter if device.startswith("cuda") else time.process_time


def _synchronizer(device: str) -> Callable[[], None]:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def _random_llama(shape: ModelShape, device: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)  # 7B weights are built in bf16 directly
    try:
        with torch.device(device):
            return LlamaForCausalLM(LlamaConfig(**llama_config(shape), initializer_range=0.02))
    finally:
        torch.set_default_dtype(torch.float32)


def _train_one(
    setup: Setup,
    configuration: Configuration,
    *,
    attention: str,
    base: Any,
    tokenizer: Any,
    rows: list[Any],
    device: str,
) -> dict[str, Any]:
    from datasets import Dataset

    from finetune_trainer.train import build_trainer

    inputs = TrainingInput.model_validate(
        {
            "train_data": "bench.jsonl",
            "train_batch_size": setup.micro_batch,
            "micro_batch_size": setup.micro_batch,
            "chunk_size": setup.chunk_size,
            "learning_rate": 1e-4,
            "num_train_epochs": 1,
            "lora_rank": LORA_RANK,
            "lora_dropout": 0.0,
            "pack_sequences": configuration.pack,
            "wrap_packed_sequences": configuration.wrap,
        }
    )
    device_bytes = device_memory_bytes(device)
    plan = plan_checkpointing(
        setup.shape,
        device_bytes=device_bytes,
        micro_batch=setup.micro_batch,
        chunk_size=setup.chunk_size,
        quantized=False,
        lora_rank=LORA_RANK,
        choice=configuration.checkpointing,
    )
    base.set_attn_implementation(attention)
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        trainer = build_trainer(
            inputs,
            Dataset.from_list(rows),
            None,
            base,
            tokenizer,
            output_dir=Path(scratch),
            callbacks=[],
            checkpointing=plan,
        )
        trainer.args.save_strategy = "no"
        trainer.train()  # the untimed epoch
        tally = _Tally()
        synchronize = _synchronizer(device)
        clock = _clock(device)
        _count_batches(trainer, tally, synchronize, clock)
        trainer.train()
        synchronize()
        ended = clock()
        trainer.model.unload()  # the base model again, without this configuration's adapter
        base.activation_checkpointing_disable()
    seconds = ended - tally.starts[0]
    tokens, squared = sum(tally.tokens), sum(tally.squared)
    model_flops, hardware_flops = flops(setup.shape, tokens, squared, plan.checkpointed_layers)
    peak = _peak_tflops(device)
    return {
        "configuration": configuration.name,
        "attention": attention,
        "checkpointed_layers": plan.checkpointed_layers,
        "steps": len(tally.tokens),
        "real_tokens": tokens,
        "t_eff": squared / tokens,
        "seconds": seconds,
        "real_tokens_per_second": tokens / seconds,
        "model_tflops_per_second": model_flops / seconds / 1e12,
        "mfu": model_flops / seconds / (peak * 1e12) if peak else None,
        "hfu": hardware_flops / seconds / (peak * 1e12) if peak else None,
    }


def _device_name(device: str) -> str:
    import torch

    return str(torch.cuda.get_device_name(device)) if device.startswith("cuda") else "cpu"


def _peak_tflops(device: str) -> float | None:
    name = _device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def bench_throughput(setup: Setup, device: str) -> dict[str, Any]:
    """Every configuration that runs on `device`, on one random model and one data set."""
    from finetune_trainer.attention import register
    from finetune_trainer.model import load_tokenizer
    from finetune_trainer.tiny_model import train_tokenizer

    register()
    cuda = device.startswith("cuda")
    rows = mixed_length_rows(setup.rows, setup.median_words)
    with tempfile.TemporaryDirectory(prefix="bench-tokenizer-") as scratch:
        train_tokenizer([row["text"] for row in rows], min(setup.shape.vocab, 512)).save_pretrained(scratch)
        tokenizer = load_tokenizer(Path(scratch))
    base = _random_llama(setup.shape, device)
    best = VARLEN if cuda else "sdpa"
    results = []
    for configuration in CONFIGURATIONS:
        attention = best if configuration.attention == "best" else configuration.attention
        if attention in (CPU_ONLY if cuda else CUDA_ONLY):
            continue
        results.append(
            _train_one(
                setup, configuration, attention=attention, base=base, tokenizer=tokenizer, rows=rows, device=device
            )
        )
    baseline = results[0]["real_tokens_per_second"]
    for result in results:
        result["vs_unpacked"] = result["real_tokens_per_second"] / baseline
    return {
        "device": _device_name(device),
        "model": asdict(setup.shape),
        "setup": {key: value for key, value in asdict(setup).items() if key != "shape"},
        "flops_per_token_at_chunk_size": flops_per_token(setup.shape, setup.chunk_size),
        "peak_bf16_tflops": _peak_tflops(device),
        "configurations": results,
    }


def _validate_peak_rss(megabytes: int, scratch: Path) -> dict[str, Any]:
    """Peak RSS of `finetune-trainer validate` on a JSONL file of about `megabytes` MB, in a fresh process."""
    from finetune_trainer.tiny_model import save_tiny_llama

    rows = mixed_length_rows(2000, 40, seed=1)
    model = scratch / "model"
    if not model.exists():
        save_tiny_llama(model, [row["text"] for row in rows[:200]])
    data = scratch / f"train-{megabytes}mb.jsonl"
    block = "".join(json.dumps(row) + "\n" for row in rows).encode()
    with data.open("wb") as handle:
        for _ in range(max(1, megabytes * 2**20 // len(block))):
            handle.write(block)
    config = scratch / "in.json"
    config.write_text(
        json.dumps(
            {"model_name": "tiny", "weights": str(model), "destination": str(scratch / "out"), "gpus_per_node": 1}
            | {"input": {"train_data": str(data), "chunk_size": 512, "pack_sequences": True}}
        )
    )
    probe = (
        "import resource, sys\n"
        "from finetune_trainer.cli import main\n"
        "code = main(['validate', '--input', sys.argv[1]])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(scratch / "termination-log"), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", probe, str(config)], capture_output=True, text=True, env=env, check=True
    )
    seconds = time.perf_counter() - started
    summary = json.loads(done.stdout)
    return {
        "file_mb": round(data.stat().st_size / 2**20, 1),
        "rows": summary["rows"],
        "seconds": seconds,
        "peak_rss_mb": int(done.stderr.strip().splitlines()[-1]) / 1024,  # ru_maxrss is in KiB on Linux
    }


def bench_validate(sizes_mb: tuple[int, ...]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="bench-validate-") as scratch:
        results = [_validate_peak_rss(size, Path(scratch)) for size in sizes_mb]
    for result in results:
        result["rss_vs_smallest"] = result["peak_rss_mb"] / results[0]["peak_rss_mb"]
    return results


def _format_throughput(report: dict[str, Any]) -> str:
    seconds = "wall-clock seconds" if report["device"] != "cpu" else "CPU seconds of the benchmark's process"
    lines = [
        f"LoRA training on {report['device']}, model {report['model']}, "
        f"chunk {report['setup']['chunk_size']}, micro batch {report['setup']['micro_batch']} (per {seconds}):",
        f"  {'configuration':34s} {'ckpt':>4s} {'tokens':>7s} {'T_eff':>6s} {'tok/s':>9s} {'vs unpacked':>11s} "
        f"{'TFLOP/s':>8s} {'MFU':>6s} {'HFU':>6s}",
    ]
    for result in report["configurations"]:
        mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "-"
        hfu = f"{result['hfu']:.1%}" if result["hfu"] is not None else "-"
        lines.append(
            f"  {result['configuration']:34s} {result['checkpointed_layers']:4d} {result['real_tokens']:7d} "
            f"{result['t_eff']:6.1f} {result['real_tokens_per_second']:9.1f} {result['vs_unpacked']:10.2f}x "
            f"{result['model_tflops_per_second']:8.4f} {mfu:>6s} {hfu:>6s}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the Llama-2-7B-shaped run")
    parser.add_argument("--tiny", action="store_true", help="a small model and data set (the GPU run's code, fast)")
    parser.add_argument(
        "--validate-mb", type=int, nargs="*", default=[16, 64], help="JSONL sizes for validate's peak RSS"
    )
    parser.add_argument("--output", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    setup = TINY_SETUP if args.tiny else (GPU_SETUP if args.device.startswith("cuda") else CPU_SETUP)
    report: dict[str, Any] = {"throughput": bench_throughput(setup, args.device)}
    print(_format_throughput(report["throughput"]), flush=True)
    if args.validate_mb:
        report["validate"] = bench_validate(tuple(args.validate_mb))
        print("finetune-trainer validate (packed, chunk 512), peak RSS in a fresh process:")
        for result in report["validate"]:
            print(
                f"  {result['file_mb']:8.1f} MB  {result['rows']:9d} rows  {result['seconds']:6.1f} s  "
                f"peak RSS {result['peak_rss_mb']:7.1f} MB  ({result['rss_vs_smallest']:.2f}x the smallest)"
            )
    text = json.dumps(report, indent=2)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"bench max RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
