"""`kubectl ftj` against the local cluster, the operator as a real process, and an S3-compatible server (moto).

The plugin runs as its console script does (`python -m finetune_operator.kubectl_plugin`), with a kubeconfig and
the AWS environment, as a user's shell would give it. `watch` runs in a real terminal: tmux.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from argocd_health import argocd_health
from finetune_harness import DESTINATION, Cluster, OperatorProcess, trainer_log_lines
from kstatus_reader import kstatus
from kwokpods import terminate_pod, wait_for
from s3server import CREDENTIALS, s3_server
from testcluster import DevCluster

from finetune_contract.protocol import (
    EXIT_USER_ERROR,
    ErrorEvent,
    OutputEvent,
    OutputFile,
    encode,
    termination_message,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DATA_BUCKET = "finetune-data"
OUTPUT_BUCKET = DESTINATION.removeprefix("s3://")
ROWS = "".join(f'{{"prompt": "Question {n}?", "completion": "Answer {n}."}}\n' for n in range(200))
# The README's picture of `kubectl ftj watch`: FTJ_WRITE_DOCS=1 rewrites it from the run of the terminal test.
WATCH_PICTURE = ROOT / "docs" / "kubectl-ftj-watch.svg"


@dataclass
class Plugin:
    """`kubectl ftj ...` in the test's namespace."""

    env: dict[str, str]
    namespace: str

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.command(), *args, "--namespace", self.namespace],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl ftj {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    @staticmethod
    def command() -> list[str]:
        return [sys.executable, "-m", "finetune_operator.kubectl_plugin"]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint: str) -> Any:
    import s3fs

    fs = s3fs.S3FileSystem(
        endpoint_url=s3_endpoint,
        key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        skip_instance_cache=True,
    )
    for bucket in (DATA_BUCKET, OUTPUT_BUCKET):
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    return fs


@pytest.fixture
def ftj(devcluster: DevCluster, namespace: str, s3_endpoint: str) -> Plugin:
    env = {
        **os.environ,
        **CREDENTIALS,
        "KUBECONFIG": str(devcluster.kubeconfig),
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "COLUMNS": "120",
    }
    env.pop("FTJ_DATA_LOCATION", None)
    return Plugin(env, namespace)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_create_with_a_bad_file_names_the_line_and_uploads_and_creates_nothing(
    cluster: Cluster, ftj: Plugin, s3: Any, tmp_path: Path
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(ROWS.splitlines(keepends=True)[:5]) + '{"prompt": "Where is the completion?"}\n' + ROWS)
    location = f"s3://{DATA_BUCKET}/bad-{cluster.namespace}"
    failed = ftj.run("create", "bad-data", "--train-data", str(data), "--data-location", location, check=False)
    assert failed.returncode == 1
    assert failed.stderr == f'error: {data}: train_data line 6: missing "completion"\n'

    missing = ftj.run("create", "no-file", "--train-data", str(tmp_path / "missing.jsonl"), check=False)
    assert f"error: train_data: cannot read {tmp_path / 'missing.jsonl'}" in missing.stderr
    data.write_text(ROWS)
    set_bad_value = ["--set", "input.learning_rate=-1", "--data-location", location]
    bad_value = ftj.run("create", "bad-value", "--train-data", str(data), *set_bad_value, check=False)
    assert "error: spec.input.learning_rate: Input should be greater than 0" in bad_value.stderr
    validation = tmp_path / "eval.jsonl"
    validation.write_text('{"text": "A row of another format."}\n')
    both = ["--train-data", str(data), "--validation-data", str(validation), "--data-location", location]
    mixed = ftj.run("create", "mixed", *both, check=False)
    assert 'validation_data has {"text"} rows but train_data has {"prompt", "completion"} rows' in mixed.stderr
    assert not s3.exists(location)
    assert cluster.is_gone("bad-data")
    assert cluster.is_gone("bad-value")


