"""A simulated trainer: plays `finetune-trainer` in the pods that run on kwok's simulated nodes.

One pod watch and one Job watch (informer.py) on a namespace, one scheduler thread and a small pool for API calls:
no thread per pod, so it keeps up with thousands of pods, and it outlives API server outages (the watches list
again; a failed call is tried again a moment later). For each pod of the operator's children (and of the bare
Jobs of the benchmark, labelled `app.kubernetes.io/managed-by=finetune-bench`):

- a validation pod, once Running, exits 0 after `validation_seconds` with a `validated` termination message;
- a training pod of completion index 0 (rank 0) gets a log served by kwok (kwokpods.register_pod_logs) that grows
  by a `start` event and then one `progress` event every `step_seconds`; after the last step (`training_seconds`
  in all) it prints an `output` event and exits 0 with the `output` termination message. The weights URI embeds
  the pod's Job's UID (`s3://sim/<job-uid>/`), so that an output reported on another run's FineTuneJob is caught.
  A rank-0 pod that replaces an evicted one resumes from the step its predecessor reached, as from a checkpoint;
- the other training pods exit 0 after `training_seconds`.

A pod on a node in `stopped_nodes` is left alone (its kubelet is dead: its log stops growing, it never exits).
Everything seen and done is kept in `PodRecord`s and `JobRecord`s for the checks of the benchmark and fault run.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from informer import Informer, Obj
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kwokpods import PodLogs, register_pod_logs, terminate_pod
from testcluster import new_api_client

from finetune_contract.protocol import (
    OutputEvent,
    OutputFile,
    ProgressEvent,
    ResolvedRun,
    StartEvent,
    ValidatedEvent,
    encode,
    termination_message,
)
from finetune_operator.api import API_VERSION, KIND
from finetune_operator.conventions import (
    COMPLETION_INDEX_ANNOTATION,
    COMPONENT_LABEL,
    MANAGED_BY_LABEL,
    MANAGER_NAME,
    TRAINER_CONTAINER,
    Component,
)

log = logging.getLogger(__name__)

# The manager label of the benchmark's bare Jobs: played like the operator's, never watched by it.
BENCH_MANAGER = "finetune-bench"
POD_SELECTOR = f"{MANAGED_BY_LABEL} in ({MANAGER_NAME},{BENCH_MANAGER})"
OUTPUT_PREFIX = "s3://sim/"
SIMULATED_DESTINATION = OUTPUT_PREFIX.rstrip("/")
# What the FineTuneJobs played by the simulated trainer ask for: the defaults (one node of 8 A40s, LoRA).
SIMULATED_SPEC: dict[str, Any] = {"input": {"train_data": "https://datasets.example.com/sim/train.jsonl"}}
WORLD_SIZE = 8
RETRY_SECONDS = 2.0


def finetunejob_manifest(name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec or SIMULATED_SPEC}


def output_uri(job_uid: str) -> str:
    """The weights URI a simulated trainer of this Job reports."""
    return f"{OUTPUT_PREFIX}{job_uid}/"


def job_uid_of_output(uri: str) -> str | None:
    """The Job UID an output URI of the simulated trainer names; None for any other URI."""
    if not uri.startswith(OUTPUT_PREFIX):
        return None
    return uri.removeprefix(OUTPUT_PREFIX).strip("/") or None


@dataclass(frozen=True)
class TrainerTiming:
    validation_seconds: float = 1.0
    training_seconds: float = 20.0
    step_seconds: float = 1.0

    @property
    def total_steps(self) -> int:
        return max(1, round(self.training_seconds / self.step_seconds))


@dataclass
class JobRecord:
    """A Job of the operator (or a bare one of the benchmark), as its watch saw it."""

    namespace: str
    name: str
    uid: str
    component: str
    # the controller ownerReference: the FineTuneJob for the operator's Jobs, None for bare ones
    owner_uid: str | None
    owner_name: str | None
    seen_at: float
    finished_at: float | None = None
    succeeded: bool | None = None
    deleted_at: float | None = None


@dataclass
class PodRecord:
    """A trainer pod, what it did and what became of it. Sequence numbers order the pod watch's events."""

    namespace: str
    name: str
    uid: str
    component: str
    index: int | None
    job_name: str | None
    job_uid: str | None
    node: str | None = None
    log_file: Path | None = None
    running_seq: int | None = None
    running_at: float | None = None
    ended_seq: int | None = None
    ended_at: float | None = None
    steps_written: int = 0
    # the step of the last progress event it printed, and when
    last_step: int = 0
    last_step_at: float | None = None
    output_uri: str | None = None
    exit_requested_at: float | None = None
    exit_code: int | None = None
    exit_message: str | None = None
    deleted: bool = False

    @property
    def rank0_trainer(self) -> bool:
        return self.component == Component.TRAINING.value and self.index == 0

    @property
    def exited_with_output(self) -> bool:
        """The pod's trainer ended with exit code 0 and published its output."""
        return self.exit_code == 0 and self.output_uri is not None


