"""`make chaos`: FineTuneJobs through the faults a cluster meets, then a count of what was lost or mixed up.

N FineTuneJobs (default 200) are created evenly over `--create-seconds` in a fresh namespace, handled by
`--replicas` operator processes of this checkout (leader election on: FINETUNE_LEADER_ELECTION=true, the Lease
`finetune-operator` in the namespace, POD_NAME as identity) under the Helm chart's ServiceAccount and RBAC, while
the simulated trainer (simtrainer.py) plays every pod. At random moments of `--fault-seconds` (seeded; the seed
and the schedule are printed) it:

- kills the leading operator replica (the Lease's holder) with SIGKILL, and starts it again a moment later;
- restarts the API server, and etcd (data kept: `devcluster.py restart`);
- freezes the API server (SIGSTOP, then SIGCONT after `--freeze-seconds`);
- deletes a FineTuneJob and at once creates it again under the same name;
- evicts a running trainer pod (the Eviction API);
- stops the heartbeat of a node that runs a trainer (kwokpods.stop_node_heartbeat).

When every FineTuneJob is final (or `--settle-seconds` after the last fault) it prints, and exits non-zero unless
each is 0: duplicated training Jobs (a FineTuneJob that ever owned two), two rank-0 pods of one FineTuneJob running
at once, wrong adoptions (an output whose Job is not the FineTuneJob's own), lost outputs (a trainer exited 0 and
its FineTuneJob, still there, is not Succeeded with that output), FineTuneJobs stuck in a non-final phase, progress
frozen while the trainer's log grows (`--frozen-seconds` with no fault in between, or behind the log at the end),
and unhandled exceptions (Tracebacks) in the operators' logs.

    python tests/cluster/chaos.py                    # the full run: 200 jobs, every fault
    python tests/cluster/chaos.py --short            # 30 jobs, 2 kills, 1 re-create, 1 eviction
    python tests/cluster/chaos.py --seed 7 --jobs 50 --replicas 1
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import devcluster as dc
from informer import Informer, Obj
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kwokpods import restore_node_heartbeat, stop_node_heartbeat, wait_for
from operatorprocess import (
    MANY_JOBS_SETTINGS,
    OperatorIdentity,
    OperatorProcess,
    install_operator_identity,
    remove_operator_identity,
)
from periodic import Periodic
from simtrainer import JobRecord, PodRecord, SimTrainer, TrainerTiming, finetunejob_manifest, job_uid_of_output
from testcluster import (
    DevCluster,
    create_namespace,
    delete_namespace,
    ensure_nodes,
    install_crds,
    remove_nodes,
    running_cluster,
)

from finetune_operator.api import GROUP, PLURAL, VERSION
from finetune_operator.conventions import Component

LEASE_NAME = "finetune-operator"
NODE_POOL = "chaos"
FINAL_PHASES = frozenset(("Succeeded", "Failed", "Canceled"))
TRACEBACK = "Traceback (most recent call last)"
API_CALL_TIMEOUT = 10
T = TypeVar("T")

KILL = "kill the leading operator"
RESTART_APISERVER = "restart the API server"
RESTART_ETCD = "restart etcd"
FREEZE_APISERVER = "freeze the API server"
RECREATE = "delete and re-create a FineTuneJob"
EVICT = "evict a trainer pod"
STOP_NODE = "stop a node's heartbeat"


def say(text: str) -> None:
    print(f"chaos: {text}", flush=True)


# ---------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class FaultPlan:
    kills: int = 5
    apiserver_restarts: int = 1
    etcd_restarts: int = 1
    apiserver_freezes: int = 1
    recreates: int = 10
    evictions: int = 10
    node_stops: int = 1

    def kinds(self) -> list[str]:
        counts = (
            (KILL, self.kills),
            (RESTART_APISERVER, self.apiserver_restarts),
            (RESTART_ETCD, self.etcd_restarts),
            (FREEZE_APISERVER, self.apiserver_freezes),
            (RECREATE, self.recreates),
            (EVICT, self.evictions),
            (STOP_NODE, self.node_stops),
        )
        return [kind for kind, count in counts for _ in range(count)]


SHORT_PLAN = FaultPlan(
    kills=2, apiserver_restarts=0, etcd_restarts=0, apiserver_freezes=0, recreates=1, evictions=1, node_stops=0
)


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the first FineTuneJob was created
    kind: str


def plan_faults(plan: FaultPlan, rng: random.Random, start: float, end: float) -> list[Fault]:
    """The plan's faults at uniformly random moments of [start, end], in order."""
    return sorted((Fault(round(rng.uniform(start, end), 1), kind) for kind in plan.kinds()), key=lambda f: f.at)


