"""Records the trainer run that `make demo DEMO_FLAGS=--replay` plays into a simulated pod's log (examples/demo/).

A real `finetune-trainer validate` and `finetune-trainer train` on the CPU: the tiny random-initialised Llama and the
support-desk rows of the real demo (localtraining.py), the output uploaded to the local S3-compatible server under
the replayed job's destination. Run it again after changing the trainer's events:
`.venv/bin/python tests/cluster/record_demo.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from localtraining import DATA, build_tiny_llama
from s3server import running_s3_server

ROOT = Path(__file__).resolve().parents[2]
RECORDING = ROOT / "examples" / "demo"
DESTINATION = "s3://finetune-outputs/finetune-demo/llama2-7b-support-bot/"


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch, running_s3_server("finetune-outputs") as s3:
        work = Path(scratch)
        weights = build_tiny_llama(work / "tiny-llama")
        config = {
            "model_name": "meta/llama-2-7b",
            "weights": str(weights),
            "destination": DESTINATION,
            "nodes": 1,
            # Eight processes, as on one 8-GPU node (gloo on the CPU): the plan and events match the replayed job's.
            "gpus_per_node": 8,
            "job": "finetune-demo/llama2-7b-support-bot",
            "input": {
                "train_data": str(DATA),
                "num_train_epochs": 3,
                "num_validation_samples": 8,
                "learning_rate": 5e-3,
                "chunk_size": 64,
                "validation_prompt": "Customer: I need help with my refund.\nAgent:",
            },
        }
        config_path = work / "input.json"
        config_path.write_text(json.dumps(config))
        env = {
            **os.environ,
            **s3.env(),
            "FINETUNE_WORKDIR": str(work / "run"),
            "FINETUNE_TERMINATION_LOG": str(work / "termination-log"),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        RECORDING.mkdir(parents=True, exist_ok=True)
        trainer = [sys.executable, "-m", "finetune_trainer"]
        subprocess.run([*trainer, "validate", "--input", str(config_path)], env=env, check=True)
        shutil.copy(work / "termination-log", RECORDING / "validate-termination.json")
        train = subprocess.run(
            [*trainer, "train", "--input", str(config_path)],
            env=env,
            check=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        (RECORDING / "train.log").write_text(train.stdout)
    print(f"recorded {RECORDING.relative_to(ROOT)}/validate-termination.json and train.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
