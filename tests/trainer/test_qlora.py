"""QLoRA on the CPU: a 4-bit NF4 base (double quantisation, bf16 compute) through bitsandbytes' CPU backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import learnable_rows, train_in_process, trainer_config, write_jsonl
from finetune_contract.protocol import OutputEvent, ProgressEvent
from finetune_contract.trainer_config import TrainerConfig

pytestmark = pytest.mark.trainer


def test_bitsandbytes_quantises_to_4bit_nf4_on_the_cpu() -> None:
    """bitsandbytes is a dependency of the trainer: when its CPU 4-bit backend is broken, QLoRA fails here first."""
    import bitsandbytes.functional as bnb
    import torch

    weights = torch.randn(64, 64, dtype=torch.bfloat16)
    packed, state = bnb.quantize_4bit(weights, quant_type="nf4", compress_statistics=True)
    assert (state.quant_type, state.nested) == ("nf4", True)
    restored = bnb.dequantize_4bit(packed, state)
    assert restored.shape == weights.shape
    assert (restored.float() - weights.float()).abs().mean() < 0.15 * weights.float().abs().mean()


def test_qlora_trains_a_4bit_nf4_base_and_its_adapter_reloads(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel

    from finetune_trainer.model import load_base_model

    data = write_jsonl(tmp_path / "train.jsonl", learnable_rows(24))
    config = trainer_config(tiny_model_dir, data, tmp_path / "dest", peft_method="qlora", num_train_epochs=1)
    run = train_in_process(config, tmp_path)
    assert isinstance(run.events[-1], OutputEvent)
    losses = [event.loss for event in run.of(ProgressEvent)]
    assert len(losses) == 5  # 24 rows (4 to validation) in batches of 4, 1 epoch
    assert sum(losses[-2:]) / 2 < 0.9 * sum(losses[:2]) / 2, f"the 4-bit base did not learn: {losses}"

    trained = run.result.trainer.model.eval()
    base_layer = trained.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(base_layer).__name__ == "Linear4bit"
    quant_state = base_layer.weight.quant_state
    assert quant_state.quant_type == "nf4"
    assert quant_state.nested
    assert base_layer.compute_dtype == torch.bfloat16

    reloaded = PeftModel.from_pretrained(
        load_base_model(tiny_model_dir, TrainerConfig.model_validate(config).input, 0), str(tmp_path / "dest")
    )
    ids = run.result.trainer.processing_class(["what does erin eat? answer:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = trained(input_ids=ids).logits.float()
        actual = reloaded.eval()(input_ids=ids).logits.float()
    # The trained adapter runs in bf16 (TRL casts QLoRA adapters, as the paper does), the reloaded one in fp32:
    # equal up to bf16 rounding, and the same next-token choices.
    torch.testing.assert_close(actual, expected, rtol=5e-2, atol=1e-1)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))
