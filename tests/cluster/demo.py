"""`make demo`: the operator fine-tunes a tiny Llama for real on the local cluster.

The local S3-compatible server gets a tiny random-initialised Llama and the support-desk rows of examples/demo/;
the operator runs examples/demo/finetunejob.yaml, whose pods run on an executor node's CPU (see
tests/cluster/README.md): `finetune-trainer validate`, then `finetune-trainer train`. The demo shows the phases,
steps and loss as `kubectl get ftj -w` prints them, then the files at `status.output.weights` with the sha256 of
what it downloads from there, and a completion of the validation prompt by the adapter, loaded with PEFT.

`--replay` plays a recorded trainer run (examples/demo/train.log, made by record_demo.py) into the log of a
simulated A40 pod instead, for the default FineTuneJob on 8 GPUs (examples/finetunejob.yaml).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kwokpods import register_namespace_logs, terminate_pod, wait_for
from localtraining import (
    MANIFEST,
    OPERATOR_ENV,
    buckets,
    build_tiny_llama,
    complete_with_adapter,
    download_output,
    manifest,
    publish_inputs,
    storage_access,
)
from s3server import running_s3_server
from testcluster import DevCluster, install_crds, running_cluster

from finetune_contract.protocol import OutputEvent, parse_line, termination_message
from finetune_operator.api import GROUP, PLURAL, VERSION

ROOT = Path(__file__).resolve().parents[2]
RECORDING = ROOT / "examples" / "demo"
REPLAY_EXAMPLE = ROOT / "examples" / "finetunejob.yaml"
NAMESPACE = "finetune-demo"
FINISHED = ("Succeeded", "Failed", "Canceled")


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replay", action="store_true", help="play a recorded trainer run on simulated A40 nodes")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the recorded run plays (--replay)")
    args = parser.parse_args(argv)
    with running_cluster(stop_if_started=False) as cluster:
        return replay(cluster, args.seconds) if args.replay else train_for_real(cluster)


# --- the real run ----------------------------------------------------------------------------------------------


def train_for_real(cluster: DevCluster) -> int:
    core: Any = client.CoreV1Api(cluster.api)
    prepare(cluster, core, ("-L", "devcluster.finetune.dev/executor"))
    job = manifest()
    name, prompt = job["metadata"]["name"], job["spec"]["input"]["validation_prompt"]
    with tempfile.TemporaryDirectory(prefix="finetune-demo-") as scratch, running_s3_server(*buckets()) as s3:
        say(f"A tiny random-initialised Llama and {job['spec']['input']['train_data']} in local S3 (moto)")
        weights = build_tiny_llama(Path(scratch) / "tiny-random-llama")
        publish_inputs(s3, weights)
        for line in s3.filesystem().find(_bucket_of(job["spec"]["model"]["weights"])):
            print(f"    s3://{line}")
        for obj in storage_access(s3):
            cluster.kubectl_run("apply", "-n", NAMESPACE, "-f", "-", stdin=yaml.safe_dump(obj))
        print(f"    endpoint and credentials for the pods: ConfigMap and Secret in namespace {NAMESPACE}")
        with running_operator(cluster, {**OPERATOR_ENV, "FINETUNE_PROGRESS_INTERVAL_SECONDS": "1"}):
            say(f"kubectl apply -f {MANIFEST.relative_to(ROOT)}   (resources.gpusPerNode: 0, on an executor node)")
            print(cluster.kubectl_run("apply", "-n", NAMESPACE, "-f", str(MANIFEST)).stdout)
            with watching(cluster):
                wait_for(lambda: phase(cluster, name) in FINISHED, timeout=600, description="the job to finish")
        show_status(cluster, name)
        print(cluster.kubectl_run("get", "pods", "-n", NAMESPACE, "-o", "wide").stdout)
        status = get(cluster, name).get("status") or {}
        if status.get("phase") != "Succeeded":
            return 1
        say(f"status.output.weights: {status['output']['weights']}")
        output_dir = Path(scratch) / "output"
        digests = download_output(s3, status["output"], output_dir)
        matches = True
        for file in status["output"]["files"]:
            same = digests[file["path"]] == file["sha256"]
            matches = matches and same
            mark = "sha256 matches status" if same else "SHA256 DIFFERS FROM STATUS"
            print(f"    {file['path']:<28} {file['size']:>9} bytes  {file['sha256']}  {mark}")
        say("The adapter, loaded with PEFT over the base weights, completes the validation prompt")
        completion = complete_with_adapter(weights, output_dir, prompt, max_new_tokens=24)
        print(f"    {prompt!r} -> {completion!r}")
    say(f"Done: Succeeded. The cluster stays up (KUBECONFIG={cluster.kubeconfig}); `make cluster-down` stops it.")
    return 0 if matches else 1


def _bucket_of(uri: str) -> str:
    return uri.removeprefix("s3://").rstrip("/")


# --- the recorded replay ---------------------------------------------------------------------------------------


def replay(cluster: DevCluster, seconds: float) -> int:
    core: Any = client.CoreV1Api(cluster.api)
    prepare(cluster, core, ("-L", "nvidia.com/gpu.product", "-L", "nvidia.com/gpu.count"))
    name = yaml.safe_load(REPLAY_EXAMPLE.read_text())["metadata"]["name"]
    logs = register_namespace_logs(cluster.api, NAMESPACE, cluster.pod_log_file(NAMESPACE, "demo"))
    with running_operator(cluster, {"FINETUNE_DEFAULT_DESTINATION": "s3://finetune-outputs"}):
        say(f"kubectl apply -f {REPLAY_EXAMPLE.relative_to(ROOT)}")
        print(cluster.kubectl_run("apply", "-n", NAMESPACE, "-f", str(REPLAY_EXAMPLE)).stdout)
        with watching(cluster):
            play_trainer(cluster, core, name, logs.write, seconds)
            wait_for(lambda: phase(cluster, name) in FINISHED, timeout=60, description="the job to finish")
    show_status(cluster, name)
    say(f"Done: {phase(cluster, name)}. The cluster stays up (KUBECONFIG={cluster.kubeconfig}).")
    return 0 if phase(cluster, name) == "Succeeded" else 1


def play_trainer(cluster: DevCluster, core: Any, name: str, write: Any, seconds: float) -> None:
    print(
        "\n    NOTE: the simulated A40 nodes cannot run the trainer. This replay plays a recorded event stream of a\n"
        f"    real trainer run ({RECORDING.relative_to(ROOT)}/) into the simulated pod's log, then ends the pod\n"
        "    with the trainer's exit code and termination message.\n",
        flush=True,
    )
    validation = wait_for_pod(core, name, "validation")
    terminate_pod(cluster.api, NAMESPACE, validation, 0, message=(RECORDING / "validate-termination.json").read_text())
    trainer = wait_for_pod(core, name, "training")
    lines = (RECORDING / "train.log").read_text().splitlines()
    # Time goes by between the trainer's events (its steps), not between its other lines (start-up chatter).
    pause = seconds / max(1, sum(parse_line(line) is not None for line in lines))
    output: OutputEvent | None = None
    for line in lines:
        write(line)
        event = parse_line(line)
        if isinstance(event, OutputEvent):
            output = event
        if event is not None:
            time.sleep(pause)
    if output is None:
        raise SystemExit("the recording has no output event")
    terminate_pod(cluster.api, NAMESPACE, trainer, 0, message=termination_message(output))


def wait_for_pod(core: Any, name: str, component: str) -> str:
    selector = f"finetune.dev/job-name={name},app.kubernetes.io/component={component}"

    def running() -> str | None:
        pods = core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
        return next((pod.metadata.name for pod in pods if pod.status.phase == "Running"), None)

    pod: str = wait_for(running, timeout=120, interval=0.5, description=f"the {component} pod to run")
    return pod


# --- both ------------------------------------------------------------------------------------------------------


def prepare(cluster: DevCluster, core: Any, node_columns: tuple[str, ...]) -> None:
    say(f"Cluster nodes ({cluster.server})")
    print(cluster.kubectl_run("get", "nodes", *node_columns).stdout)
    install_crds(cluster)
    fresh_namespace(core)


@contextmanager
def running_operator(cluster: DevCluster, settings: Mapping[str, str]) -> Iterator[None]:
    say("Starting the operator (finetune-operator run)")
    operator_log = cluster.pod_log_dir.parent / "demo-operator.log"
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), **settings}
    command = [sys.executable, "-m", "finetune_operator.cli", "run", "--namespace", NAMESPACE, "--liveness", ""]
    with operator_log.open("w") as log_file:
        operator = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        operator.terminate()
        operator.wait(timeout=30)


@contextmanager
def watching(cluster: DevCluster) -> Iterator[None]:
    say("kubectl get ftj -w  (every status change the operator writes)")
    watch = subprocess.Popen(
        [str(cluster.kubectl), f"--kubeconfig={cluster.kubeconfig}", "get", "ftj", "-n", NAMESPACE, "-w"]
    )
    try:
        yield
        time.sleep(1.5)  # the watch prints the last change
    finally:
        watch.terminate()
        watch.wait(timeout=30)


def show_status(cluster: DevCluster, name: str) -> None:
    say("kubectl describe ftj (status)")
    described = cluster.kubectl_run("describe", "ftj", "-n", NAMESPACE, name).stdout
    print(described[described.find("Status:") :])


def get(cluster: DevCluster, name: str) -> dict[str, Any]:
    custom: Any = client.CustomObjectsApi(cluster.api)
    found: dict[str, Any] = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
    return found


def phase(cluster: DevCluster, name: str) -> str:
    return str((get(cluster, name).get("status") or {}).get("phase", ""))


def fresh_namespace(core: Any) -> None:
    """The demo namespace, emptied of an earlier run's objects."""
    try:
        core.delete_namespace(NAMESPACE)
    except ApiException as error:
        if error.status != 404:
            raise

    def gone() -> bool:
        try:
            core.read_namespace(NAMESPACE)
        except ApiException as error:
            return bool(error.status == 404)
        return False

    wait_for(gone, timeout=120, interval=0.5, description="the previous demo namespace to go")
    core.create_namespace({"metadata": {"name": NAMESPACE}})
    wait_for(
        lambda: core.read_namespaced_service_account("default", NAMESPACE),
        timeout=60,
        description="the demo namespace's default ServiceAccount",
    )


if __name__ == "__main__":
    sys.exit(main())