@dataclass
class ChaosOptions:
    jobs: int = 200
    seed: int = 0
    plan: FaultPlan = field(default_factory=FaultPlan)
    replicas: int = 2
    timing: TrainerTiming = field(default_factory=lambda: TrainerTiming(2.0, 120.0, 1.0))
    create_seconds: float = 120.0
    fault_seconds: float = 360.0
    freeze_seconds: float = 60.0
    settle_seconds: float = 900.0
    frozen_seconds: float = 60.0
    restart_after: float = 5.0
    # simulated A40 nodes for the run; None: one per job
    gpu_nodes: int | None = None

    @classmethod
    def short(cls, seed: int) -> ChaosOptions:
        """The form `make test` runs: about 30 jobs, 2 kills, one re-create, one eviction."""
        return cls(
            jobs=30,
            seed=seed,
            plan=SHORT_PLAN,
            timing=TrainerTiming(1.0, 20.0, 1.0),
            create_seconds=20.0,
            fault_seconds=40.0,
            settle_seconds=180.0,
        )


# ---------------------------------------------------------------------------------------------------- the verdict


@dataclass
class Verdict:
    """What went wrong, one line per case; every list must be empty."""

    duplicated_training_jobs: list[str] = field(default_factory=list)
    concurrent_rank0_pods: list[str] = field(default_factory=list)
    wrong_adoptions: list[str] = field(default_factory=list)
    lost_outputs: list[str] = field(default_factory=list)
    stuck_jobs: list[str] = field(default_factory=list)
    frozen_progress: list[str] = field(default_factory=list)
    unhandled_exceptions: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name.replace("_", " "): len(cases) for name, cases in self.__dict__.items()}

    @property
    def ok(self) -> bool:
        return not any(self.counts().values())


