#!/usr/bin/env python3
"""The executor of the local cluster's executor nodes: it runs their pods as host processes.

kwok still plays the kubelet of these nodes (node and pod status, `kubectl logs`). The executor does what kwok
cannot: when a pod on one of its nodes is Running it starts the container's command (hostpod.py says how a pod
becomes a host process), streams its stdout and stderr into the CRI log file that kwok serves for the pod, and when
the process exits it reports the exit code, reason and termination message through kwok's pod-terminate stage
(the devcluster.finetune.dev/exit-code annotations, see kwok-stages.yaml), as a kubelet would. Deleting the pod
kills the process (SIGTERM to its process group, SIGKILL after the grace period).

`devcluster.py up` starts it with the Python environment it runs in (the trainer's):

    executor.py --kubeconfig FILE --state-dir DIR --pod-log-dir DIR --nodes exec-node-0,exec-node-1

Each pod gets a directory `<state-dir>/pods/<namespace>_<name>_<uid>/` (volumes, home, termination log, and `pid`,
the process id of the container's process); it is removed once the pod is gone.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from hostpod import (
    TRAINER_DOCKERFILE,
    ClusterObjects,
    HostProcess,
    Image,
    PodDirectory,
    StartError,
    config_map_contents,
    prepare,
    read_dockerfile,
    references,
    secret_contents,
)
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from kwokpods import cri_log_line, register_pod_logs, terminate_pod
from testcluster import new_api_client

log = logging.getLogger("executor")

READY_FILE = "ready"
PID_FILE = "pid"
# A kubelet reports a container that could not start with this exit code and reason (as containerd does).
START_ERROR_EXIT_CODE = 128
START_ERROR_REASON = "StartError"
# A kubelet's FallbackToLogsOnError takes at most the last 80 lines and 2048 bytes of the log.
FALLBACK_LINES = 80
FALLBACK_BYTES = 2048
TERMINATION_MESSAGE_LIMIT = 4096
DEFAULT_GRACE_SECONDS = 30
WATCH_SECONDS = 300


def pod_directory(state_dir: Path, namespace: str, name: str, uid: str) -> PodDirectory:
    return PodDirectory(state_dir / "pods" / f"{namespace}_{name}_{uid}")


def pod_process_id(state_dir: Path, namespace: str, name: str) -> int | None:
    """The host process id of the pod's container while the executor runs it (None before it starts)."""
    for pid_file in (state_dir / "pods").glob(f"{namespace}_{name}_*/{PID_FILE}"):
        try:
            return int(pid_file.read_text())
        except (OSError, ValueError):
            return None
    return None


