"""The whole data path, for real: FineTuneJob -> ConfigMap input -> the pods' command, env and volumes -> the
trainer process on an executor node -> its log events -> progress in status -> termination message -> weights.

The jobs are examples/demo/finetunejob.yaml (the CPU shape, gpusPerNode 0) with a few inputs changed; the tiny
random Llama and the data are in the local S3-compatible server, where the adapters go too (localtraining.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from devcluster import EXECUTOR_LABEL, pid_alive
from executor import pod_process_id
from finetune_harness import Cluster, OperatorProcess, StatusHistory, install_crd
from kwokpods import read_pod_log, wait_for
from localtraining import (
    DATA,
    DEFAULT_DESTINATION,
    OPERATOR_ENV,
    OUTPUT_BUCKET,
    buckets,
    build_tiny_llama,
    complete_with_adapter,
    download_output,
    manifest,
    publish_inputs,
    storage_access,
)
from s3server import S3Server, running_s3_server
from testcluster import DevCluster, free_port

from finetune_contract.protocol import ProgressEvent, StartEvent, parse_line
from finetune_trainer.callbacks import SAMPLE_MAX_NEW_TOKENS

pytestmark = pytest.mark.integration

PHASES_IN_ORDER = ("Pending", "Validating", "Queued", "Starting", "Running", "Succeeded")
TRAINING_TIMEOUT = 300


@dataclass(frozen=True)
class LocalStore:
    s3: S3Server
    weights: Path  # the local copy of the base weights that are in the store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStore]:
    with running_s3_server(*buckets()) as s3:
        weights = build_tiny_llama(tmp_path_factory.mktemp("base") / "tiny-random-llama")
        publish_inputs(s3, weights)
        yield LocalStore(s3, weights)


@pytest.fixture
def cluster(devcluster: DevCluster, namespace: str, store: LocalStore) -> Cluster:
    install_crd(devcluster.api)
    cluster = Cluster(devcluster, namespace)
    core: Any = cluster.core
    for obj in storage_access(store.s3):
        create = core.create_namespaced_config_map if obj["kind"] == "ConfigMap" else core.create_namespaced_secret
        create(namespace, obj)
    return cluster


@pytest.fixture
def operator(devcluster: DevCluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    settings = {
        **OPERATOR_ENV,
        "FINETUNE_PROGRESS_INTERVAL_SECONDS": "0.3",
        # Executor pods share this machine's ports: a rendezvous port of their own for each test.
        "FINETUNE_MASTER_PORT": str(free_port()),
    }
    process = OperatorProcess(namespace, devcluster.kubeconfig, tmp_path / "operator.log", env=settings)
    process.start()
    yield process
    process.stop()
    print(f"\n--- operator log ---\n{process.log_path.read_text()[-6000:]}")


def demo_spec(**changes: Any) -> dict[str, Any]:
    """The demo job's spec; `input` and `resources` changes are merged into the demo's."""
    spec: dict[str, Any] = copy.deepcopy(manifest()["spec"])
    for key, value in changes.items():
        spec[key] = {**spec[key], **value} if key in ("input", "resources") else value
    return spec


def test_cpu_job_trains_for_real_and_publishes_an_adapter_that_reloads(
    cluster: Cluster, operator: OperatorProcess, store: LocalStore, tmp_path: Path
) -> None:
    job = manifest()
    name, prompt = job["metadata"]["name"], job["spec"]["input"]["validation_prompt"]
    with StatusHistory(cluster.api, cluster.namespace, name) as history:
        cluster.create(name, job["spec"])
        done = cluster.wait_phase(name, "Succeeded", timeout=TRAINING_TIMEOUT)

    phases = history.phases()
    assert {"Validating", "Running", "Succeeded"} <= set(phases), phases
    assert [PHASES_IN_ORDER.index(phase) for phase in phases] == sorted({PHASES_IN_ORDER.index(p) for p in phases})
    total = done["progress"]["totalSteps"]
    assert total == job["spec"]["input"]["num_train_epochs"] * done["resolved"]["stepsPerEpoch"]
    steps = history.steps()
    assert len(steps) >= 2, steps  # seen moving, not only at the end
    assert steps == sorted(steps)
    assert steps[-1] == total
    samples = done["validationSamples"]
    assert [(sample["epoch"], sample["prompt"]) for sample in samples] == [(e, prompt) for e in (1.0, 2.0, 3.0)]

    pod = cluster.core.read_namespaced_pod(cluster.wait_pod(name, "training", phase="Succeeded"), cluster.namespace)
    assert cluster.core.read_node(pod.spec.node_name).metadata.labels[EXECUTOR_LABEL] == "true"
    assert "nvidia.com/gpu" not in pod.spec.containers[0].resources.limits

    output = done["output"]
    uid = cluster.get(name)["metadata"]["uid"]
    assert output["weights"] == f"{DEFAULT_DESTINATION}/{cluster.namespace}/{name}/{uid}/"
    adapter = tmp_path / "adapter"
    digests = download_output(store.s3, output, adapter)
    assert digests == {file["path"]: file["sha256"] for file in output["files"]}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(digests)
    # The published adapter is the trained one: reloaded with PEFT, it completes the prompt as the last sample did.
    completion = complete_with_adapter(store.weights, adapter, prompt, SAMPLE_MAX_NEW_TOKENS)
    assert completion == samples[-1]["completion"]


def test_bad_training_data_fails_with_its_line_number_and_no_trainer_pod(
    cluster: Cluster, operator: OperatorProcess, store: LocalStore
) -> None:
    lines = DATA.read_text().splitlines()
    lines[4] = json.dumps({"prompt": "Customer: Hello?\nAgent:"})
    bad_data = f"s3://{OUTPUT_BUCKET}/uploads/{cluster.namespace}/bad.jsonl"
    store.s3.filesystem().pipe(bad_data.removeprefix("s3://"), ("\n".join(lines) + "\n").encode())
    name = "bad-data"
    with StatusHistory(cluster.api, cluster.namespace, name) as history:
        cluster.create(name, demo_spec(input={"train_data": bad_data}))
        failed = cluster.wait_phase(name, "Failed", timeout=TRAINING_TIMEOUT)

    error = failed["error"]
    assert (error["reason"], error["message"], error["exitCode"]) == (
        "InvalidTrainingData",
        'train_data line 5: missing "completion"',
        65,
    )
    assert error["pod"].startswith(f"{name}-validate-")
    assert [job.metadata.name for job in cluster.jobs(name)] == [f"{name}-validate"]
    assert not cluster.pods(name, "training")
    assert "Running" not in history.phases()


def test_cancel_mid_training_ends_canceled_and_stops_the_trainer_process(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    name = cluster.create("cancel-me", demo_spec(input={"num_train_epochs": 40}))
    cluster.wait_status(
        name, lambda s: (s.get("progress") or {}).get("step", 0) >= 1, "training under way", TRAINING_TIMEOUT
    )
    pod = cluster.wait_pod(name, "training")
    pid = pod_process_id(cluster.devcluster.executor_dir, cluster.namespace, pod)
    assert pid is not None
    assert pid_alive(pid)

    cluster.patch_spec(name, cancel=True)

    canceled = cluster.wait_phase(name, "Canceled")
    wait_for(lambda: not pid_alive(pid), timeout=60, description=f"the trainer process {pid} to end")
    wait_for(lambda: not cluster.pods(name, "training"), timeout=60, description="the trainer pod to go")
    assert 1 <= canceled["progress"]["step"] < canceled["progress"]["totalSteps"]


def test_killed_trainer_is_retried_and_resumes_from_its_last_checkpoint(
    cluster: Cluster, operator: OperatorProcess, store: LocalStore
) -> None:
    name = cluster.create("resume-me", demo_spec())
    first = cluster.wait_pod(name, "training")
    pid: int = wait_for(
        lambda: pod_process_id(cluster.devcluster.executor_dir, cluster.namespace, first),
        timeout=TRAINING_TIMEOUT,
        description="the trainer process to start",
    )
    job = cluster.get(name)
    total_steps = demo_spec()["input"]["num_train_epochs"] * job["status"]["resolved"]["stepsPerEpoch"]
    checkpoints = f"{OUTPUT_BUCKET}/{cluster.namespace}/{name}/{job['metadata']['uid']}/checkpoints"
    filesystem = store.s3.filesystem()

    def complete_checkpoints() -> list[int]:
        filesystem.invalidate_cache()
        try:
            names = filesystem.ls(checkpoints, detail=False)
        except FileNotFoundError:
            return []
        steps = sorted(int(match.group(1)) for entry in names if (match := re.search(r"/step-(\d+)$", entry)))
        return [step for step in steps if filesystem.exists(f"{checkpoints}/step-{step}/COMPLETE")]

    def kill_between_checkpoints() -> int | None:
        """kill -9 once a checkpoint is complete and training is not; the process is frozen while the test looks,
        so nothing changes between the look and the kill."""
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            raise AssertionError("the trainer ended before the test could kill it after a checkpoint") from None
        try:
            complete = complete_checkpoints()
            if complete and complete[-1] < total_steps:
                os.kill(pid, signal.SIGKILL)
                return complete[-1]
            return None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    last_checkpoint: int = wait_for(
        kill_between_checkpoints, timeout=TRAINING_TIMEOUT, interval=0.05, description="a checkpoint to kill after"
    )

    done = cluster.wait_phase(name, "Succeeded", timeout=TRAINING_TIMEOUT)
    killed = cluster.core.read_namespaced_pod(first, cluster.namespace).status.container_statuses[0].state.terminated
    assert (killed.exit_code, killed.reason) == (137, "Error")
    assert done["restarts"] == 1
    assert "TrainerRestarted" in cluster.event_reasons(name)
    retry = cluster.wait_pod(name, "training", phase="Succeeded", exclude=frozenset({first}))
    log = read_pod_log(cluster.api, cluster.namespace, retry)
    assert f"resuming from the step {last_checkpoint} checkpoint at s3://{checkpoints}/step-{last_checkpoint}" in log
    steps = [event.step for event in map(parse_line, log.splitlines()) if isinstance(event, ProgressEvent)]
    assert steps == list(range(last_checkpoint + 1, total_steps + 1))
    assert done["progress"]["step"] == total_steps


def test_two_pods_train_one_model_with_ranks_zero_and_one_over_gloo(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    name = cluster.create("two-pods", demo_spec(resources={"nodes": 2}))
    done = cluster.wait_phase(name, "Succeeded", timeout=TRAINING_TIMEOUT)

    pods = {
        int(pod.metadata.annotations["batch.kubernetes.io/job-completion-index"]): pod
        for pod in cluster.pods(name, "training")
    }
    assert sorted(pods) == [0, 1]
    assert {pod.status.phase for pod in pods.values()} == {"Succeeded"}
    assert pods[0].spec.node_name != pods[1].spec.node_name  # one process on each of two executor nodes
    # Rank 1 reaches rank 0 by its DNS name behind the headless Service; the executor maps it to loopback.
    rank1_env = {variable.name: variable.value for variable in pods[1].spec.containers[0].env}
    assert rank1_env["MASTER_ADDR"] == f"{name}-train-0.{name}-workers"
    assert rank1_env["NPROC_PER_NODE"] == "1"
    assert done["resolved"]["worldSize"] == 2
    rank0_log = read_pod_log(cluster.api, cluster.namespace, pods[0].metadata.name)
    rank0_events = [parse_line(line) for line in rank0_log.splitlines()]
    start = next(event for event in rank0_events if isinstance(event, StartEvent))
    assert start.world_size == 2  # torch.distributed's world: both pods joined one gloo group
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {file["path"] for file in done["output"]["files"]}