def judge(
    pods: Sequence[PodRecord],
    jobs: Sequence[JobRecord],
    *,
    finetunejobs: Sequence[Obj],
    deleted_uids: set[str],
    frozen: Sequence[str],
    log_texts: dict[str, str],
) -> Verdict:
    """The fault run's counts, from what the simulated trainer saw and did and the FineTuneJobs at the end."""
    verdict = Verdict(frozen_progress=list(frozen))
    jobs_by_uid = {job.uid: job for job in jobs}
    by_uid = {obj["metadata"]["uid"]: obj for obj in finetunejobs}

    def named(owner_uid: str | None, fallback: str | None) -> str:
        obj = by_uid.get(owner_uid or "")
        return obj["metadata"]["name"] if obj else f"{fallback} (uid {owner_uid})"

    training = [job for job in jobs if job.component == Component.TRAINING.value and job.owner_uid]
    for owner, count in Counter(job.owner_uid for job in training).items():
        if count > 1:
            names = sorted(job.name for job in training if job.owner_uid == owner)
            verdict.duplicated_training_jobs.append(f"{named(owner, names[0])}: {count} training Jobs {names}")

    rank0_by_owner: dict[str, list[PodRecord]] = defaultdict(list)
    for pod in pods:
        job = jobs_by_uid.get(pod.job_uid or "")
        if pod.rank0_trainer and pod.running_seq is not None and job is not None and job.owner_uid:
            rank0_by_owner[job.owner_uid].append(pod)
    for owner, group in rank0_by_owner.items():
        group.sort(key=lambda pod: pod.running_seq or 0)
        # the pod that, of those started so far, ends last; a pod that starts before it ended ran beside it
        last = group[0]
        for pod in group[1:]:
            if last.ended_seq is None or (pod.running_seq or 0) < last.ended_seq:
                verdict.concurrent_rank0_pods.append(
                    f"{named(owner, pod.job_name)}: {pod.name} ran while {last.name} still ran"
                )
            if last.ended_seq is not None and (pod.ended_seq is None or pod.ended_seq > last.ended_seq):
                last = pod

    for obj in finetunejobs:
        weights = ((obj.get("status") or {}).get("output") or {}).get("weights")
        if weights is None:
            continue
        job = jobs_by_uid.get(job_uid_of_output(weights) or "")
        if job is None or job.owner_uid != obj["metadata"]["uid"]:
            source = f"Job {job.name} of {named(job.owner_uid, job.owner_name)}" if job else "no Job of this run"
            verdict.wrong_adoptions.append(f"{obj['metadata']['name']}: output {weights} is from {source}")

    for pod in pods:
        if not (pod.rank0_trainer and pod.exited_with_output):
            continue
        job = jobs_by_uid.get(pod.job_uid or "")
        owner = job.owner_uid if job else None
        if owner is None or owner in deleted_uids:
            continue
        status = (by_uid.get(owner) or {}).get("status") or {}
        reported = (status.get("output") or {}).get("weights")
        if status.get("phase") != "Succeeded" or reported != pod.output_uri:
            verdict.lost_outputs.append(
                f"{named(owner, pod.job_name)}: {pod.name} exited 0 with {pod.output_uri}; "
                f"phase {status.get('phase')}, output {reported}"
            )

    for obj in finetunejobs:
        status = obj.get("status") or {}
        if status.get("phase") not in FINAL_PHASES:
            verdict.stuck_jobs.append(
                f"{obj['metadata']['name']}: {status.get('phase')} ({status.get('reason')}: {status.get('message')})"
            )

    verdict.frozen_progress += progress_behind(pods, jobs, finetunejobs)

    for source, text in log_texts.items():
        verdict.unhandled_exceptions += traceback_cases(source, text)
    return verdict


CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")


def traceback_cases(source: str, text: str) -> list[str]:
    """One line per traceback in a log (a chain of exceptions is one): where, the record that logged it, and the
    exception it ended with."""
    lines = text.splitlines()
    cases = []
    for number, line in enumerate(lines):
        if not line.startswith(TRACEBACK):
            continue
        before = next((lines[i] for i in range(number - 1, -1, -1) if lines[i].strip()), "")
        if before.startswith(CHAINED):
            continue
        record = before.strip()
        last = ""
        for following in lines[number + 1 :]:
            if following[:1].isdigit() and not following.startswith(" "):  # the next timestamped record
                break
            if EXCEPTION_LINE.match(following):
                last = following.strip()
        cases.append(f"{source}:{number + 1}: {record[:160]} -> {last[:200]}")
    return cases


def progress_behind(pods: Sequence[PodRecord], jobs: Sequence[JobRecord], finetunejobs: Sequence[Obj]) -> list[str]:
    """Succeeded FineTuneJobs whose status.progress.step is behind the last step their trainer printed."""
    owners = {job.uid: job.owner_uid for job in jobs}
    printed: dict[str, int] = defaultdict(int)
    for pod in pods:
        owner = owners.get(pod.job_uid or "")
        if pod.rank0_trainer and owner:
            printed[owner] = max(printed[owner], pod.last_step)
    behind = []
    for obj in finetunejobs:
        status = obj.get("status") or {}
        step = (status.get("progress") or {}).get("step", 0)
        last = printed.get(obj["metadata"]["uid"], 0)
        if status.get("phase") == "Succeeded" and step < last:
            behind.append(
                f"{obj['metadata']['name']}: progress.step {step} at the end; its trainer printed step {last}"
            )
    return behind


# ---------------------------------------------------------------------------------------------------- operators


