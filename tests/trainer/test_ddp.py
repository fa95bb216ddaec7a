"""Two-process DDP (torchrun, gloo) through `finetune-trainer train`, as the container runs it on one node."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import events_in, learnable_rows, start_trainer, trainer_config, trainer_env, write_config, write_jsonl
from finetune_contract.batching import plan_batches
from finetune_contract.protocol import OutputEvent, StartEvent

pytestmark = pytest.mark.trainer


def test_two_process_ddp_runs_to_the_end_with_identical_replicas(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "train.jsonl", learnable_rows(36))
    config = trainer_config(
        tiny_model_dir,
        data,
        tmp_path / "dest",
        num_train_epochs=1,
        train_batch_size=4,
        micro_batch_size=2,
        lora_dropout=0.1,
    )
    config["gpus_per_node"] = 2
    weights_dir = tmp_path / "rank-weights"
    env = trainer_env(tmp_path, FINETUNE_TRAINER_RANK_WEIGHTS_DIR=str(weights_dir))
    process = start_trainer(write_config(tmp_path / "in.json", config), tmp_path, env)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-4000:]

    # The node staged the checked data once, and the prepared (tokenized) datasets are cached where both ranks read.
    work = tmp_path / "work"
    assert sorted(path.name for path in (work / "data").iterdir()) == ["split.json", "train.jsonl", "validation.jsonl"]
    assert list((work / "datasets").rglob("cache-*.arrow"))
    events = events_in(out)
    # Events come from rank 0 only: one start, one output.
    [start] = [event for event in events if isinstance(event, StartEvent)]
    [output] = [event for event in events if isinstance(event, OutputEvent)]
    assert start.world_size == 2
    # The global batch rule (finetune_contract.batching): batch 4 on 2 ranks is 2 per rank, no accumulation;
    # 32 rows make 8 steps.
    assert start.total_steps == plan_batches(4, 2, 2).steps_per_epoch(32) == 8
    assert (tmp_path / "dest" / "adapter_model.safetensors").exists()
    assert output.files

    rank0, rank1 = load_file(weights_dir / "rank-0.safetensors"), load_file(weights_dir / "rank-1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert any("lora_B" in name for name in rank0)
    for name, tensor in rank0.items():
        assert tensor.abs().sum() > 0 or "lora_B" not in name
        assert (tensor == rank1[name]).all(), f"{name} differs between the ranks"
