"""`kubectl ftj`: how it is installed, the manifest it makes, and what `watch` and `list` draw.

The commands against a cluster and an object store are in tests/integration/test_kubectl_plugin.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import re
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from finetune_operator.api.status import MAX_TRAIN_POINTS, FineTuneJobStatus
from finetune_operator.kubectl_plugin import main
from finetune_operator.kubectl_plugin.chart import Series, loss_chart
from finetune_operator.kubectl_plugin.create import LocalData
from finetune_operator.kubectl_plugin.manifest import InvalidManifest, build_manifest, parse_set
from finetune_operator.kubectl_plugin.view import duration, list_table, read_status, watch_view

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
KREW = ROOT / "plugins" / "krew"
BRAILLE = re.compile("[\u2801-\u28ff]")


def render(renderable: Any, width: int = 100) -> str:
    console = Console(width=width, record=True, color_system=None, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


# ------------------------------------------------------------------------------------------- installation


def test_the_package_installs_kubectl_ftj_as_a_console_script() -> None:
    target = PYPROJECT["project"]["scripts"]["kubectl-ftj"]
    assert target == "finetune_operator.kubectl_plugin:main"
    assert main.__module__ == "finetune_operator.kubectl_plugin"
    extra = {
        re.split("[=<>]", requirement)[0] for requirement in PYPROJECT["project"]["optional-dependencies"]["kubectl"]
    }
    assert {"typer", "rich", "fsspec", "s3fs"} <= extra


def test_the_krew_manifest_points_at_the_archive_this_checkout_builds() -> None:
    spec = importlib.util.spec_from_file_location("krew_archive", KREW / "archive.py")
    assert spec is not None
    assert spec.loader is not None
    archive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(archive)
    manifest = yaml.safe_load((KREW / "ftj.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"]) == (
        "krew.googlecode.com/v1alpha2",
        "Plugin",
        "ftj",
    )
    version = PYPROJECT["project"]["version"]
    assert manifest["spec"]["version"] == f"v{version}" == f"v{archive.version()}"
    [platform] = manifest["spec"]["platforms"]
    assert platform["bin"] == "kubectl-ftj"
    assert platform["uri"].endswith(f"/kubectl-ftj-v{version}.tar.gz")
    assert platform["sha256"] == hashlib.sha256(archive.archive_bytes()).hexdigest()
    assert archive.archive_bytes() == archive.archive_bytes(), "the build is reproducible"


# ------------------------------------------------------------------------------------------- the manifest


def test_set_values_are_json_when_they_are_json_and_strings_otherwise() -> None:
    assert parse_set("input.learning_rate=2e-4") == (["input", "learning_rate"], 0.0002)
    assert parse_set("input.run_validation=false") == (["input", "run_validation"], False)
    assert parse_set("input.validation_prompt=What is LoRA?") == (["input", "validation_prompt"], "What is LoRA?")
    assert parse_set('input.validation_prompt="42"') == (["input", "validation_prompt"], "42")
    with pytest.raises(InvalidManifest, match="expected FIELD=VALUE"):
        parse_set("input.learning_rate")


def test_manifest_layers_the_base_the_set_values_and_the_uploaded_data() -> None:
    base: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "old", "labels": {"team": "a"}, "uid": "1234", "resourceVersion": "9"},
        "spec": {"input": {"train_data": "s3://old/data.jsonl", "lora_rank": 16}, "resources": {"nodes": 2}},
    }
    manifest = build_manifest(
        "new", "team-a", base, ["input.num_train_epochs=1", "resources.gpusPerNode=4"], {"train_data": "s3://b/x"}
    )
    assert manifest["metadata"] == {"name": "new", "namespace": "team-a", "labels": {"team": "a"}}
    assert manifest["spec"] == {
        "input": {"train_data": "s3://b/x", "lora_rank": 16, "num_train_epochs": 1},
        "resources": {"nodes": 2, "gpusPerNode": 4},
    }
    assert base["spec"]["input"]["train_data"] == "s3://old/data.jsonl", "the base is not changed"


@pytest.mark.parametrize(
    ("assignments", "message"),
    [
        (["input.num_train_epochs=0"], "spec.input.num_train_epochs: Input should be greater than or equal to 1"),
        (["input.no_such_input=1"], "spec.input.no_such_input: Extra inputs are not permitted"),
        (["input.peft_method=dora"], "spec.input.peft_method: Input should be 'lora' or 'qlora'"),
        (["input=3"], "spec.input: must be an object"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field(assignments: list[str], message: str) -> None:
    with pytest.raises(InvalidManifest) as refused:
        build_manifest("job", "ns", None, assignments, {"train_data": "s3://b/x"})
    assert str(refused.value).startswith(message)


def test_a_base_of_another_kind_is_refused() -> None:
    with pytest.raises(InvalidManifest, match="is a Deployment, not a FineTuneJob"):
        build_manifest("job", "ns", {"kind": "Deployment"}, [], {"train_data": "s3://b/x"})


def test_uploaded_data_is_named_by_its_content_under_the_jobs_prefix() -> None:
    data = LocalData("train_data", Path("train.jsonl"), sha256="ab" * 32, size=10, rows=1, format="text")
    assert (
        data.uri("s3://bucket/uploads/", "team-a", "bot")
        == "s3://bucket/uploads/team-a/bot/train_data-abababababababab.jsonl"
    )


# ------------------------------------------------------------------------------------------- watch and list


def finetunejob(status: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"name": "bot", "namespace": "team-a", "creationTimestamp": "2026-11-28T10:00:00Z"},
        "status": status,
    }


RUNNING: dict[str, Any] = {
    "phase": "Running",
    "reason": "TrainingRunning",
    "message": "the trainer is running",
    "gpuSeconds": 7200 * 8,
    "progress": {
        "step": 150, "totalSteps": 300, "percent": 50, "epoch": 1.5, "totalEpochs": 3, "trainLoss": 1.5,
        "evalLoss": 1.7, "tokensPerSecond": 15200.4, "etaSeconds": 3725,
    },
    "lossHistory": {
        "train": [{"step": s, "epoch": s / 100, "loss": 3 - s / 100} for s in range(1, 151)],
        "eval": [{"step": 100, "epoch": 1.0, "loss": 1.9}],
    },
    "validationSamples": [{"epoch": 1, "prompt": "How do I get a refund?", "completion": "Open Orders."}],
    "logs": "loading\n" + "\n".join(f"step {n}" for n in range(1, 151)),
}  # fmt: skip


def test_watch_shows_phase_progress_eta_speed_curves_sample_and_the_last_log_lines() -> None:
    screen = render(watch_view(finetunejob(RUNNING), width=100))
    assert "phase Running  TrainingRunning: the trainer is running" in screen
    bar = next(line for line in screen.splitlines() if "step 150 of 300" in line)
    filled, empty = bar.count("█"), bar.count("░")
    assert filled > 0
    assert abs(filled - empty) <= 1  # half done
    assert "(50%)  epoch 1.5/3  ETA 1h02m  15,200 tokens/s" in bar
    assert "loss train 1.5000  eval 1.7000" in screen
    assert len([line for line in screen.splitlines() if BRAILLE.search(line)]) >= 6
    assert "train loss" in screen
    assert "eval loss" in screen
    assert "epoch 3" in screen  # the x axis spans the whole run
    assert "completion: Open Orders." in screen
    assert "step 150" in screen
    assert "step 142" not in screen  # only the last lines
    assert max(len(line) for line in screen.splitlines()) <= 100


def test_watch_of_a_new_job_waits_for_the_first_step() -> None:
    screen = render(watch_view(finetunejob({"phase": "Validating"})))
    assert "phase Validating" in screen
    assert "waiting for the trainer's first step" in screen


def test_a_status_from_a_newer_operator_is_read_without_its_new_fields() -> None:
    status = read_status({**RUNNING, "newField": {"x": 1}, "progress": {**RUNNING["progress"], "flops": 3}})
    assert isinstance(status, FineTuneJobStatus)
    assert status.progress is not None
    assert status.progress.step == 150


def test_list_shows_gpu_hours() -> None:
    table = list_table([finetunejob(RUNNING)], all_namespaces=True, now=datetime(2026, 11, 28, 12, tzinfo=UTC))
    header, row = render(table).splitlines()[:2]
    assert header.split() == ["NAMESPACE", "NAME", "PHASE", "PROGRESS", "LOSS", "GPU-HOURS", "AGE"]
    assert row.split() == ["team-a", "bot", "Running", "50%", "1.5000", "16.00", "2h00m"]


@pytest.mark.parametrize(("seconds", "text"), [(None, "-"), (9, "9s"), (75, "1m15s"), (3725, "1h02m")])
def test_durations_read_as_people_say_them(seconds: float | None, text: str) -> None:
    assert duration(seconds) == text


def test_the_loss_chart_falls_from_the_top_left_to_the_bottom_right() -> None:
    points = [(i / 10, 3 - i / 100) for i in range(MAX_TRAIN_POINTS)]
    lines = loss_chart([Series("train loss", "cyan", points)], width=60, height=12).plain.splitlines()
    rows = [line for line in lines if "┤" in line]
    first_dot = [BRAILLE.search(line.split("┤", 1)[1]) for line in rows]
    columns = [match.start() for match in first_dot if match is not None]
    assert len(columns) == len(rows)
    assert columns == sorted(columns)
    assert rows[0].startswith("   3 ┤")
    assert max(len(line) for line in lines) <= 60


def test_a_chart_without_points_says_so() -> None:
    assert loss_chart([Series("train loss", "cyan", [])], width=60, height=12).plain == "no loss reported yet"