class Replicas:
    """The operator replicas, each `finetune-operator run` with leader election on and a POD_NAME of its own."""

    def __init__(self, count: int, identity: OperatorIdentity, api: client.ApiClient, workdir: Path) -> None:
        self.namespace = identity.namespace
        self._coordination: Any = client.CoordinationV1Api(api)
        self.processes = [
            OperatorProcess(
                identity.namespace,
                identity.kubeconfig,
                workdir / f"operator-{index}.log",
                env={
                    **MANY_JOBS_SETTINGS,
                    "FINETUNE_LEADER_ELECTION": "true",
                    "FINETUNE_LEADER_ELECTION_NAMESPACE": identity.namespace,
                    "FINETUNE_LEADER_ELECTION_ID": LEASE_NAME,
                    "POD_NAME": f"operator-{index}",
                },
            )
            for index in range(count)
        ]
        # after each kill of the leader: seconds until a replica renewed the Lease, and which
        self.takeovers: list[tuple[float, str]] = []
        self._timers: list[threading.Timer] = []

    def start(self) -> None:
        for process in self.processes:
            process.start()
        wait_for(
            lambda: any(process.healthy() for process in self.processes),
            timeout=120,
            description="an operator replica's liveness endpoint",
        )

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        for process in self.processes:
            process.stop()

    def lease(self) -> tuple[str | None, datetime | None]:
        """The leader Lease's holder and its last renewal (None, None while there is no Lease)."""
        try:
            lease = self._coordination.read_namespaced_lease(
                LEASE_NAME, self.namespace, _request_timeout=API_CALL_TIMEOUT
            )
        except ApiException as error:
            if error.status == 404:
                return None, None
            raise
        return lease.spec.holder_identity, lease.spec.renew_time

    def kill_leader(self, rng: random.Random, restart_after: float) -> str:
        holder, _ = self.lease()
        names = [process.env["POD_NAME"] for process in self.processes]
        if holder in names:
            victim = names.index(holder)
        else:
            running = [index for index, process in enumerate(self.processes) if process.running()] or [0]
            victim = rng.choice(running)
        process = self.processes[victim]
        killed = datetime.now(UTC)
        process.kill()
        timer = threading.Timer(restart_after, process.start)
        timer.daemon = True
        timer.start()
        self._timers.append(timer)
        if holder in names:
            threading.Thread(target=self._time_takeover, args=(killed,), daemon=True).start()
        return f"SIGKILL {names[victim]} (Lease holder: {holder}); it starts again in {restart_after:g}s"

    def _time_takeover(self, killed: datetime) -> None:
        """How long until a replica renews the Lease after the kill (the other one, or the killed one restarted)."""
        started = time.monotonic()
        while time.monotonic() - started < 300:
            with contextlib.suppress(Exception):
                holder, renewed = self.lease()
                if renewed is not None and renewed > killed:
                    self.takeovers.append((time.monotonic() - started, str(holder)))
                    return
            time.sleep(0.5)

    def log_texts(self) -> dict[str, str]:
        return {
            process.log_path.name: process.log_path.read_text(errors="replace")
            for process in self.processes
            if process.log_path.exists()
        }


# ---------------------------------------------------------------------------------------------------- progress


class TrainerView(Protocol):
    """What the progress monitor reads of the simulated trainer (a SimTrainer)."""

    timing: TrainerTiming

    def pods(self) -> list[PodRecord]: ...

    def jobs(self) -> list[JobRecord]: ...


class ObjectSource(Protocol):
    """The FineTuneJobs as a watch last saw them (an Informer)."""

    def objects(self) -> list[Obj]: ...