@dataclass(order=True)
class _Due:
    at: float
    seq: int
    action: Callable[[], None] = field(compare=False)


class SimTrainer:
    """Plays the trainer in the namespace's trainer pods until `stop`; see the module's docstring."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        log_dir: Path,
        timing: TrainerTiming = TrainerTiming(),
        *,
        workers: int = 4,
    ) -> None:
        self.namespace = namespace
        self.timing = timing
        self.stopped_nodes: set[str] = set()
        self._api = new_api_client(kubeconfig)
        self._log_dir = log_dir
        self._lock = threading.Lock()
        self._pods: dict[str, PodRecord] = {}
        self._jobs: dict[str, JobRecord] = {}
        # the step each Job's rank 0 reached: a replacement pod resumes there
        self._job_steps: dict[str, int] = {}
        self._writers: dict[str, PodLogs] = {}
        self._pod_seq = itertools.count(1)
        self._due: list[_Due] = []
        self._due_seq = itertools.count()
        self._wake = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="simtrainer")
        self._scheduler = threading.Thread(target=self._run_scheduler, name="simtrainer-scheduler", daemon=True)
        core = client.CoreV1Api(self._api)
        batch = client.BatchV1Api(self._api)
        self._pod_informer = Informer(
            f"pods/{namespace}",
            functools.partial(core.list_namespaced_pod, namespace),
            self._on_pod,
            label_selector=POD_SELECTOR,
        )
        self._job_informer = Informer(
            f"jobs/{namespace}",
            functools.partial(batch.list_namespaced_job, namespace),
            self._on_job,
            label_selector=POD_SELECTOR,
        )

    # ------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._scheduler.start()
        self._job_informer.start()
        self._pod_informer.start()
        self._job_informer.wait_synced()
        self._pod_informer.wait_synced()

    def stop(self) -> None:
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        self._pod_informer.stop()
        self._job_informer.stop()
        self._scheduler.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        closing: Any = self._api
        closing.close()

    def __enter__(self) -> SimTrainer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------- results

    def pods(self) -> list[PodRecord]:
        with self._lock:
            return [replace(record) for record in self._pods.values()]

    def jobs(self) -> list[JobRecord]:
        with self._lock:
            return [replace(record) for record in self._jobs.values()]

    # ------------------------------------------------------------------------------------------- watches

    def _on_job(self, kind: str, job: Obj) -> None:
        metadata = job["metadata"]
        owner = _controller(metadata)
        now = time.monotonic()
        with self._lock:
            record = self._jobs.get(metadata["uid"])
            if record is None:
                record = JobRecord(
                    namespace=metadata["namespace"],
                    name=metadata["name"],
                    uid=metadata["uid"],
                    component=(metadata.get("labels") or {}).get(COMPONENT_LABEL, ""),
                    owner_uid=owner["uid"] if owner else None,
                    owner_name=owner["name"] if owner else None,
                    seen_at=now,
                )
                self._jobs[record.uid] = record
            if kind == "DELETED":
                record.deleted_at = record.deleted_at or now
            finished = _job_finished(job)
            if finished is not None and record.finished_at is None:
                record.finished_at = now
                record.succeeded = finished

    def _on_pod(self, kind: str, pod: Obj) -> None:
        metadata, status = pod["metadata"], pod.get("status") or {}
        seq = next(self._pod_seq)
        now = time.monotonic()
        with self._lock:
            record = self._pods.get(metadata["uid"])
            if record is None:
                record = self._new_record(pod)
                self._pods[record.uid] = record
                if record.rank0_trainer:
                    self._submit(functools.partial(self._register_logs, record.uid))
            record.node = (pod.get("spec") or {}).get("nodeName") or record.node
            phase = status.get("phase")
            ended = kind == "DELETED" or phase in ("Succeeded", "Failed")
            if phase == "Running" and record.running_seq is None and not ended:
                record.running_seq, record.running_at = seq, now
                self._schedule_run(record)
            if phase in ("Succeeded", "Failed"):
                terminated = _terminated(status)
                if terminated is not None and record.exit_code is None:
                    record.exit_code = terminated.get("exitCode")
                    record.exit_message = terminated.get("message")
            if ended and record.ended_seq is None:
                record.ended_seq, record.ended_at = seq, now
            if kind == "DELETED":
                record.deleted = True

    def _new_record(self, pod: Obj) -> PodRecord:
        metadata = pod["metadata"]
        index = (metadata.get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION)
        owner = _controller(metadata)
        return PodRecord(
            namespace=metadata["namespace"],
            name=metadata["name"],
            uid=metadata["uid"],
            component=(metadata.get("labels") or {}).get(COMPONENT_LABEL, ""),
            index=int(index) if index is not None else None,
            job_name=owner["name"] if owner else None,
            job_uid=owner["uid"] if owner else None,
            log_file=self._log_dir / metadata["namespace"] / metadata["name"] / "trainer.log",
        )

    # ------------------------------------------------------------------------------------------- the trainer

    def _schedule_run(self, record: PodRecord) -> None:
        """Called with the lock held, when the pod is first seen Running."""
        timing = self.timing
        if record.component == Component.VALIDATION.value:
            validated = encode(ValidatedEvent(resolved=self._resolved()))
            self._after(timing.validation_seconds, functools.partial(self._exit, record.uid, validated))
        elif record.rank0_trainer:
            self._after(0.0, functools.partial(self._step, record.uid))
        elif record.component == Component.TRAINING.value:
            self._after(timing.training_seconds, functools.partial(self._exit, record.uid))

    def _alive(self, record: PodRecord) -> bool:
        return record.ended_seq is None and record.node not in self.stopped_nodes and not self._stopping.is_set()

    def _step(self, uid: str) -> None:
        """Rank 0 prints its next event: `start` first (resuming where its Job got to), then one `progress`."""
        timing = self.timing
        with self._lock:
            record = self._pods[uid]
            if not self._alive(record) or record.exit_requested_at is not None:
                return
            job_uid = record.job_uid or record.uid
            step = self._job_steps.get(job_uid, 0)
            if record.last_step_at is None:
                line = encode(StartEvent(world_size=WORLD_SIZE, total_steps=timing.total_steps, epochs=1))
            else:
                step = min(step + 1, timing.total_steps)
                self._job_steps[job_uid] = step
                line = encode(
                    ProgressEvent(
                        step=step,
                        total_steps=timing.total_steps,
                        epoch=step / timing.total_steps,
                        loss=round(2.5 - 1.5 * step / timing.total_steps, 4),
                        learning_rate=1e-4,
                        tokens_per_second=15_000.0,
                        eta_seconds=(timing.total_steps - step) * timing.step_seconds,
                    )
                )
                record.steps_written += 1
                record.last_step = step
            record.last_step_at = time.monotonic()
            writer = self._writer(record)
            if step < timing.total_steps:
                self._after(timing.step_seconds, functools.partial(self._step, uid))
            else:
                self._after(0.0, functools.partial(self._finish, uid))
        writer.write(line)

    def _finish(self, uid: str) -> None:
        """Rank 0 publishes its output: the `output` event in the log, then exit 0 with it as termination message."""
        with self._lock:
            record = self._pods[uid]
            if not self._alive(record) or record.exit_requested_at is not None:
                return
            job_uid = record.job_uid or record.uid
            output = OutputEvent(
                weights=output_uri(job_uid),
                files=[
                    OutputFile(
                        path="adapter_model.safetensors",
                        size=16_801_880,
                        sha256=hashlib.sha256(job_uid.encode()).hexdigest(),
                    )
                ],
                metrics={"train_loss": 1.0},
            )
            record.output_uri = output.weights
            writer = self._writer(record)
        writer.write(encode(output))
        self._exit(uid, termination_message(output))

    def _exit(self, uid: str, message: str | None = None) -> None:
        with self._lock:
            record = self._pods[uid]
            if not self._alive(record):
                return
            record.exit_requested_at = time.monotonic()
        self._submit(functools.partial(self._terminate, uid, message))

    def _resolved(self) -> ResolvedRun:
        return ResolvedRun(
            world_size=WORLD_SIZE,
            per_device_batch_size=1,
            gradient_accumulation_steps=1,
            effective_batch_size=WORLD_SIZE,
            train_rows=WORLD_SIZE * self.timing.total_steps,
            validation_rows=50,
            train_tokens=2048 * WORLD_SIZE * self.timing.total_steps,
            steps_per_epoch=self.timing.total_steps,
        )

    # ------------------------------------------------------------------------------------------- API calls

    def _terminate(self, uid: str, message: str | None) -> None:
        with self._lock:
            record = self._pods[uid]
            if not self._alive(record):
                return
        try:
            terminate_pod(self._api, record.namespace, record.name, 0, message=message)
        except ApiException as error:
            if error.status == 404:
                return
            self._retry(functools.partial(self._terminate, uid, message), error)
        except Exception as error:  # the API server is away: try again in a moment
            self._retry(functools.partial(self._terminate, uid, message), error)

    def _register_logs(self, uid: str) -> None:
        with self._lock:
            record = self._pods[uid]
            if record.ended_seq is not None or record.log_file is None:
                return
        try:
            register_pod_logs(
                self._api, record.namespace, record.name, record.log_file, containers=(TRAINER_CONTAINER,)
            )
        except ApiException as error:
            if error.status == 404:
                return
            self._retry(functools.partial(self._register_logs, uid), error)
        except Exception as error:
            self._retry(functools.partial(self._register_logs, uid), error)

    def _retry(self, call: Callable[[], None], error: BaseException) -> None:
        log.info("simulated trainer: %s; trying again in %.0fs", error, RETRY_SECONDS)
        with self._lock:
            self._after(RETRY_SECONDS, functools.partial(self._submit, call))

    def _submit(self, call: Callable[[], None]) -> None:
        if not self._stopping.is_set():
            self._pool.submit(call)

    def _writer(self, record: PodRecord) -> PodLogs:
        writer = self._writers.get(record.uid)
        if writer is None:
            assert record.log_file is not None
            record.log_file.parent.mkdir(parents=True, exist_ok=True)
            writer = self._writers[record.uid] = PodLogs(record.log_file)
        return writer

    # ------------------------------------------------------------------------------------------- scheduler

    def _after(self, seconds: float, action: Callable[[], None]) -> None:
        """Run `action` on the scheduler thread in `seconds`. Called with the lock held."""
        heapq.heappush(self._due, _Due(time.monotonic() + seconds, next(self._due_seq), action))
        self._wake.notify()

    def _run_scheduler(self) -> None:
        while not self._stopping.is_set():
            with self._wake:
                while not self._stopping.is_set():
                    wait = self._due[0].at - time.monotonic() if self._due else None
                    if wait is not None and wait <= 0:
                        due = heapq.heappop(self._due)
                        break
                    self._wake.wait(wait)
                else:
                    return
            try:
                due.action()
            except Exception:
                log.exception("simulated trainer: a scheduled action failed")


def _controller(metadata: Obj) -> Obj | None:
    return next((ref for ref in metadata.get("ownerReferences") or [] if ref.get("controller")), None)


def _terminated(status: Obj) -> Obj | None:
    for container in status.get("containerStatuses") or []:
        if container.get("name") == TRAINER_CONTAINER:
            terminated: Obj | None = (container.get("state") or {}).get("terminated")
            return terminated
    return None


def _job_finished(job: Obj) -> bool | None:
    """True when the Job completed, False when it failed, None while it runs."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return bool(condition["type"] == "Complete")
    return None