class PodRun:
    """One pod's container, from the pod's Running to the process's exit."""

    def __init__(self, executor: Executor, pod: Mapping[str, Any]) -> None:
        self.executor = executor
        self.pod = pod
        metadata = pod["metadata"]
        self.namespace, self.name, self.uid = metadata["namespace"], metadata["name"], metadata["uid"]
        self.directory = pod_directory(executor.state_dir, self.namespace, self.name, self.uid)
        self.running = threading.Event()
        self.deleted = threading.Event()
        self.finished = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._tail: collections.deque[str] = collections.deque(maxlen=FALLBACK_LINES)
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, grace_seconds: float) -> None:
        """The pod is being deleted: SIGTERM the process group now, SIGKILL it after the grace period."""
        with self._lock:
            self._stopping = True
            process = self._process
        self.running.set()  # wakes a run still waiting for Running, which then does not start
        if process is None or process.poll() is not None:
            return
        log.info("%s/%s: pod deleted, stopping process %d", self.namespace, self.name, process.pid)
        _signal_group(process.pid, signal.SIGTERM if grace_seconds > 0 else signal.SIGKILL)
        if grace_seconds > 0:
            timer = threading.Timer(grace_seconds, _signal_group, (process.pid, signal.SIGKILL))
            timer.daemon = True
            timer.start()

    def _run(self) -> None:
        try:
            logs = self.executor.register_logs(self.pod)
            self.running.wait()
            with self._lock:
                if self._stopping:
                    return
            try:
                host = prepare(
                    self.executor.current_pod(self.namespace, self.name) or self.pod,
                    self.executor.objects_for(self.pod),
                    self.directory,
                    self.executor.image,
                    os.environ,
                )
            except StartError as error:
                log.info("%s/%s: cannot start: %s", self.namespace, self.name, error)
                self._report(START_ERROR_EXIT_CODE, START_ERROR_REASON, str(error))
                return
            code = self._execute(host, logs)
            message = _termination_message(host.termination_log)
            if not message and code != 0 and host.fallback_to_logs:
                tail = "\n".join(self._tail).encode()[-FALLBACK_BYTES:]
                message = tail.decode("utf-8", errors="ignore")
            with self._lock:
                stopping = self._stopping
            if not stopping:
                self._report(code, "Completed" if code == 0 else "Error", message)
        except Exception:
            log.exception("%s/%s: the executor failed to run the pod", self.namespace, self.name)
        finally:
            self.finished.set()
            if self.deleted.is_set():
                self.remove_directory()

    def _execute(self, host: HostProcess, logs: Path) -> int:
        with self._lock:
            if self._stopping:
                return 137
            self._process = subprocess.Popen(
                host.argv,
                env=host.env,
                cwd=host.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group: deleting the pod kills every process it started
            )
        process = self._process
        (self.directory.root / PID_FILE).write_text(str(process.pid))
        log.info("%s/%s: started process %d: %s", self.namespace, self.name, process.pid, " ".join(host.argv))
        assert process.stdout is not None
        assert process.stderr is not None
        write_lock = threading.Lock()
        with logs.open("a", encoding="utf-8") as log_file:
            pumps = [
                threading.Thread(target=self._pump, args=(stream, name, log_file, write_lock), daemon=True)
                for stream, name in ((process.stdout, "stdout"), (process.stderr, "stderr"))
            ]
            for pump in pumps:
                pump.start()
            returncode = process.wait()
            # The container ends with its first process, as a PID namespace does: what it left behind goes too.
            _signal_group(process.pid, signal.SIGKILL)
            for pump in pumps:
                pump.join()
        code = returncode if returncode >= 0 else 128 - returncode  # killed by signal n: 128 + n, as a shell says
        log.info("%s/%s: process %d exited with code %d", self.namespace, self.name, process.pid, code)
        return code

    def _pump(self, stream: IO[bytes], name: str, log_file: IO[str], write_lock: threading.Lock) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            with write_lock:
                log_file.write(cri_log_line(line, stream=name))
                log_file.flush()
                self._tail.append(line)

    def _report(self, exit_code: int, reason: str, message: str) -> None:
        try:
            terminate_pod(self.executor.api, self.namespace, self.name, exit_code, reason=reason, message=message)
        except ApiException as error:
            if error.status != 404:
                raise

    def remove_directory(self) -> None:
        shutil.rmtree(self.directory.root, ignore_errors=True)


def _termination_message(path: Path) -> str:
    try:
        return path.read_bytes()[:TERMINATION_MESSAGE_LIMIT].decode("utf-8", errors="replace")
    except OSError:
        return ""


def _signal_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


