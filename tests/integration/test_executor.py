"""Executor nodes: their pods really run, as host processes, and report back as a kubelet would."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devcluster import pid_alive
from executor import pod_process_id
from kubernetes import client
from kwokpods import read_pod_log, wait_for, wait_for_pod_log, wait_for_pod_phase
from testcluster import DevCluster

pytestmark = pytest.mark.integration

EXECUTOR_PLACEMENT: dict[str, Any] = {
    "nodeSelector": {"devcluster.finetune.dev/executor": "true"},
    "tolerations": [{"key": "devcluster.finetune.dev/executor", "operator": "Exists", "effect": "NoSchedule"}],
}
# What the container reports: its env, and the contents of the files named by its arguments (container paths).
REPORT_SCRIPT = """
import json, os, sys
files = [open(path).read() for path in sys.argv[1:]]
names = ("POD_NAME", "INDEX", "GREETING", "PASSWORD", "CFG_mode", "MESSAGE", "HOME_DIR")
print(json.dumps({"env": {name: os.environ.get(name) for name in names}, "files": files}))
with open("/data/written-by-the-pod.txt", "w") as out:
    out.write("from the pod")
open("/scratch/note", "w").write("scratch")
print("a line on stderr", file=sys.stderr)
open("/dev/termination-log", "w").write("done: " + open("/scratch/note").read())
sys.exit(3)
"""


@pytest.fixture
def host_volume(devcluster: DevCluster, namespace: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A PersistentVolumeClaim bound to a hostPath PersistentVolume at a fresh host directory."""
    core: Any = client.CoreV1Api(devcluster.api)
    directory = tmp_path / "volume"
    directory.mkdir()
    volume = f"host-{uuid.uuid4().hex[:8]}"
    core.create_persistent_volume(
        {
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "hostPath": {"path": str(directory)},
                "claimRef": {"namespace": namespace, "name": "data"},
            },
        }
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "data"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "volumeName": volume,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    wait_for(
        lambda: core.read_namespaced_persistent_volume_claim("data", namespace).status.phase == "Bound",
        timeout=60,
        description="the claim to be bound",
    )
    yield "data", directory
    core.delete_persistent_volume(volume)