class ProgressMonitor(Periodic):
    """Finds FineTuneJobs whose progress stays still while their trainer's log grows.

    Every few seconds it compares each running rank-0 trainer (one that printed a step lately) with its
    FineTuneJob's status.progress.step (from a watch). A FineTuneJob whose step has not changed for
    `frozen_seconds` since the later of its last change, its pod's start and the end of the last fault is frozen;
    nothing is found frozen while a fault lasts.
    """

    def __init__(self, trainer: TrainerView, finetunejobs: ObjectSource, frozen_seconds: float) -> None:
        super().__init__("progress-monitor", 2.0)
        self._trainer = trainer
        self._finetunejobs = finetunejobs
        self._frozen_seconds = frozen_seconds
        self._seen: dict[str, tuple[int, float]] = {}
        self._faults = 0
        self.quiet_since = time.monotonic()
        self.frozen: dict[str, str] = {}

    @contextlib.contextmanager
    def fault(self, lasting_after: float = 0.0) -> Iterator[None]:
        """While a fault is done, and for `lasting_after` seconds after (a killed replica's restart)."""
        self._faults += 1
        try:
            yield
        finally:
            self._faults -= 1
            self.quiet_since = max(self.quiet_since, time.monotonic() + lasting_after)

    def tick(self) -> bool:
        self.sample(time.monotonic())
        return True

    def sample(self, now: float) -> None:
        steps = {
            obj["metadata"]["uid"]: (
                obj["metadata"]["name"],
                ((obj.get("status") or {}).get("progress") or {}).get("step", 0),
            )
            for obj in self._finetunejobs.objects()
        }
        owners = {job.uid: job.owner_uid for job in self._trainer.jobs()}
        step_seconds = self._trainer.timing.step_seconds
        for pod in self._trainer.pods():
            owner = owners.get(pod.job_uid or "")
            growing = pod.last_step_at is not None and now - pod.last_step_at < 3 * step_seconds
            if not (pod.rank0_trainer and growing and pod.ended_seq is None and owner in steps):
                continue
            assert owner is not None
            name, step = steps[owner]
            seen = self._seen.get(owner)
            if seen is None or seen[0] != step:
                self._seen[owner] = (step, now)
                continue
            if self._faults:
                continue
            started = pod.running_at if pod.running_at is not None else now
            since = max(seen[1], self.quiet_since, started)
            if now - since > self._frozen_seconds and owner not in self.frozen:
                self.frozen[owner] = (
                    f"{name}: progress.step {step} for {now - since:.0f}s while {pod.name} printed up to "
                    f"step {pod.last_step}"
                )


# ---------------------------------------------------------------------------------------------------- the run


@dataclass
class ChaosReport:
    options: ChaosOptions
    faults: list[str]
    verdict: Verdict
    takeovers: list[tuple[float, str]]
    finetunejobs: int
    phases: Counter[str]

    def format(self) -> str:
        options = self.options
        lines = [
            f"seed {options.seed}: {options.jobs} FineTuneJobs, {len(options.plan.kinds())} faults, "
            f"{options.replicas} operator replicas",
            *(f"  {fault}" for fault in self.faults),
            f"FineTuneJobs at the end: {self.finetunejobs} ({', '.join(f'{k} {v}' for k, v in self.phases.items())})",
        ]
        if self.takeovers:
            restored = ", ".join(f"{seconds:.1f}s ({holder})" for seconds, holder in self.takeovers)
            lines.append(f"a leader renewed the Lease after each kill in: {restored}")
        width = max(len(name) for name in self.verdict.counts())
        lines += [f"{name:<{width}}  {count}" for name, count in self.verdict.counts().items()]
        for name, cases in self.verdict.__dict__.items():
            lines += [f"  {name.replace('_', ' ')}: {case}" for case in cases[:10]]
        lines.append("OK: nothing lost, nothing adopted" if self.verdict.ok else "FAILED")
        return "\n".join(lines)