class Executor:
    def __init__(self, api: client.ApiClient, state_dir: Path, pod_log_dir: Path, nodes: frozenset[str]) -> None:
        self.api = api
        self.core: Any = client.CoreV1Api(api)
        self.state_dir = state_dir
        self.pod_log_dir = pod_log_dir
        self.nodes = nodes
        self.image: Image = read_dockerfile(TRAINER_DOCKERFILE)
        self.runs: dict[str, PodRun] = {}

    # --- what a pod needs from the API server

    def register_logs(self, pod: Mapping[str, Any]) -> Path:
        metadata = pod["metadata"]
        log_file = self.pod_log_dir / metadata["namespace"] / metadata["name"] / f"{metadata['uid']}.log"
        return register_pod_logs(
            self.api, metadata["namespace"], metadata["name"], log_file, owner_uid=metadata["uid"]
        ).path

    def current_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The pod as it is now (its IP and Running status came after the event that started its run)."""
        try:
            response = self.core.read_namespaced_pod(name, namespace, _preload_content=False)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        pod: dict[str, Any] = json.loads(response.data)
        return pod

    def objects_for(self, pod: Mapping[str, Any]) -> ClusterObjects:
        namespace = pod["metadata"]["namespace"]
        wanted = references(pod)
        config_maps = {}
        for name in wanted.config_maps:
            found = self._read(self.core.read_namespaced_config_map, name, namespace)
            if found is not None:
                config_maps[name] = config_map_contents(found)
        secrets = {}
        for name in wanted.secrets:
            found = self._read(self.core.read_namespaced_secret, name, namespace)
            if found is not None:
                secrets[name] = secret_contents(found)
        claim_paths = {}
        for name in wanted.claims:
            claim = self._read(self.core.read_namespaced_persistent_volume_claim, name, namespace)
            volume_name = ((claim or {}).get("spec") or {}).get("volumeName")
            volume = self._read(self.core.read_persistent_volume, volume_name) if volume_name else None
            host_path = ((volume or {}).get("spec") or {}).get("hostPath", {}).get("path")
            if host_path:
                claim_paths[name] = Path(host_path)
        services = json.loads(self.core.list_namespaced_service(namespace, _preload_content=False).data)["items"]
        headless = frozenset(s["metadata"]["name"] for s in services if s["spec"].get("clusterIP") == "None")
        token = self._service_account_token(pod) if wanted.service_account_token else None
        return ClusterObjects(config_maps, secrets, claim_paths, headless, token)

    def _service_account_token(self, pod: Mapping[str, Any]) -> str:
        """A token of the pod's ServiceAccount bound to the pod, as the kubelet requests one (TokenRequest)."""
        metadata = pod["metadata"]
        account = pod["spec"].get("serviceAccountName") or "default"
        bound = {"apiVersion": "v1", "kind": "Pod", "name": metadata["name"], "uid": metadata["uid"]}
        response = self.core.create_namespaced_service_account_token(
            account, metadata["namespace"], {"spec": {"audiences": [], "boundObjectRef": bound}}, _preload_content=False
        )
        token: str = json.loads(response.data)["status"]["token"]
        return token

    @staticmethod
    def _read(reader: Any, *args: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = json.loads(reader(*args, _preload_content=False).data)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return found

    # --- the watch

    def handle(self, event_type: str, pod: Mapping[str, Any]) -> None:
        if pod.get("spec", {}).get("nodeName") not in self.nodes:
            return
        metadata = pod["metadata"]
        uid = metadata["uid"]
        run = self.runs.get(uid)
        if event_type == "DELETED" or metadata.get("deletionTimestamp"):
            if run is not None:
                if event_type == "DELETED":
                    self._forget(run)
                    run.stop(0)
                else:
                    run.stop(_grace_seconds(pod))
            return
        phase = (pod.get("status") or {}).get("phase")
        if run is None:
            if phase in ("Succeeded", "Failed"):
                return
            run = PodRun(self, pod)
            self.runs[uid] = run
            run.start()
        if phase == "Running":
            run.running.set()

    def _forget(self, run: PodRun) -> None:
        self.runs.pop(run.uid, None)
        run.deleted.set()
        if run.finished.is_set():
            run.remove_directory()

    def sync(self) -> str:
        """List every pod, act on each, forget runs whose pods are gone; returns the list's resourceVersion."""
        listed = json.loads(self.core.list_pod_for_all_namespaces(_preload_content=False).data)
        seen = set()
        for pod in listed["items"]:
            seen.add(pod["metadata"]["uid"])
            self.handle("ADDED", pod)
        for uid in set(self.runs) - seen:
            run = self.runs[uid]
            self._forget(run)
            run.stop(0)
        version: str = listed["metadata"]["resourceVersion"]
        return version

    def events(self, resource_version: str) -> Iterator[tuple[str, dict[str, Any]]]:
        stream = watch.Watch().stream(
            self.core.list_pod_for_all_namespaces, resource_version=resource_version, timeout_seconds=WATCH_SECONDS
        )
        for event in stream:
            if event["type"] == "ERROR":
                raise ApiException(status=event["raw_object"].get("code", 500), reason="watch error")
            yield event["type"], event["raw_object"]

    def watch_forever(self, ready: Path) -> None:
        while True:
            try:
                version = self.sync()
                ready.touch()
                for event_type, pod in self.events(version):
                    self.handle(event_type, pod)
            except ApiException as error:
                if error.status != 410:  # 410: the watch's resourceVersion expired; list again
                    log.warning("watch failed (%s); listing again", error)
            except Exception:
                log.exception("watch failed; listing again")
                threading.Event().wait(1)

    def stop_all(self, grace_seconds: float) -> None:
        """SIGTERM every pod's processes, SIGKILL what is left after the grace period (the executor is stopping)."""
        for run in list(self.runs.values()):
            run.stop(0 if grace_seconds <= 0 else grace_seconds)
        for run in list(self.runs.values()):
            run.finished.wait(grace_seconds + 2)


def _grace_seconds(pod: Mapping[str, Any]) -> float:
    grace = pod["metadata"].get("deletionGracePeriodSeconds")
    if grace is None:
        grace = pod["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
    return float(grace)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--pod-log-dir", type=Path, required=True)
    parser.add_argument("--nodes", required=True, help="comma-separated names of the executor nodes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    ready = args.state_dir / READY_FILE
    ready.unlink(missing_ok=True)
    executor = Executor(
        new_api_client(args.kubeconfig), args.state_dir, args.pod_log_dir, frozenset(args.nodes.split(","))
    )
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    threading.Thread(target=executor.watch_forever, args=(ready,), name="watch", daemon=True).start()
    log.info("running the pods of nodes %s", args.nodes)
    stopping.wait()
    log.info("stopping: killing the processes of %d pods", len(executor.runs))
    executor.stop_all(grace_seconds=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
