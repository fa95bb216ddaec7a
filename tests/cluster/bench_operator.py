"""`make bench-operator`: what the operator costs per FineTuneJob, against the control plane's own floor.

For each N (default 100, 300 and 1,000; `--huge` adds 5,000), in one run on the local cluster with one simulated
A40 node per job (and CPU nodes for the validation pods), created for the run and removed after it:

1. the floor: N bare Indexed Jobs with the training Job's pod shape (built by the operator's own
   `workload.build_train_job`, relabelled so that the operator never sees them), created directly;
2. a second floor that asks the cluster for the operator's Job and pod work (`--no-chained-floor` skips it): N bare
   validation Jobs (`workload.build_validation_job`), each followed by its training Job once it completed;
3. N FineTuneJobs, handled by `finetune-operator run` as a process of this checkout, under the Helm chart's
   ServiceAccount and RBAC (so that the audit log tells its requests apart).

The simulated trainer (simtrainer.py) plays every pod alike on both sides: validation pods exit after a moment,
rank-0 trainer pods print a growing log of progress events and exit 0 with an output after `--training-seconds`.
It prints one table per N: makespan of each and the ratios; p50/p99 from creation to the validation and the
training Job and from the trainer's exit to the final phase; the operator's API writes per job by kind and reads
per job (from the API server's audit log); its peak RSS, most threads and CPU seconds per job (from /proc); its
own view from its metrics (reconciles per job, queue wait and reconcile time). With `--profile`, py-spy samples
the operator through its run and the functions that took its CPU follow the table (the whole profile is kept in
the workdir, in py-spy's raw collapsed-stack format, for a flame graph).

    python tests/cluster/bench_operator.py                     # N = 100, 300, 1000
    python tests/cluster/bench_operator.py --sizes 20 --training-seconds 10
    python tests/cluster/bench_operator.py --huge              # also N = 5000
    python tests/cluster/bench_operator.py --sizes 1000 --profile --workdir /tmp/bench
"""

from __future__ import annotations

import argparse
import collections
import functools
import math
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from auditlog import Usage, mark_audit_log, operator_usage, read_audit_events_since
from informer import Informer, Obj
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kwokpods import wait_for
from operatorprocess import (
    MANY_JOBS_SETTINGS,
    OperatorProcess,
    install_operator_identity,
    remove_operator_identity,
)
from periodic import Periodic
from prometheus_client.parser import text_string_to_metric_families
from simtrainer import (
    BENCH_MANAGER,
    SIMULATED_DESTINATION,
    SIMULATED_SPEC,
    PodRecord,
    SimTrainer,
    TrainerTiming,
    finetunejob_manifest,
)
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
from finetune_operator.api.spec import FineTuneJobSpec
from finetune_operator.conventions import COMPONENT_LABEL, MANAGED_BY_LABEL, Component
from finetune_operator.resolution import Owner, RunInfo, resolve_run
from finetune_operator.settings import Settings
from finetune_operator.workload import build_train_job, build_validation_job

DEFAULT_SIZES = (100, 300, 1000)
HUGE_SIZE = 5000
NODE_POOL = "bench"
PODS_PER_CPU_NODE = 100
FINAL_PHASES = frozenset(("Succeeded", "Failed", "Canceled"))


