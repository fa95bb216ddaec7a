"""The base model and the adapter: loading (`from_pretrained` on a local directory), LoRA and QLoRA settings.

Target modules: every linear layer of each decoder block, attention (q, k, v, o) and MLP (gate, up, down), not the
embeddings or the LM head. The QLoRA paper (Dettmers et al., 2023, section 4) found that adapting all linear layers
is what matches full 16-bit fine-tuning, and that adapting only q/v (the original LoRA recipe, and Replicate's)
falls short. The cost is small: at rank 8 on Llama 2 7B it is 20M trainable parameters (0.3% of 6.7B).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune_contract.inputs import TrainingInput
from finetune_trainer import attention
from finetune_trainer.errors import INVALID_INPUT, WEIGHTS_NOT_FOUND, UserError

LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Files `validate` needs to count tokens and check chunk_size, fetched without the multi-gigabyte weights.
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def lora_config(inputs: TrainingInput) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=inputs.lora_rank,
        lora_alpha=inputs.lora_alpha,
        lora_dropout=inputs.lora_dropout,
        target_modules=list(LLAMA_TARGET_MODULES),
        bias="none",
        task_type="CAUSAL_LM",
    )


def quantization_config(inputs: TrainingInput) -> Any:
    """QLoRA: the frozen base in 4-bit NF4 with double quantisation, computing in bf16. None for plain LoRA."""
    if inputs.peft_method != "qlora":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token is None:
        # Llama 2 has no pad token; padded positions never reach the loss (labels -100), so any token will do.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def read_model_config(directory: Path) -> dict[str, Any]:
    """The checkpoint's config.json; WeightsNotFound when the directory has none."""
    path = directory / CONFIG_FILE
    try:
        config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise UserError(WEIGHTS_NOT_FOUND, f"the base weights have no {CONFIG_FILE}") from error
    return config


def check_chunk_size(inputs: TrainingInput, model_config: dict[str, Any]) -> None:
    """chunk_size is the longest sequence trained on: it must fit the model's context."""
    context = model_config.get("max_position_embeddings")
    if isinstance(context, int) and inputs.chunk_size > context:
        raise UserError(
            INVALID_INPUT,
            f"chunk_size={inputs.chunk_size} exceeds the base model's context length of {context} tokens "
            f"(max_position_embeddings); set chunk_size to {context} or less",
        )


def load_base_model(
    directory: Path, inputs: TrainingInput, local_rank: int, attn_implementation: str | None = None
) -> Any:
    """The frozen base model, ready for `get_peft_model` (QLoRA: quantised and prepared for k-bit training).

    On CUDA each process loads its weights straight onto its own GPU: safetensors are memory-mapped, so the host
    holds the files once in its page cache, not one full copy per process.
    """
    import torch
    from transformers import AutoModelForCausalLM

    attention.register()
    cuda = has_cuda()
    quantization = quantization_config(inputs)
    kwargs: dict[str, Any] = {
        "dtype": torch.bfloat16 if cuda else torch.float32,
        "attn_implementation": attn_implementation or attention.choose(cuda),
        "device_map": {"": local_rank if cuda else "cpu"},
    }
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        # Activation checkpointing follows the memory plan, set through SFTConfig.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # type: ignore[no-untyped-call]
    return model