def test_create_uploads_under_the_jobs_prefix_the_job_runs_and_download_checks_each_sha256(
    cluster: Cluster, operator: OperatorProcess, ftj: Plugin, s3: Any, tmp_path: Path
) -> None:
    name, namespace = "support-bot", cluster.namespace
    # The data location as the Helm chart publishes it; the test's namespace plays the operator's.
    config_map = {"metadata": {"name": "kubectl-ftj"}, "data": {"dataLocation": f"s3://{DATA_BUCKET}/uploads"}}
    cluster.core.create_namespaced_config_map(namespace, config_map)
    data = tmp_path / "support.jsonl"
    data.write_text(ROWS)
    create = ["create", name, "--train-data", str(data), "--set", "input.num_train_epochs=2"]
    create += ["--set", "input.validation_prompt=How do I get a refund?", "--operator-namespace", namespace]

    printed = ftj.run(*create, "--dry-run=client", "-o", "yaml")
    manifest = yaml.safe_load(printed.stdout)
    uri = f"s3://{DATA_BUCKET}/uploads/{namespace}/{name}/train_data-{sha256(data.read_bytes())[:16]}.jsonl"
    assert manifest["spec"]["input"] == {
        "train_data": uri,
        "num_train_epochs": 2,
        "validation_prompt": "How do I get a refund?",
    }
    assert not s3.exists(uri), "a client dry run uploads nothing"
    assert cluster.is_gone(name)

    created = ftj.run(*create)
    assert created.stdout == f"finetunejob.finetune.dev/{name} created\n"
    assert s3.cat(uri) == data.read_bytes()
    assert cluster.get(name)["spec"]["input"]["train_data"] == uri

    cluster.pass_validation(name)
    pod = cluster.wait_pod(name, "training")
    cluster.wait_phase(name, "Running")
    cluster.logs.write(*trainer_log_lines(30))
    progressed = cluster.wait_status(name, lambda s: s.get("progress", {}).get("step") == 30, "the last step")
    # One burst of 30 progress events: beyond the parsing budget some are coalesced, never the first or the newest.
    steps = [point["step"] for point in progressed["lossHistory"]["train"]]
    assert steps[0] == 1
    assert steps[-1] == 30
    assert steps == sorted(set(steps))
    assert progressed["lossHistory"]["eval"] == [{"step": 30, "epoch": 3.0, "loss": 1.2}]
    assert kstatus(cluster.get(name)) == "InProgress"
    logs = ftj.run("logs", name)
    assert logs.stdout.splitlines()[-1] == trainer_log_lines(30)[-1]
    listed = ftj.run("list").stdout.splitlines()
    assert listed[0].split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "GPU-HOURS", "AGE"]
    assert listed[1].split()[:4] == [name, "Running", "100%", "1.0000"]

    weights = f"{DESTINATION}/{namespace}/{name}/"
    files = {"adapter_model.safetensors": os.urandom(3 << 20), "adapter_config.json": b'{"r": 8, "lora_alpha": 16}'}
    for path, content in files.items():
        s3.pipe(weights + path, content)
    output = OutputEvent(
        weights=weights,
        files=[OutputFile(path=path, size=len(content), sha256=sha256(content)) for path, content in files.items()],
    )
    terminate_pod(cluster.api, namespace, pod, 0, message=termination_message(output))
    cluster.wait_phase(name, "Succeeded")
    cluster.devcluster.kubectl_run("wait", f"ftj/{name}", "-n", namespace, "--for=condition=Ready", "--timeout=60s")
    assert argocd_health(cluster.get(name))[0] == "Healthy"
    assert kstatus(cluster.get(name)) == "Current"

    downloaded = ftj.run("download", name, str(tmp_path / "weights"))
    for path, content in files.items():
        assert (tmp_path / "weights" / path).read_bytes() == content
        assert f"{tmp_path / 'weights' / path}  sha256 ok" in downloaded.stdout

    s3.pipe(weights + "adapter_config.json", b'{"r": 64, "lora_alpha": 16}')  # not what the trainer wrote
    tampered = ftj.run("download", name, str(tmp_path / "again"), check=False)
    assert tampered.returncode == 1
    assert "adapter_config.json: sha256" in tampered.stderr
    assert f"does not match the status's {sha256(files['adapter_config.json'])}" in tampered.stderr
    assert not (tmp_path / "again" / "adapter_config.json").exists()
    assert not list((tmp_path / "again").glob("*.partial"))


def test_suspend_resume_cancel_and_the_exit_codes_of_watch(
    cluster: Cluster, operator: OperatorProcess, ftj: Plugin
) -> None:
    name = cluster.apply_example("finetunejob.yaml")
    cluster.pass_validation(name)
    first = cluster.wait_pod(name, "training")
    cluster.wait_phase(name, "Running")
    assert ftj.run("suspend", name).stdout == f"finetunejob.finetune.dev/{name} suspended\n"
    cluster.wait_phase(name, "Suspended")
    assert ftj.run("resume", name).stdout == f"finetunejob.finetune.dev/{name} resumed\n"
    cluster.wait_pod(name, "training", exclude=frozenset({first}))
    assert ftj.run("cancel", name).stdout == f"finetunejob.finetune.dev/{name} canceled\n"
    cluster.wait_phase(name, "Canceled")
    assert ftj.run("watch", name, check=False).returncode == 3
    assert "is already Canceled: nothing to cancel" in ftj.run("cancel", name).stdout

    failing = cluster.apply_example("finetunejob.yaml", name="bad-rows")
    pod = cluster.wait_pod(failing, "validation", index=None)
    error = ErrorEvent(reason="InvalidTrainingData", message='train_data line 17: missing "completion"')
    terminate_pod(cluster.api, cluster.namespace, pod, EXIT_USER_ERROR, message=encode(error))
    watched = ftj.run("watch", failing, check=False)
    assert watched.returncode == 1
    assert 'InvalidTrainingData: train_data line 17: missing "completion"' in watched.stdout
    assert argocd_health(cluster.get(failing))[0] == "Degraded"
    assert kstatus(cluster.get(failing)) == "Failed"
    missing = ftj.run("watch", "no-such-job", check=False)
    assert missing.returncode == 1
    assert 'finetunejob "no-such-job" not found' in missing.stderr


