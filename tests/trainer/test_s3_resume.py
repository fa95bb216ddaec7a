"""S3: data in and adapter out through a real S3-compatible server (moto_server on loopback), and resuming:
a trainer killed after epoch 1 restarts from that checkpoint at the destination, not from the start; a checkpoint
of other inputs is never resumed."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import events_in, learnable_rows, start_trainer, trainer_config, trainer_env, write_config
from finetune_contract.protocol import CheckpointEvent, OutputEvent, ProgressEvent, StartEvent, parse_line

pytestmark = pytest.mark.trainer

BUCKET = "finetunes"


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
    }
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    return fs


def _read_until_checkpoint(process: subprocess.Popen[str], epoch: int) -> list[str]:
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        event = parse_line(line)
        if isinstance(event, CheckpointEvent) and event.epoch == epoch:
            return lines
    raise AssertionError("the trainer ended before the checkpoint:\n" + "".join(lines[-60:]))


def test_killed_trainer_resumes_from_the_s3_checkpoint_and_uploads_the_adapter(
    s3: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    s3.pipe(f"{BUCKET}/data/train.jsonl", "".join(json.dumps(row) + "\n" for row in learnable_rows(36)).encode())
    destination = f"s3://{BUCKET}/jobs/default/resume"
    config = trainer_config(tiny_model_dir, f"s3://{BUCKET}/data/train.jsonl", destination, num_train_epochs=2)
    config_path = write_config(tmp_path / "in.json", config)
    env = trainer_env(tmp_path)  # carries the S3 endpoint and credentials from the fixture

    first = start_trainer(config_path, tmp_path, env)
    before = _read_until_checkpoint(first, epoch=1)
    first.send_signal(signal.SIGKILL)  # the pod dies right after epoch 1
    first.wait(timeout=60)
    steps_per_epoch = next(e for e in events_in("".join(before)) if isinstance(e, StartEvent)).total_steps // 2
    checkpoint = f"{destination}/checkpoints/step-{steps_per_epoch}"
    assert s3.exists(f"{checkpoint}/COMPLETE".removeprefix("s3://"))

    second = start_trainer(config_path, tmp_path, env)  # the restarted pod: same command, same workdir volume
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out[-4000:]
    assert f"resuming from the step {steps_per_epoch} checkpoint at {checkpoint}" in out
    events = events_in(out)
    steps = [event.step for event in events if isinstance(event, ProgressEvent)]
    assert steps == list(range(steps_per_epoch + 1, 2 * steps_per_epoch + 1))  # epoch 2 only
    assert [event.epoch for event in events if isinstance(event, CheckpointEvent)] == [2]

    output = events[-1]
    assert isinstance(output, OutputEvent)
    assert output.weights == destination
    for file in output.files:
        content = s3.cat_file(f"{BUCKET}/jobs/default/resume/{file.path}")
        assert (len(content), hashlib.sha256(content).hexdigest()) == (file.size, file.sha256)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {file.path for file in output.files}
    # The manifest is published last and names exactly the files the output event reports.
    manifest = json.loads(s3.cat_file(f"{BUCKET}/jobs/default/resume/manifest.json"))
    assert manifest["files"] == [file.model_dump() for file in output.files]
    assert os.path.getsize(tmp_path / "termination-log") <= 4096
