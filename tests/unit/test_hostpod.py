"""How the executor turns a pod into a host process (tests/cluster/hostpod.py): files, env, command line."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from hostpod import (
    TRAINER_DOCKERFILE,
    ClusterObjects,
    MountTable,
    PodDirectory,
    StartError,
    expand,
    prepare,
    read_dockerfile,
)

from finetune_operator.api import FineTuneJobSpec
from finetune_operator.resolution import Owner, RunInfo, resolve_run
from finetune_operator.settings import Settings
from finetune_operator.workload import build_config_map, build_train_job

IMAGE = read_dockerfile(TRAINER_DOCKERFILE)
SETTINGS = Settings(default_destination="s3://outputs")
OWNER = Owner(name="tiny", namespace="research", uid="uid-1", labels={})


def cpu_run(**resources: Any) -> RunInfo:
    spec = FineTuneJobSpec.model_validate(
        {"input": {"train_data": "s3://data/train.jsonl"}, "resources": {"gpusPerNode": 0, **resources}}
    )
    return resolve_run(OWNER, spec, SETTINGS)


def trainer_pod(index: int = 0, **resources: Any) -> dict[str, Any]:
    """A pod of the training Job the operator builds for a CPU job, as the Job controller would create it."""
    template = build_train_job(cpu_run(**resources))["spec"]["template"]
    return {
        "metadata": {
            "name": f"tiny-train-{index}-abcde",
            "namespace": OWNER.namespace,
            "uid": f"pod-uid-{index}",
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "spec": {**copy.deepcopy(template["spec"]), "nodeName": "exec-node-0", "hostname": f"tiny-train-{index}"},
        "status": {"phase": "Running", "podIP": "10.244.0.7"},
    }


def input_objects(headless_services: frozenset[str] = frozenset()) -> ClusterObjects:
    config_map = build_config_map(cpu_run())
    return ClusterObjects(
        config_maps={config_map["metadata"]["name"]: {k: v.encode() for k, v in config_map["data"].items()}},
        headless_services=headless_services,
    )


def test_the_trainer_dockerfile_stands_in_for_the_image() -> None:
    assert (IMAGE.env["FINETUNE_WORKDIR"], IMAGE.env["HF_HOME"]) == ("/workspace/run", "/workspace/hf")
    assert IMAGE.workdir == "/workspace"
    assert (list(IMAGE.entrypoint), list(IMAGE.cmd)) == (
        ["finetune-trainer"],
        ["train", "--input", "/etc/finetune/input.json"],
    )


def test_operator_trainer_pod_runs_the_trainer_with_its_container_paths_under_the_pod_directory(
    tmp_path: Path,
) -> None:
    directory = PodDirectory(tmp_path / "pod")
    process = prepare(trainer_pod(), input_objects(), directory, IMAGE, {"PYTHONPATH": "/src"})

    volumes = directory.root / "volumes"
    assert Path(process.argv[0]).name == "finetune-trainer"
    assert process.argv[1:] == ["train", "--input", str(volumes / "input" / "input.json")]
    assert json.loads((volumes / "input" / "input.json").read_text())["job"] == "research/tiny"
    env = process.env
    assert env["FINETUNE_WORKDIR"] == str(volumes / "workspace" / "run")  # the image's ENV, mapped
    assert env["TMPDIR"] == str(volumes / "scratch")
    assert env["FINETUNE_TERMINATION_LOG"] == str(process.termination_log)
    assert (env["NODE_RANK"], env["NPROC_PER_NODE"], env["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert (env["HOSTNAME"], env["PYTHONPATH"]) == ("tiny-train-0", "/src")
    # The image's PATH (/opt/venv/bin) is the image's; the executor's Python environment stands in for it.
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert process.cwd == volumes / "workspace"
    assert process.fallback_to_logs


def test_rank1_reaches_rank0_by_its_service_name_on_loopback(tmp_path: Path) -> None:
    pod = trainer_pod(index=1, nodes=2)
    assert {v["name"]: v.get("value") for v in pod["spec"]["containers"][0]["env"]}["MASTER_ADDR"] == (
        "tiny-train-0.tiny-workers"
    )
    with_service = prepare(pod, input_objects(frozenset({"tiny-workers"})), PodDirectory(tmp_path / "a"), IMAGE, {})
    assert (with_service.env["MASTER_ADDR"], with_service.env["NODE_RANK"]) == ("127.0.0.1", "1")
    # A name that no headless Service of the namespace gives stays as it is.
    without = prepare(pod, input_objects(), PodDirectory(tmp_path / "b"), IMAGE, {})
    assert without.env["MASTER_ADDR"] == "tiny-train-0.tiny-workers"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/etc/finetune/input.json", "/pod/input/input.json"),
        ("--input=/etc/finetune/input.json", "--input=/pod/input/input.json"),
        ("cat /etc/finetune && ls /tmp/x", "cat /pod/input && ls /pod/tmp/x"),
        ("/etc/finetune-other/file", "/etc/finetune-other/file"),
        ("/tmpfile", "/tmpfile"),
        ("https://example.com/etc/finetune/x", "https://example.com/etc/finetune/x"),
        ("pvc://claim/tmp", "pvc://claim/tmp"),
    ],
)
def test_absolute_container_paths_under_a_mount_are_rewritten_wherever_they_appear(text: str, expected: str) -> None:
    table = MountTable({"/etc/finetune": Path("/pod/input"), "/tmp": Path("/pod/tmp"), "/": Path("/ignored")})
    assert table.rewrite(text) == expected


def test_references_expand_as_kubernetes_expands_them() -> None:
    env = {"A": "one", "B": "two"}
    assert expand("$(A)-$(B)", env) == "one-two"
    assert expand("$$(A) costs $$5", env) == "$(A) costs $5"
    assert expand("$(UNDEFINED)", env) == "$(UNDEFINED)"


def test_a_missing_config_map_is_a_start_error_that_names_it(tmp_path: Path) -> None:
    with pytest.raises(StartError, match='configmap "tiny-input" not found'):
        prepare(trainer_pod(), ClusterObjects(), PodDirectory(tmp_path), IMAGE, {})


def test_an_unsupported_volume_is_a_start_error_that_names_it(tmp_path: Path) -> None:
    pod = trainer_pod()
    pod["spec"]["volumes"].append({"name": "cache", "nfs": {"server": "nfs.example", "path": "/"}})
    with pytest.raises(StartError, match="volume 'cache': nfs volumes are not supported"):
        prepare(pod, input_objects(), PodDirectory(tmp_path), IMAGE, {})