# ----------------------------------------------------------------------------------------- a real terminal


class Tmux:
    """A tmux server of its own (socket named for the test), one session running one command."""

    def __init__(self, env: dict[str, str]) -> None:
        self.socket = f"ftj-{uuid.uuid4().hex[:8]}"
        self.env = env

    def __call__(self, *args: str) -> str:
        command = ["tmux", "-L", self.socket, "-f", "/dev/null", *args]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=30, check=True)
        return done.stdout

    def screen(self, escapes: bool = False) -> str:
        return self("capture-pane", "-p", *(["-e"] if escapes else []), "-t", "watch")

    def wait_for_screen(self, text: str, timeout: float = 60) -> str:
        last = {"screen": ""}

        def probe() -> str | None:
            last["screen"] = self.screen()
            return last["screen"] if text in last["screen"] else None

        try:
            screen: str = wait_for(probe, timeout=timeout, description=f"{text!r} on the terminal")
        except AssertionError as error:
            raise AssertionError(f"{error}; the terminal shows:\n{last['screen']}") from None
        return screen


@pytest.fixture
def tmux(ftj: Plugin) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed: `make integration` installs it (apt-get install tmux)", pytrace=False)
    # The terminal's own size, not the COLUMNS of the piped runs.
    env = {key: value for key, value in ftj.env.items() if key not in ("COLUMNS", "LINES")}
    terminal = Tmux({**env, "TERM": "xterm-256color"})
    yield terminal
    subprocess.run(["tmux", "-L", terminal.socket, "kill-server"], capture_output=True, check=False)


def test_watch_in_a_terminal_draws_progress_and_loss_curves_and_exits_zero_on_success(
    cluster: Cluster, operator: OperatorProcess, ftj: Plugin, tmux: Tmux, tmp_path: Path
) -> None:
    name = cluster.apply_example("finetunejob.yaml")
    cluster.pass_validation(name)
    pod = cluster.wait_pod(name, "training")
    cluster.wait_phase(name, "Running")
    lines = trainer_log_lines(30, sample=("How do I get a refund?", "Open Orders, pick the order, press Refund."))
    cluster.logs.write(*lines[:32])  # the start event and 15 steps
    exit_file = tmp_path / "exit-code"
    watch = " ".join([*Plugin.command(), "watch", name, "--namespace", cluster.namespace])
    tmux("new-session", "-d", "-s", "watch", "-x", "110", "-y", "52", f"{watch}; echo $? > {exit_file}")
    tmux("set-option", "-w", "-t", "watch", "remain-on-exit", "on")

    halfway = tmux.wait_for_screen("step 15 of 30")
    assert "phase Running" in halfway
    bar = next(line for line in halfway.splitlines() if "step 15 of 30 (50%)" in line)
    assert re.search("█{5,}░{5,} step 15 of 30", bar), bar
    assert "epoch 1.5/3" in bar
    assert "ETA 15s" in bar
    assert "15,000 tokens/s" in bar
    assert "train loss" in halfway
    curve = [line for line in halfway.splitlines() if re.search("[\u2801-\u28ff]", line)]
    assert len(curve) >= 5, halfway  # the train loss falls across the chart's rows

    cluster.logs.write(*lines[32:])  # the other steps, an eval and a validation sample
    cluster.wait_status(name, lambda s: s.get("progress", {}).get("step") == 30, "the last step")
    output = OutputEvent(weights=f"{DESTINATION}/{cluster.namespace}/{name}/")
    terminate_pod(cluster.api, cluster.namespace, pod, 0, message=termination_message(output))
    code = wait_for(lambda: exit_file.exists() and exit_file.read_text().strip(), timeout=90, description="exit")
    assert code == "0"
    final = tmux.screen()
    assert "phase Succeeded" in final
    assert "step 30 of 30 (100%)" in final
    assert "eval loss" in final
    assert "Open Orders, pick the order, press Refund." in final
    assert f"weights: {output.weights}" in final
    if os.environ.get("FTJ_WRITE_DOCS") == "1":
        save_picture(tmux.screen(escapes=True), WATCH_PICTURE)


def save_picture(screen: str, path: Path) -> None:
    """The terminal's screen (with its colours) as an SVG picture."""
    from rich.console import Console
    from rich.text import Text

    console = Console(record=True, width=110, force_terminal=True, file=io.StringIO())
    console.print(Text.from_ansi(screen.rstrip("\n")))
    path.parent.mkdir(parents=True, exist_ok=True)
    console.save_svg(str(path), title="kubectl ftj watch")
