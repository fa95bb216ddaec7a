"""`make demo`: the operator runs the minimal example FineTuneJob on the local cluster's simulated A40 nodes.

The simulated (kwok) nodes cannot run the trainer, so this demo plays the trainer's part: it feeds a recorded event
stream of a real trainer run (examples/demo/) into the simulated pod's log and ends the pod the way the trainer
does. Everything else is real: the operator, the API server, the Job controller, the scheduler.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kwokpods import register_namespace_logs, terminate_pod, wait_for
from testcluster import DevCluster, running_cluster

from finetune_contract.protocol import OutputEvent, parse_line, termination_message
from finetune_operator.api import GROUP, PLURAL, VERSION

ROOT = Path(__file__).resolve().parents[2]
RECORDING = ROOT / "examples" / "demo"
EXAMPLE = ROOT / "examples" / "finetunejob.yaml"
NAMESPACE = "finetune-demo"
NAME = "llama2-7b-support-bot"


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the recorded run plays")
    args = parser.parse_args(argv)
    with running_cluster(stop_if_started=False) as cluster:
        return run_demo(cluster, args.seconds)


def run_demo(cluster: DevCluster, seconds: float) -> int:
    core: Any = client.CoreV1Api(cluster.api)
    say(f"Cluster nodes ({cluster.server})")
    print(cluster.kubectl_run("get", "nodes", "-L", "nvidia.com/gpu.product", "-L", "nvidia.com/gpu.count").stdout)
    cluster.kubectl_run("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.kubectl_run("wait", "--for=condition=Established", "crd/finetunejobs.finetune.dev")
    fresh_namespace(cluster, core)
    logs = register_namespace_logs(cluster.api, NAMESPACE, cluster.pod_log_file(NAMESPACE, "demo"))

    say("Starting the operator (finetune-operator run)")
    operator_log = cluster.pod_log_dir.parent / "demo-operator.log"
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "FINETUNE_DEFAULT_DESTINATION": "s3://finetune-outputs"}
    command = [sys.executable, "-m", "finetune_operator.cli", "run", "--namespace", NAMESPACE, "--liveness", ""]
    with operator_log.open("w") as log_file:
        operator = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    watch = None
    try:
        say(f"kubectl apply -f {EXAMPLE.relative_to(ROOT)}")
        print(cluster.kubectl_run("apply", "-n", NAMESPACE, "-f", str(EXAMPLE)).stdout)
        say("kubectl get ftj -w  (every status change the operator writes)")
        watch = subprocess.Popen(
            [str(cluster.kubectl), f"--kubeconfig={cluster.kubeconfig}", "get", "ftj", "-n", NAMESPACE, "-w"]
        )
        play_trainer(cluster, core, logs.write, seconds)
        wait_for(lambda: phase(cluster) in ("Succeeded", "Failed"), timeout=60, description="the job to finish")
        time.sleep(1.5)
    finally:
        if watch is not None:
            watch.terminate()
        operator.terminate()
        operator.wait(timeout=30)
    say("kubectl describe ftj (status)")
    described = cluster.kubectl_run("describe", "ftj", "-n", NAMESPACE, NAME).stdout
    print(described[described.find("Status:") :])
    say(
        f"Done: {phase(cluster)}. The cluster stays up (KUBECONFIG={cluster.kubeconfig}); `make cluster-down` stops it."
    )
    return 0 if phase(cluster) == "Succeeded" else 1


def play_trainer(cluster: DevCluster, core: Any, write: Any, seconds: float) -> None:
    print(
        "\n    NOTE: the simulated A40 nodes cannot run the trainer. This demo plays a recorded event stream of a\n"
        f"    real trainer run ({RECORDING.relative_to(ROOT)}/) into the simulated pod's log, then ends the pod\n"
        "    with the trainer's exit code and termination message.\n",
        flush=True,
    )
    validation = wait_for_pod(core, "validation")
    terminate_pod(cluster.api, NAMESPACE, validation, 0, message=(RECORDING / "validate-termination.json").read_text())
    trainer = wait_for_pod(core, "training")
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


def wait_for_pod(core: Any, component: str) -> str:
    selector = f"finetune.dev/job-name={NAME},app.kubernetes.io/component={component}"

    def running() -> str | None:
        pods = core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
        return next((pod.metadata.name for pod in pods if pod.status.phase == "Running"), None)

    name: str = wait_for(running, timeout=120, interval=0.5, description=f"the {component} pod to run")
    return name


def phase(cluster: DevCluster) -> str:
    custom: Any = client.CustomObjectsApi(cluster.api)
    found = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, NAME)
    return str((found.get("status") or {}).get("phase", ""))


def fresh_namespace(cluster: DevCluster, core: Any) -> None:
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
