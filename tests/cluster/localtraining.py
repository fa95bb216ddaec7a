"""A FineTuneJob that trains for real on the local cluster: examples/demo/finetunejob.yaml and what it needs.

The job runs on an executor node's CPU (gpusPerNode: 0). Its base weights (a tiny random-initialised Llama with a
tokenizer trained on the data) and its data (examples/demo/support-bot.jsonl) are put where the manifest says, in
the local S3-compatible server; the output goes under the operator's default destination in the same server. The
pods take the server's endpoint from a ConfigMap and its credentials from a Secret, by reference. `make demo` and
tests/integration/test_end_to_end.py use this module.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from s3server import CREDENTIALS, S3Server

from finetune_contract.inputs import TrainingInput

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "examples" / "demo" / "finetunejob.yaml"
DATA = ROOT / "examples" / "demo" / "support-bot.jsonl"
OUTPUT_BUCKET = "finetune-outputs"
DEFAULT_DESTINATION = f"s3://{OUTPUT_BUCKET}"
# What the manifest's env and envFrom name.
ENDPOINT_CONFIG_MAP = "local-s3"
CREDENTIALS_SECRET = "local-s3-credentials"
# The operator's settings for these jobs: outputs in the local server, and a validation pod that fits on a laptop.
OPERATOR_ENV = {
    "FINETUNE_DEFAULT_DESTINATION": DEFAULT_DESTINATION,
    "FINETUNE_VALIDATION_CPU": "1",
    "FINETUNE_VALIDATION_MEMORY": "2Gi",
}


def manifest() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
    return document


def buckets() -> tuple[str, ...]:
    """The buckets the manifest's URIs and the default destination name."""
    spec = manifest()["spec"]
    return tuple(sorted({_bucket(spec["input"]["train_data"]), _bucket(spec["model"]["weights"]), OUTPUT_BUCKET}))


def _bucket(uri: str) -> str:
    return uri.removeprefix("s3://").split("/", 1)[0]


def build_tiny_llama(directory: Path) -> Path:
    """The base weights: a tiny random Llama whose tokenizer is trained on the demo data."""
    from finetune_trainer.tiny_model import save_tiny_llama

    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    return save_tiny_llama(directory, [row["prompt"] + row["completion"] for row in rows])


def publish_inputs(s3: S3Server, weights: Path) -> None:
    """The base weights and the data, at the URIs the manifest names."""
    spec = manifest()["spec"]
    filesystem = s3.filesystem()
    weights_uri = spec["model"]["weights"].removeprefix("s3://").rstrip("/")
    for file in sorted(weights.iterdir()):
        filesystem.put_file(str(file), f"{weights_uri}/{file.name}")
    filesystem.put_file(str(DATA), spec["input"]["train_data"].removeprefix("s3://"))


def storage_access(s3: S3Server) -> list[dict[str, Any]]:
    """The ConfigMap with the server's endpoint and the Secret with its credentials, for the job's namespace."""
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": ENDPOINT_CONFIG_MAP},
            "data": {"endpoint": s3.endpoint},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": CREDENTIALS_SECRET},
            "stringData": {name: CREDENTIALS[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
        },
    ]


def download_output(s3: S3Server, output: dict[str, Any], directory: Path) -> dict[str, str]:
    """The files `status.output` lists, from its weights URI into `directory`; returns path -> sha256 of what
    was downloaded."""
    filesystem = s3.filesystem()
    root = output["weights"].removeprefix("s3://").rstrip("/")
    digests = {}
    for file in output["files"]:
        target = directory / file["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        filesystem.get_file(f"{root}/{file['path']}", str(target))
        digests[file["path"]] = hashlib.sha256(target.read_bytes()).hexdigest()
    return digests


def complete_with_adapter(weights: Path, adapter: Path, prompt: str, max_new_tokens: int) -> str:
    """Load the base weights and the published adapter with PEFT, and complete `prompt` greedily, as the trainer's
    validation sample does."""
    from peft import PeftModel

    from finetune_trainer.callbacks import generate
    from finetune_trainer.model import load_base_model, load_tokenizer

    base = load_base_model(weights, TrainingInput.model_validate(manifest()["spec"]["input"]), local_rank=0)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    return generate(model, load_tokenizer(adapter), prompt, max_new_tokens)