def with_retries(call: Callable[[], T], what: str, timeout: float = 120.0) -> T:
    """`call` again and again while the API server is away (connection errors, 5xx, timeouts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except ApiException as error:
            if error.status is not None and error.status < 500 and error.status != 429:
                raise
            failure: BaseException = error
        except Exception as error:  # connection refused, reset, timed out
            failure = error
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: the API server did not answer for {timeout:.0f}s ({failure})")
        time.sleep(1.0)


@contextlib.contextmanager
def frozen_apiserver() -> Iterator[int]:
    """SIGSTOP the API server, and SIGCONT it whatever happens."""
    state = dc.State.load(dc.Layout(dc.state_dir()).state)
    if state is None:
        raise RuntimeError("no devcluster state file")
    pid = state.pids["kube-apiserver"]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


class Chaos:
    def __init__(self, devcluster: DevCluster, options: ChaosOptions, workdir: Path) -> None:
        self.devcluster = devcluster
        self.options = options
        self.workdir = workdir
        self.rng = random.Random(options.seed)
        self.api = devcluster.api
        self.custom: Any = client.CustomObjectsApi(self.api)
        self.core: Any = client.CoreV1Api(self.api)
        self.deleted_uids: set[str] = set()
        self.log: list[str] = []
        self.started = 0.0
        self.namespace = ""

    def note(self, text: str) -> None:
        entry = f"{time.monotonic() - self.started:6.1f}s  {text}"
        self.log.append(entry)
        say(entry)

    def run(self) -> ChaosReport:
        options = self.options
        schedule = plan_faults(options.plan, self.rng, 5.0, options.fault_seconds)
        say(f"seed {options.seed}; faults: " + "; ".join(f"{fault.at:g}s {fault.kind}" for fault in schedule))
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as cleanup:
            # undone in the reverse order: operators stop before their namespace goes, the nodes go last
            namespace = self.namespace = create_namespace(self.api, f"chaos-{options.seed}-{uuid.uuid4().hex[:5]}")
            cleanup.callback(remove_nodes, self.api, NODE_POOL)
            cleanup.callback(delete_namespace, self.api, namespace, timeout=300)
            ensure_nodes(self.api, NODE_POOL, options.gpu_nodes or options.jobs, math.ceil(options.jobs / 100))
            identity = install_operator_identity(
                self.devcluster, namespace, self.workdir / "operator.kubeconfig", token_seconds=6 * 3600
            )
            cleanup.callback(remove_operator_identity, self.devcluster, identity)
            trainer = cleanup.enter_context(
                SimTrainer(self.devcluster.kubeconfig, namespace, self.workdir / "pod-logs", options.timing)
            )
            cleanup.callback(self._restore_nodes, trainer)
            finetunejobs = Informer(
                f"finetunejobs/{namespace}",
                functools.partial(self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL),
                lambda kind, obj: None,
            )
            finetunejobs.start()
            cleanup.callback(finetunejobs.stop)
            replicas = Replicas(options.replicas, identity, self.api, self.workdir)
            cleanup.callback(replicas.stop)
            replicas.start()
            with ProgressMonitor(trainer, finetunejobs, options.frozen_seconds) as monitor:
                self.started = time.monotonic()
                creator = threading.Thread(target=self._create_jobs, name="creator", daemon=True)
                creator.start()
                for fault in schedule:
                    delay = self.started + fault.at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)  # the fault's moment in the schedule
                    self._inject(fault.kind, replicas, trainer, monitor, finetunejobs)
                creator.join()
                self._settle(trainer)
            final = self._list_finetunejobs()
            replicas.stop()
            verdict = judge(
                trainer.pods(),
                trainer.jobs(),
                finetunejobs=final,
                deleted_uids=self.deleted_uids,
                frozen=list(monitor.frozen.values()),
                log_texts=replicas.log_texts(),
            )
            phases = Counter(str((obj.get("status") or {}).get("phase")) for obj in final)
            return ChaosReport(options, self.log, verdict, replicas.takeovers, len(final), phases)
        raise AssertionError("unreachable")

    def _restore_nodes(self, trainer: SimTrainer) -> None:
        for node in trainer.stopped_nodes:
            restore_node_heartbeat(self.api, node)

    # ------------------------------------------------------------------------------------------- the jobs

    def _create_jobs(self) -> None:
        options = self.options
        for index in range(options.jobs):
            delay = self.started + index * options.create_seconds / options.jobs - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # jobs arrive evenly over create_seconds
            self._create(f"ftj-{index}")

    def _create(self, name: str) -> str:
        def create() -> str:
            try:
                created = self.custom.create_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    finetunejob_manifest(name),
                    _request_timeout=API_CALL_TIMEOUT,
                )
            except ApiException as error:
                if error.status != 409:  # created by an attempt whose answer was lost
                    raise
                created = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
            return str(created["metadata"]["uid"])

        return with_retries(create, f"create FineTuneJob {name}")

    def _list_finetunejobs(self) -> list[Obj]:
        listed = with_retries(
            lambda: self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL),
            "list FineTuneJobs",
        )
        items: list[Obj] = listed["items"]
        return items

    def _settle(self, trainer: SimTrainer) -> None:
        """Wait until every FineTuneJob is final, then (up to `frozen_seconds`) until their progress caught up
        with their trainers' logs."""
        self.note("waiting for every FineTuneJob to reach a final phase")

        def all_final() -> bool:
            with contextlib.suppress(Exception):
                items = self._list_finetunejobs()
                return len(items) >= self.options.jobs and all(
                    (obj.get("status") or {}).get("phase") in FINAL_PHASES for obj in items
                )
            return False

        def caught_up() -> bool:
            with contextlib.suppress(Exception):
                return not progress_behind(trainer.pods(), trainer.jobs(), self._list_finetunejobs())
            return False

        with contextlib.suppress(AssertionError):
            wait_for(all_final, timeout=self.options.settle_seconds, interval=2, description="final phases")
            self.note("every FineTuneJob is final; waiting for progress to catch up with the logs")
            wait_for(caught_up, timeout=self.options.frozen_seconds, interval=2, description="progress")
        self.note("settled")

    # ------------------------------------------------------------------------------------------- the faults

    def _inject(
        self, kind: str, replicas: Replicas, trainer: SimTrainer, monitor: ProgressMonitor, finetunejobs: Informer
    ) -> None:
        with monitor.fault(self.options.restart_after if kind == KILL else 0.0):
            self._do(kind, replicas, trainer, finetunejobs)

    def _do(self, kind: str, replicas: Replicas, trainer: SimTrainer, finetunejobs: Informer) -> None:
        try:
            if kind == KILL:
                self.note(
                    f"{kind}: {with_retries(lambda: replicas.kill_leader(self.rng, self.options.restart_after), kind)}"
                )
            elif kind == RESTART_APISERVER:
                self.note(kind)
                dc.restart("kube-apiserver")
            elif kind == RESTART_ETCD:
                self.note(kind)
                dc.restart("etcd")
            elif kind == FREEZE_APISERVER:
                with frozen_apiserver() as pid:
                    self.note(f"{kind}: SIGSTOP pid {pid} for {self.options.freeze_seconds:g}s")
                    time.sleep(self.options.freeze_seconds)  # the fault itself lasts this long
                self.note("SIGCONT the API server")
            elif kind == RECREATE:
                self.note(f"{kind}: {self._recreate(finetunejobs)}")
            elif kind == EVICT:
                self.note(f"{kind}: {self._evict(trainer)}")
            elif kind == STOP_NODE:
                self.note(f"{kind}: {self._stop_node(trainer)}")
        except Exception as error:
            self.note(f"{kind} could not be done: {type(error).__name__}: {error}")

    def _recreate(self, finetunejobs: Informer) -> str:
        # a FineTuneJob whose training Job exists, when there is one: its namesake must not adopt that Job
        unfinished = [
            obj for obj in finetunejobs.objects() if (obj.get("status") or {}).get("phase") not in FINAL_PHASES
        ]
        training = [obj for obj in unfinished if (obj.get("status") or {}).get("phase") in ("Starting", "Running")]
        candidates = sorted(training or unfinished, key=lambda obj: str(obj["metadata"]["name"]))
        if not candidates:
            return "no FineTuneJob is running"
        chosen = self.rng.choice(candidates)
        name, uid = chosen["metadata"]["name"], chosen["metadata"]["uid"]
        body = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid))
        with_retries(
            lambda: self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, body=body
            ),
            f"delete {name}",
        )
        self.deleted_uids.add(uid)
        new_uid = self._create(name)
        return f"{name} (phase {(chosen.get('status') or {}).get('phase')}): uid {uid} deleted, {new_uid} created"

    def _alive_trainers(self, trainer: SimTrainer) -> list[PodRecord]:
        return sorted(
            (
                pod
                for pod in trainer.pods()
                if pod.rank0_trainer
                and pod.running_seq is not None
                and pod.ended_seq is None
                and pod.node not in trainer.stopped_nodes
            ),
            key=lambda pod: pod.name,
        )

    def _evict(self, trainer: SimTrainer) -> str:
        candidates = self._alive_trainers(trainer)
        if not candidates:
            return "no trainer pod is running"
        pod = self.rng.choice(candidates)
        eviction = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod.name, "namespace": pod.namespace},
        }
        with_retries(
            lambda: self.core.create_namespaced_pod_eviction(pod.name, pod.namespace, eviction), f"evict {pod.name}"
        )
        return f"{pod.name} on {pod.node}"

    def _stop_node(self, trainer: SimTrainer) -> str:
        nodes = sorted({pod.node for pod in self._alive_trainers(trainer) if pod.node})
        if not nodes:
            return "no node runs a trainer"
        node = self.rng.choice(nodes)
        on_node = [pod.name for pod in self._alive_trainers(trainer) if pod.node == node]
        trainer.stopped_nodes.add(node)
        with_retries(lambda: stop_node_heartbeat(self.api, node), f"stop {node}")
        return f"{node} (trainers there: {', '.join(on_node)})"


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> tuple[ChaosOptions, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ChaosOptions()
    parser.add_argument(
        "--short", action="store_true", help="the short form: 30 jobs, 2 kills, 1 re-create, 1 eviction"
    )
    parser.add_argument("--seed", type=int, help="the random schedule's seed (default: a random one, printed)")
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--replicas", type=int, default=defaults.replicas)
    parser.add_argument("--kills", type=int)
    parser.add_argument("--apiserver-restarts", type=int)
    parser.add_argument("--etcd-restarts", type=int)
    parser.add_argument("--freezes", type=int, help="API server freezes")
    parser.add_argument("--freeze-seconds", type=float)
    parser.add_argument("--recreates", type=int)
    parser.add_argument("--evictions", type=int)
    parser.add_argument("--node-stops", type=int)
    parser.add_argument("--training-seconds", type=float)
    parser.add_argument("--create-seconds", type=float)
    parser.add_argument("--fault-seconds", type=float)
    parser.add_argument("--settle-seconds", type=float)
    parser.add_argument("--frozen-seconds", type=float)
    parser.add_argument("--workdir", type=Path, help="where operator and pod logs go (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    options = ChaosOptions.short(seed) if args.short else ChaosOptions(seed=seed)
    plan_changes = {
        "kills": args.kills,
        "apiserver_restarts": args.apiserver_restarts,
        "etcd_restarts": args.etcd_restarts,
        "apiserver_freezes": args.freezes,
        "recreates": args.recreates,
        "evictions": args.evictions,
        "node_stops": args.node_stops,
    }
    options.plan = replace(options.plan, **{k: v for k, v in plan_changes.items() if v is not None})
    options.replicas = args.replicas
    for name in ("jobs", "create_seconds", "fault_seconds", "settle_seconds", "frozen_seconds", "freeze_seconds"):
        if getattr(args, name) is not None:
            setattr(options, name, getattr(args, name))
    if args.training_seconds is not None:
        options.timing = replace(options.timing, training_seconds=args.training_seconds)
    return options, args.workdir


def run_chaos(devcluster: DevCluster, options: ChaosOptions, workdir: Path) -> ChaosReport:
    return Chaos(devcluster, options, workdir).run()


def main(argv: Sequence[str] | None = None) -> int:
    options, workdir = parse_args(argv)
    with running_cluster(stop_if_started=False) as devcluster, tempfile.TemporaryDirectory(prefix="chaos-") as scratch:
        install_crds(devcluster)
        report = run_chaos(devcluster, options, workdir or Path(scratch))
    print(report.format(), flush=True)
    return 0 if report.verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
