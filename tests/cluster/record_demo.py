"""Records the trainer run that `make demo` plays into the simulated pod's log (examples/demo/).

A real `finetune-trainer validate` and `finetune-trainer train` on the CPU: a tiny random-initialised Llama, a
small support-desk data set, the output uploaded to an S3-compatible server (moto) on loopback under the demo's
destination. Run it again after changing the trainer's events: `.venv/bin/python tests/cluster/record_demo.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from s3server import s3_server

from finetune_trainer.tiny_model import save_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
RECORDING = ROOT / "examples" / "demo"
DESTINATION = "s3://finetune-outputs/finetune-demo/llama2-7b-support-bot/"
TOPICS = ("password reset", "refund", "invoice", "delivery", "login", "upgrade", "cancellation", "shipping address")
ANSWERS = (
    "Use the reset link on the sign-in page.",
    "Refunds reach your card within 5 days.",
    "Invoices are under Billing > History.",
    "Parcels ship within 2 working days.",
    "Clear your cookies, then sign in again.",
    "Choose a plan under Settings > Plan.",
    "Cancel any time under Settings > Plan.",
    "Edit it under Account > Addresses.",
)


def rows(count: int) -> list[dict[str, str]]:
    return [
        {"prompt": f"Customer: I need help with my {TOPICS[i % 8]}.\nAgent:", "completion": f" {ANSWERS[i % 8]}"}
        for i in range(count)
    ]


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data = work / "train.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows(96)))
        corpus = [row["prompt"] + row["completion"] for row in rows(96)]
        weights = save_tiny_llama(work / "tiny-llama", corpus)
        config = {
            "model_name": "meta/llama-2-7b",
            "weights": str(weights),
            "destination": DESTINATION,
            "nodes": 1,
            # Eight processes, as on one 8-GPU node (gloo on the CPU): the plan and events match the demo's job.
            "gpus_per_node": 8,
            "job": "finetune-demo/llama2-7b-support-bot",
            "input": {
                "train_data": str(data),
                "num_train_epochs": 3,
                "num_validation_samples": 8,
                "learning_rate": 5e-3,
                "chunk_size": 64,
                "validation_prompt": "Customer: I need help with my refund.\nAgent:",
            },
        }
        config_path = work / "input.json"
        config_path.write_text(json.dumps(config))
        with s3_server() as endpoint:
            env = {
                **os.environ,
                "AWS_ACCESS_KEY_ID": "demo",
                "AWS_SECRET_ACCESS_KEY": "demo",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL_S3": endpoint,
                "FINETUNE_WORKDIR": str(work / "run"),
                "FINETUNE_TERMINATION_LOG": str(work / "termination-log"),
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
            }
            create_bucket(endpoint)
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


def create_bucket(endpoint: str) -> None:
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint, key="demo", secret="demo").mkdir("finetune-outputs")


if __name__ == "__main__":
    sys.exit(main())