def say(text: str) -> None:
    print(f"bench-operator: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class SideResult:
    """One side of the comparison: N bare Jobs, or N FineTuneJobs."""

    makespan: float
    # seconds from creating the FineTuneJob to seeing its validation Job, and its training Job (empty for bare Jobs)
    create_to_validation: list[float]
    create_to_job: list[float]
    # seconds from seeing rank 0 exit to seeing the final phase (the bare Job's Complete condition)
    exit_to_final: list[float]
    failed: int = 0
    # the most rank-0 trainers running at the same moment (their running status seen, their end not yet)
    most_running: int = 0


@dataclass
class OperatorCost:
    peak_rss_bytes: int
    # resident once healthy, before the first FineTuneJob: what the per-job memory is counted from
    start_rss_bytes: int
    most_threads: int
    cpu_seconds: float


@dataclass
class BenchResult:
    n: int
    timing: TrainerTiming
    bare: SideResult
    operator: SideResult
    usage: Usage
    cost: OperatorCost
    progress_interval: float
    view: OperatorView
    # the floor that does the operator's Job and pod work: a validation Job, then the training Job
    chained: SideResult | None = None
    # profile_summary's lines, with --profile
    profile: list[str] = field(default_factory=list)

    def ratio(self, floor: SideResult) -> float:
        return self.operator.makespan / floor.makespan if floor.makespan else math.inf


def most_at_once(spans: Iterable[tuple[float, float]]) -> int:
    """The most (start, end) spans open at one moment; one that ends as another starts does not overlap it."""
    moments = sorted(edge for start, end in spans for edge in ((start, 1), (end, -1)))
    open_now = most = 0
    for _, change in moments:
        open_now += change
        most = max(most, open_now)
    return most


def trainers_running_at_once(pods: Iterable[PodRecord]) -> int:
    return most_at_once(
        (pod.running_at, pod.ended_at)
        for pod in pods
        if pod.rank0_trainer and pod.running_at is not None and pod.ended_at is not None
    )


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def format_table(result: BenchResult) -> str:
    n, usage = result.n, result.usage
    total = usage.total()
    timing = result.timing
    per_job_rss = (result.cost.peak_rss_bytes - result.cost.start_rss_bytes) / n

    def per_job(count: int) -> str:
        return f"{count / n:.2f}"

    def ratio(floor: SideResult) -> str:
        return f"{result.ratio(floor):.2f}"

    def spread(values: Sequence[float]) -> str:
        return f"{percentile(values, 0.5):.2f} / {percentile(values, 0.99):.2f}" if values else "-"

    rows: list[tuple[str, str, str, str]] = [
        ("makespan (s)", f"{result.bare.makespan:.1f}", f"{result.operator.makespan:.1f}", ratio(result.bare)),
        *(
            [("  floor of validation then training Jobs", f"{chained.makespan:.1f}", "", ratio(chained))]
            if (chained := result.chained) is not None
            else []
        ),
        ("creation -> validation Job p50 / p99 (s)", "-", spread(result.operator.create_to_validation), ""),
        ("creation -> training Job p50 / p99 (s)", "-", spread(result.operator.create_to_job), ""),
        (
            "trainer exit -> final phase p50 / p99 (s)",
            spread(result.bare.exit_to_final),
            spread(result.operator.exit_to_final),
            "",
        ),
        ("trainers running at once (most)", str(result.bare.most_running), str(result.operator.most_running), ""),
        ("failed", str(result.bare.failed), str(result.operator.failed), ""),
        ("operator API writes per job lifecycle", "", "mean", "most"),
        ("  creates", "", per_job(total.creates), str(usage.most("creates"))),
        ("  status writes besides progress", "", per_job(total.status_writes), str(usage.most("status_writes"))),
        ("  progress writes", "", per_job(total.progress_writes), str(usage.most("progress_writes"))),
        ("  Events", "", per_job(total.events), str(usage.most("events"))),
        ("  deletes", "", per_job(total.deletes), str(usage.most("deletes"))),
        ("  other writes", "", per_job(total.other_writes), str(usage.most("other_writes"))),
        ("  refused (409, 404, ...)", "", per_job(total.refused_writes), str(usage.most("refused_writes"))),
        ("  no-op status writes (echo)", "", str(total.noop_status_writes), str(usage.most("noop_status_writes"))),
        ("operator reads per job (get, list)", "", per_job(total.reads), str(usage.most("reads"))),
        ("operator watches, Lease writes (total)", "", f"{total.watches}, {usage.lease_writes}", ""),
        ("operator peak RSS (MB)", "", f"{result.cost.peak_rss_bytes / 2**20:.0f}", ""),
        ("  RSS before the first FineTuneJob (MB)", "", f"{result.cost.start_rss_bytes / 2**20:.0f}", ""),
        ("  per job: (peak - before) / N (KB)", "", f"{per_job_rss / 2**10:.0f}", ""),
        ("operator threads (most)", "", str(result.cost.most_threads), ""),
        ("operator CPU seconds per job", "", f"{result.cost.cpu_seconds / n:.3f}", ""),
        ("operator's metrics: reconciles per job", "", f"{result.view.reconciles / n:.1f}", ""),
        ("  queue wait p99 (s, bucket bound)", "", f"{result.view.queue_wait_p99:g}", ""),
        (
            "  reconcile mean / p99 (s, bucket bound)",
            "",
            f"{result.view.reconcile_mean:.3f} / {result.view.reconcile_p99:g}",
            "",
        ),
    ]
    header = (
        f"N = {n}: one A40 node per job; validation {timing.validation_seconds:g} s, training "
        f"{timing.training_seconds:g} s, a progress event every {timing.step_seconds:g} s; operator's progress "
        f"interval {result.progress_interval:g} s"
    )
    width = max(len(row[0]) for row in rows)
    lines = [header, f"{'':<{width}}  {'bare Jobs':>12}  {'FineTuneJobs':>12}  {'ratio':>6}"]
    lines += [f"{a:<{width}}  {b:>12}  {c:>12}  {d:>6}" for a, b, c, d in rows]
    return "\n".join([*lines, *result.profile])


# ---------------------------------------------------------------------------------------------- the operator's view


@dataclass(frozen=True)
class OperatorView:
    """What the operator's own metrics say about the run."""

    reconciles: float
    # p99s as the upper bound of the histogram bucket they fall in
    queue_wait_p99: float
    reconcile_mean: float
    reconcile_p99: float


def histogram_p99(buckets: Sequence[tuple[float, float]]) -> float:
    """The upper bound of the bucket that holds the 99th percentile, from cumulative (le, count) pairs."""
    total = buckets[-1][1] if buckets else 0.0
    if not total:
        return math.nan
    return next(bound for bound, count in buckets if count >= 0.99 * total)


def operator_view(exposition: str) -> OperatorView:
    """Reconciles, queue wait and reconcile time from the operator's Prometheus exposition."""
    samples: dict[str, float] = collections.defaultdict(float)
    buckets: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets[sample.name].append((float(sample.labels["le"]), sample.value))
            else:
                samples[sample.name] += sample.value
    reconciles = samples["finetune_reconcile_duration_seconds_count"]
    return OperatorView(
        reconciles=samples["finetune_reconciles_total"],
        queue_wait_p99=histogram_p99(sorted(buckets["finetune_workqueue_wait_seconds_bucket"])),
        reconcile_mean=samples["finetune_reconcile_duration_seconds_sum"] / reconciles if reconciles else math.nan,
        reconcile_p99=histogram_p99(sorted(buckets["finetune_reconcile_duration_seconds_bucket"])),
    )


class Profiler:
    """py-spy sampling the operator process's busy threads (those on CPU or in a call, not waiting for work)."""

    RATE = 25  # samples a second: little enough not to weigh on the run

    def __init__(self, pid: int, output: Path) -> None:
        self.output = output
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        command = [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(self.RATE)]
        command += ["--nonblocking", "--output", str(output)]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        # py-spy writes its output when it is interrupted.
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()


_FRAME_LINE = re.compile(r":\d+\)$")
# The package of a frame outside the standard library (kopf's frames are relative to site-packages in py-spy's
# output, this checkout's to its root).
_PACKAGE = re.compile(r"\((?:.*/site-packages/|.*/operator/)?([a-z_][a-z0-9_]*)/[\w/]*\.py:\d+\)$")
_STANDARD_LIBRARY = frozenset(sys.stdlib_module_names)
# Leaf frames of a thread that waits (py-spy without --idle still samples some of them): for work (an event loop's
# poll, an idle pool thread), or for the API server's answer (a socket read).
_WAITING_FOR_WORK = ("EpollSelector.select (selectors.py)", "_worker (concurrent/futures/thread.py)")
_WAITING_FOR_API = (
    "SSLSocket.read (ssl.py)",
    "SSLObject.read (ssl.py)",
    "poll_wait_for_socket.<locals>.do_poll (urllib3/util/wait.py)",
)


def _innermost_package(frames: Sequence[str]) -> str:
    for frame in reversed(frames):
        match = _PACKAGE.search(frame)
        if match is not None and match.group(1) not in _STANDARD_LIBRARY:
            return match.group(1)
    return "the standard library"


def profile_summary(folded: str, top: int = 10) -> list[str]:
    """Where the operator's samples went, from py-spy's collapsed stacks: waiting for work, waiting for the API
    server, and computing; for the computing samples, the share of each package (the innermost one outside the
    standard library in the stack) and the functions with the most own samples."""
    own: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    idle = api = computing = 0
    for line in folded.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        leaf = _FRAME_LINE.sub(")", frames[-1])
        if leaf in _WAITING_FOR_WORK:
            idle += count
            continue
        if leaf in _WAITING_FOR_API:
            api += count
            continue
        computing += count
        own[leaf] += count
        packages[_innermost_package(frames)] += count
    total = idle + api + computing
    if not total:
        return ["py-spy recorded no samples"]
    lines = [
        f"where the operator's threads were (py-spy, {total} samples at {Profiler.RATE}/s): waiting for work "
        f"{100 * idle / total:.0f}%, for the API server's answers {100 * api / total:.0f}%, computing "
        f"{100 * computing / total:.0f}%"
    ]
    if computing:
        shares = ", ".join(f"{name} {100 * n / computing:.0f}%" for name, n in packages.most_common(8))
        lines.append(f"  computing, by package: {shares}")
        lines += [f"  {100 * count / computing:5.1f}%  {frame}" for frame, count in own.most_common(top)]
    return lines


# ---------------------------------------------------------------------------------------------------- the floor


def bare_training_job(namespace: str, name: str) -> dict[str, Any]:
    """The operator's training Job for a FineTuneJob of SIMULATED_SPEC, without owner, with the benchmark's labels."""
    return _bare(build_train_job, namespace, name, Component.TRAINING)


def _bare(
    build: Callable[[RunInfo], dict[str, Any]], namespace: str, name: str, component: Component
) -> dict[str, Any]:
    run = resolve_run(
        Owner(name=name, namespace=namespace, uid=str(uuid.uuid4()), labels={}),
        FineTuneJobSpec.model_validate(SIMULATED_SPEC),
        Settings(default_destination=SIMULATED_DESTINATION),
    )
    job = build(run)
    labels = {MANAGED_BY_LABEL: BENCH_MANAGER, COMPONENT_LABEL: component.value}
    job["metadata"] = {"name": job["metadata"]["name"], "namespace": namespace, "labels": labels}
    job["spec"]["template"]["metadata"]["labels"] = dict(labels)
    return job


def bare_validation_job(namespace: str, name: str) -> dict[str, Any]:
    """The operator's validation Job for a FineTuneJob of SIMULATED_SPEC, like `bare_training_job`."""
    return _bare(build_validation_job, namespace, name, Component.VALIDATION)


def run_bare(
    devcluster: DevCluster, n: int, timing: TrainerTiming, workdir: Path, *, validation_first: bool = False
) -> SideResult:
    """N bare training Jobs, created at once; or, `validation_first`, N validation Jobs, each followed by its
    training Job as soon as it completed (the Job and pod work the operator asks of the cluster)."""
    namespace = create_namespace(devcluster.api, f"bench-bare-{n}-{uuid.uuid4().hex[:5]}")
    batch: Any = client.BatchV1Api(devcluster.api)
    try:
        with SimTrainer(devcluster.kubeconfig, namespace, workdir / "pod-logs", timing) as trainer:
            names = [f"bare-{i}" for i in range(n)]
            first = bare_validation_job if validation_first else bare_training_job
            started = time.monotonic()
            create_all(lambda name: batch.create_namespaced_job(namespace, first(namespace, name)), names)
            followed: set[str] = set()
            deadline = started + side_timeout(n, timing)
            with ThreadPoolExecutor(max_workers=8) as pool:
                while True:
                    jobs = trainer.jobs()
                    training = [job for job in jobs if job.component == Component.TRAINING.value]
                    if sum(job.finished_at is not None for job in training) >= n:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{n} bare training Jobs did not finish in {side_timeout(n, timing):.0f}s")
                    for job in jobs:
                        if job.component == Component.VALIDATION.value and job.succeeded and job.name not in followed:
                            followed.add(job.name)
                            name = job.name.removesuffix("-validate")
                            pool.submit(batch.create_namespaced_job, namespace, bare_training_job(namespace, name))
                    time.sleep(0.2)  # the floor's controller looks at its Jobs five times a second
            pods = trainer.pods()
        exits = {pod.job_uid: pod.ended_at for pod in pods if pod.rank0_trainer and pod.exited_with_output}
        return SideResult(
            makespan=max(job.finished_at or started for job in training) - started,
            create_to_validation=[],
            create_to_job=[],
            exit_to_final=[
                job.finished_at - exited
                for job in training
                if job.finished_at is not None and (exited := exits.get(job.uid)) is not None
            ],
            failed=sum(job.succeeded is False for job in jobs),
            most_running=trainers_running_at_once(pods),
        )
    finally:
        delete_namespace(devcluster.api, namespace, timeout=side_timeout(n, timing))


# ---------------------------------------------------------------------------------------------------- the operator


class PhaseWatch:
    """When each FineTuneJob of a namespace was first seen in a final phase (a watch of its own)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        custom = client.CustomObjectsApi(api)
        self.final_at: dict[str, float] = {}
        self.final_phase: dict[str, str] = {}
        self._lock = threading.Lock()
        self._informer = Informer(
            f"finetunejobs/{namespace}",
            functools.partial(custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL),
            self._on_event,
        )

    def _on_event(self, kind: str, obj: Obj) -> None:
        phase = (obj.get("status") or {}).get("phase")
        name = obj["metadata"]["name"]
        with self._lock:
            if phase in FINAL_PHASES and name not in self.final_at:
                self.final_at[name] = time.monotonic()
                self.final_phase[name] = phase

    def __enter__(self) -> PhaseWatch:
        self._informer.start()
        self._informer.wait_synced()
        return self

    def __exit__(self, *_: object) -> None:
        self._informer.stop()


class UsageSampler(Periodic):
    """The most threads the operator process had, sampled every half second."""

    def __init__(self, operator: OperatorProcess) -> None:
        super().__init__("usage-sampler", 0.5)
        self.most_threads = 0
        self._operator = operator

    def tick(self) -> bool:
        if not self._operator.running():
            return False
        self.most_threads = max(self.most_threads, self._operator.usage().threads)
        return True

    def __enter__(self) -> Self:
        self.most_threads = self._operator.usage().threads
        return super().__enter__()


@dataclass
class OperatorRun:
    side: SideResult
    usage: Usage
    cost: OperatorCost
    view: OperatorView
    profile: list[str]


def run_operator(
    devcluster: DevCluster, n: int, timing: TrainerTiming, workdir: Path, *, profile: bool = False
) -> OperatorRun:
    if devcluster.audit_log is None:
        raise RuntimeError("the cluster writes no audit log: start it with `devcluster.py up --audit`")
    namespace = create_namespace(devcluster.api, f"bench-op-{n}-{uuid.uuid4().hex[:5]}")
    identity = install_operator_identity(
        devcluster, namespace, workdir / f"operator-{n}.kubeconfig", token_seconds=6 * 3600
    )
    operator = OperatorProcess(
        namespace, identity.kubeconfig, workdir / f"operator-{n}.log", env=dict(MANY_JOBS_SETTINGS)
    )
    custom: Any = client.CustomObjectsApi(devcluster.api)
    try:
        with SimTrainer(devcluster.kubeconfig, namespace, workdir / "pod-logs", timing) as trainer:
            operator.start()
            wait_for(operator.healthy, timeout=120, description="the operator's liveness endpoint")
            profiler = Profiler(operator.pid, workdir / f"operator-{n}.pyspy.txt") if profile else None
            audit_mark = mark_audit_log(devcluster.audit_log)
            before = operator.usage()
            names = [f"ftj-{i}" for i in range(n)]
            created_at: dict[str, float] = {}

            def create(name: str) -> None:
                custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, finetunejob_manifest(name))
                created_at[name] = time.monotonic()

            with PhaseWatch(devcluster.api, namespace) as phases, UsageSampler(operator) as sampler:
                started = time.monotonic()
                create_all(create, names)
                wait_for(
                    lambda: len(phases.final_at) >= n,
                    timeout=side_timeout(n, timing),
                    interval=1,
                    description=f"{n} FineTuneJobs to reach a final phase",
                )
                after = operator.usage()
                cost = OperatorCost(
                    after.peak_rss_bytes, before.rss_bytes, sampler.most_threads, after.cpu_seconds - before.cpu_seconds
                )
            view = operator_view(operator.metrics())
            summary = []
            if profiler is not None:
                profiler.stop()
                summary = profile_summary(profiler.output.read_text() if profiler.output.exists() else "")
            jobs, pods = trainer.jobs(), trainer.pods()
        operator.stop()
        training = {job.owner_name: job for job in jobs if job.component == Component.TRAINING.value}
        validation = {job.owner_name: job for job in jobs if job.component == Component.VALIDATION.value}
        exits = {pod.job_uid: pod.ended_at for pod in pods if pod.rank0_trainer and pod.exited_with_output}
        exit_to_final = []
        for name, job in training.items():
            exited = exits.get(job.uid)
            if name is not None and exited is not None and name in phases.final_at:
                exit_to_final.append(phases.final_at[name] - exited)
        side = SideResult(
            makespan=max(phases.final_at.values()) - started,
            create_to_validation=[
                job.seen_at - created_at[name]
                for name, job in validation.items()
                if name is not None and name in created_at
            ],
            create_to_job=[
                job.seen_at - created_at[name]
                for name, job in training.items()
                if name is not None and name in created_at
            ],
            exit_to_final=exit_to_final,
            failed=sum(phase != "Succeeded" for phase in phases.final_phase.values()),
            most_running=trainers_running_at_once(pods),
        )
        events = read_audit_events_since(audit_mark)
        usage = operator_usage(events, identity.username, namespace, names)
        return OperatorRun(side, usage, cost, view, summary)
    finally:
        operator.stop()
        delete_namespace(devcluster.api, namespace, timeout=side_timeout(n, timing))
        remove_operator_identity(devcluster, identity)


# ---------------------------------------------------------------------------------------------------- the run


def create_all(create: Callable[[str], object], names: Iterable[str], workers: int = 8) -> None:
    """Create the objects from a few threads, as a client submitting a queue would; an error stops the run."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(create, name) for name in names]:
            future.result()


def side_timeout(n: int, timing: TrainerTiming) -> float:
    return 180 + 3 * (timing.validation_seconds + timing.training_seconds) + 0.5 * n


def run_size(
    devcluster: DevCluster,
    n: int,
    timing: TrainerTiming,
    workdir: Path,
    *,
    chained_floor: bool = True,
    profile: bool = False,
) -> BenchResult:
    """One N: the floor (and, `chained_floor`, the floor of validation then training Jobs), then the operator."""
    ensure_nodes(devcluster.api, NODE_POOL, gpu_nodes=n, cpu_nodes=math.ceil(n / PODS_PER_CPU_NODE))
    say(f"N = {n}: {n} bare training Jobs")
    bare = run_bare(devcluster, n, timing, workdir)
    chained = None
    if chained_floor:
        say(f"N = {n}: {n} bare validation Jobs, each followed by its training Job")
        chained = run_bare(devcluster, n, timing, workdir, validation_first=True)
    say(f"N = {n}: {n} FineTuneJobs")
    run = run_operator(devcluster, n, timing, workdir, profile=profile)
    interval = Settings.model_fields["progress_interval_seconds"].default
    return BenchResult(n, timing, bare, run.side, run.usage, run.cost, interval, run.view, chained, run.profile)


@dataclass
class Options:
    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    timing: TrainerTiming = field(default_factory=lambda: TrainerTiming(training_seconds=30.0))
    keep_nodes: bool = False
    chained_floor: bool = True
    workdir: Path | None = None
    profile: bool = False


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="the values of N")
    parser.add_argument("--huge", action="store_true", help=f"also N = {HUGE_SIZE}")
    parser.add_argument("--validation-seconds", type=float, default=1.0)
    parser.add_argument("--training-seconds", type=float, default=30.0)
    parser.add_argument("--step-seconds", type=float, default=1.0, help="seconds between two progress events")
    parser.add_argument("--keep-nodes", action="store_true", help="leave the benchmark's nodes in the cluster")
    parser.add_argument(
        "--no-chained-floor",
        action="store_true",
        help="skip the second floor (validation Jobs, each followed by its training Job)",
    )
    parser.add_argument("--workdir", type=Path, help="where the operator logs and pod logs go (default: a temp dir)")
    parser.add_argument("--profile", action="store_true", help="sample the operator with py-spy and summarise")
    args = parser.parse_args(argv)
    sizes = [*args.sizes, *([HUGE_SIZE] if args.huge else [])]
    timing = TrainerTiming(args.validation_seconds, args.training_seconds, args.step_seconds)
    return Options(sizes, timing, args.keep_nodes, not args.no_chained_floor, args.workdir, args.profile)


def run(devcluster: DevCluster, options: Options) -> list[BenchResult]:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as scratch:
        workdir = options.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            for n in options.sizes:
                result = run_size(
                    devcluster,
                    n,
                    options.timing,
                    workdir,
                    chained_floor=options.chained_floor,
                    profile=options.profile,
                )
                print(format_table(result), "\n", flush=True)
                results.append(result)
        finally:
            if not options.keep_nodes:
                remove_nodes(devcluster.api, NODE_POOL)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        with running_cluster(stop_if_started=False, audit=True) as devcluster:
            install_crds(devcluster)
            run(devcluster, options)
    except ApiException as error:
        say(f"the API server refused a request: {error.status} {error.reason}: {error.body}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
