"""QLoRA on the CPU: a 4-bit NF4 base (double quantisation, bf16 compute) through bitsandbytes' CPU backend."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from conftest import events_in, learnable_rows, trainer_config, write_jsonl

from finetune_contract.protocol import OutputEvent, ProgressEvent
from finetune_contract.trainer_config import TrainerConfig

pytestmark = pytest.mark.trainer


def _cpu_4bit_missing() -> str | None:
    try:
        import bitsandbytes.functional as bnb
        import torch

        bnb.quantize_4bit(torch.randn(64, 64, dtype=torch.bfloat16), quant_type="nf4", compress_statistics=True)
    except Exception as error:  # the backend is missing or broken: say which
        return f"bitsandbytes has no working CPU 4-bit backend here: {type(error).__name__}: {error}"
    return None


def test_qlora_trains_a_4bit_nf4_base_and_its_adapter_reloads(tiny_model_dir: Path, tmp_path: Path) -> None:
    missing = _cpu_4bit_missing()
    if missing:
        pytest.skip(missing)
    import torch
    from peft import PeftModel

    from finetune_trainer.model import load_base_model
    from finetune_trainer.train import run

    data = write_jsonl(tmp_path / "train.jsonl", learnable_rows(24))
    config = TrainerConfig.model_validate(
        trainer_config(tiny_model_dir, data, tmp_path / "dest", peft_method="qlora", num_train_epochs=1)
    )
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        result = run(config, tmp_path / "work")
    events = events_in(buffer.getvalue())
    assert isinstance(events[-1], OutputEvent)
    assert all(isinstance(e.loss, float) and e.loss == e.loss for e in events if isinstance(e, ProgressEvent))

    trained = result.trainer.model.eval()
    base_layer = trained.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(base_layer).__name__ == "Linear4bit"
    quant_state = base_layer.weight.quant_state
    assert quant_state.quant_type == "nf4"
    assert quant_state.nested
    assert base_layer.compute_dtype == torch.bfloat16

    reloaded = PeftModel.from_pretrained(load_base_model(tiny_model_dir, config.input, 0), str(tmp_path / "dest"))
    ids = result.trainer.processing_class(["what does erin eat? answer:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = trained(input_ids=ids).logits.float()
        actual = reloaded.eval()(input_ids=ids).logits.float()
    # The trained adapter runs in bf16 (TRL casts QLoRA adapters, as the paper does), the reloaded one in fp32:
    # equal up to bf16 rounding, and the same next-token choices.
    torch.testing.assert_close(actual, expected, rtol=5e-2, atol=1e-1)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))