def test_pod_runs_its_command_with_env_and_volumes_and_reports_its_exit(
    devcluster: DevCluster, namespace: str, host_volume: tuple[str, Path]
) -> None:
    core: Any = client.CoreV1Api(devcluster.api)
    claim, claim_directory = host_volume
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "settings"}, "data": {"greeting": "hello", "mode": "fast"}}
    )
    core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}})
    pod = {
        "metadata": {"name": "reporter", "annotations": {"batch.kubernetes.io/job-completion-index": "1"}},
        "spec": {
            "restartPolicy": "Never",
            **EXECUTOR_PLACEMENT,
            "containers": [
                {
                    "name": "main",
                    "image": "registry.example/anything:1",
                    "command": ["python3", "-c", REPORT_SCRIPT],
                    "args": ["/etc/settings/greeting.txt", "/etc/creds/password", "/data/written-before"],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {
                            "name": "INDEX",
                            "valueFrom": {
                                "fieldRef": {
                                    "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                                }
                            },
                        },
                        {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
                        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                        {"name": "MESSAGE", "value": "$(GREETING) from $(POD_NAME)"},
                        {"name": "HOME_DIR", "value": "/scratch/home"},
                    ],
                    "envFrom": [{"prefix": "CFG_", "configMapRef": {"name": "settings"}}],
                    "volumeMounts": [
                        {"name": "settings", "mountPath": "/etc/settings", "readOnly": True},
                        {"name": "creds", "mountPath": "/etc/creds", "readOnly": True},
                        {"name": "scratch", "mountPath": "/scratch"},
                        {"name": "data", "mountPath": "/data"},
                    ],
                }
            ],
            "volumes": [
                {
                    "name": "settings",
                    "configMap": {"name": "settings", "items": [{"key": "greeting", "path": "greeting.txt"}]},
                },
                {"name": "creds", "secret": {"secretName": "creds"}},
                {"name": "scratch", "emptyDir": {}},
                {"name": "data", "persistentVolumeClaim": {"claimName": claim}},
            ],
        },
    }
    (claim_directory / "written-before").write_text("already on the volume")
    core.create_namespaced_pod(namespace, pod)

    finished = wait_for_pod_phase(devcluster.api, namespace, "reporter", ["Failed", "Succeeded"], timeout=60)
    terminated = finished.status.container_statuses[0].state.terminated
    assert (finished.status.phase, terminated.exit_code, terminated.reason) == ("Failed", 3, "Error")
    assert terminated.message == "done: scratch"
    log = read_pod_log(devcluster.api, namespace, "reporter")
    assert "a line on stderr" in log
    report = json.loads(next(line for line in log.splitlines() if line.startswith("{")))
    assert report["files"] == ["hello", "s3cret", "already on the volume"]
    env = report["env"]
    assert (env["POD_NAME"], env["INDEX"], env["GREETING"], env["PASSWORD"]) == ("reporter", "1", "hello", "s3cret")
    assert (env["CFG_mode"], env["MESSAGE"]) == ("fast", "hello from reporter")
    # A container path in an env value is mapped under the pod's directory, like the paths in the arguments.
    assert env["HOME_DIR"].endswith("/volumes/scratch/home")
    assert (claim_directory / "written-by-the-pod.txt").read_text() == "from the pod"


def test_a_failed_container_without_a_message_reports_the_end_of_its_log(
    devcluster: DevCluster, namespace: str
) -> None:
    core: Any = client.CoreV1Api(devcluster.api)
    script = "import sys; print('step 1'); print('out of patience', file=sys.stderr); sys.exit(2)"
    container = {"name": "main", "image": "registry.example/anything:1", "command": ["python3", "-c", script]}
    for name, policy in (("fallback", "FallbackToLogsOnError"), ("file-only", "File")):
        spec = {
            "restartPolicy": "Never",
            **EXECUTOR_PLACEMENT,
            "containers": [{**container, "terminationMessagePolicy": policy}],
        }
        core.create_namespaced_pod(namespace, {"metadata": {"name": name}, "spec": spec})

    messages = {}
    for name in ("fallback", "file-only"):
        pod = wait_for_pod_phase(devcluster.api, namespace, name, ["Failed", "Succeeded"], timeout=60)
        terminated = pod.status.container_statuses[0].state.terminated
        assert (pod.status.phase, terminated.exit_code, terminated.reason) == ("Failed", 2, "Error")
        messages[name] = terminated.message or ""
    assert sorted(messages["fallback"].splitlines()) == ["out of patience", "step 1"]
    assert messages["file-only"] == ""


def test_deleting_a_pod_kills_its_process(devcluster: DevCluster, namespace: str) -> None:
    core: Any = client.CoreV1Api(devcluster.api)
    sleeper = "import time; print('sleeping', flush=True); time.sleep(600)"
    pod = {
        "metadata": {"name": "sleeper"},
        "spec": {
            "restartPolicy": "Never",
            **EXECUTOR_PLACEMENT,
            "containers": [
                {"name": "main", "image": "registry.example/anything:1", "command": ["python3", "-c", sleeper]}
            ],
        },
    }
    core.create_namespaced_pod(namespace, pod)
    wait_for_pod_log(devcluster.api, namespace, "sleeper", "sleeping", timeout=60)
    pid = pod_process_id(devcluster.executor_dir, namespace, "sleeper")
    assert pid is not None
    assert pid_alive(pid)

    core.delete_namespaced_pod("sleeper", namespace)

    wait_for(lambda: not pid_alive(pid), timeout=60, description=f"process {pid} of the deleted pod to end")
