"""The fault run's verdict (tests/cluster/chaos.py `judge`): each count catches its case, and a clean run is clean."""

from __future__ import annotations

import random
from typing import Any

from chaos import SHORT_PLAN, FaultPlan, ProgressMonitor, judge, plan_faults, progress_behind
from simtrainer import JobRecord, PodRecord, TrainerTiming, output_uri

FTJ_UID = "ftj-uid-1"
JOB_UID = "job-uid-1"


def job(uid: str = JOB_UID, owner: str = FTJ_UID, name: str = "a-train", component: str = "training") -> JobRecord:
    return JobRecord("ns", name, uid, component, owner_uid=owner, owner_name="a", seen_at=0.0)


def rank0(
    name: str = "a-train-0-x",
    *,
    job_uid: str = JOB_UID,
    running: int | None = 1,
    ended: int | None = 5,
    exit_code: int | None = 0,
    output: str | None = output_uri(JOB_UID),
    last_step: int = 20,
) -> PodRecord:
    return PodRecord(
        namespace="ns",
        name=name,
        uid=f"uid-{name}",
        component="training",
        index=0,
        job_name="a-train",
        job_uid=job_uid,
        running_seq=running,
        ended_seq=ended,
        exit_code=exit_code,
        output_uri=output,
        last_step=last_step,
    )


def finetunejob(
    uid: str = FTJ_UID, *, phase: str = "Succeeded", weights: str | None = output_uri(JOB_UID), step: int = 20
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "progress": {"step": step}}
    if weights is not None:
        status["output"] = {"weights": weights}
    return {"metadata": {"name": "a", "uid": uid}, "status": status}


def verdict_counts(
    pods: list[PodRecord],
    jobs: list[JobRecord],
    finetunejobs: list[dict[str, Any]],
    deleted: set[str] | None = None,
    logs: dict[str, str] | None = None,
) -> dict[str, int]:
    verdict = judge(
        pods, jobs, finetunejobs=finetunejobs, deleted_uids=deleted or set(), frozen=[], log_texts=logs or {}
    )
    return {name: count for name, count in verdict.counts().items() if count}


def test_a_clean_run_counts_nothing() -> None:
    assert verdict_counts([rank0()], [job()], [finetunejob()]) == {}


def test_two_training_jobs_of_one_finetunejob_are_duplicates() -> None:
    jobs = [job(), job(uid="job-uid-2", name="a-train")]
    assert verdict_counts([rank0()], jobs, [finetunejob()]) == {"duplicated training jobs": 1}


def test_a_rank0_pod_that_starts_before_the_other_ended_is_concurrent() -> None:
    pods = [rank0(), rank0(name="a-train-0-y", running=3, ended=9, exit_code=137, output=None)]
    assert verdict_counts(pods, [job()], [finetunejob()]) == {"concurrent rank0 pods": 1}


def test_a_replacement_after_the_first_pod_ended_is_not_concurrent() -> None:
    pods = [rank0(running=1, ended=2, exit_code=137, output=None), rank0(name="a-train-0-y", running=3, ended=9)]
    assert verdict_counts(pods, [job()], [finetunejob()]) == {}


def test_an_output_of_another_finetunejobs_job_is_a_wrong_adoption() -> None:
    other = job(uid="job-uid-old", owner="ftj-uid-old", name="a-train")
    counts = verdict_counts([rank0()], [job(), other], [finetunejob(weights=output_uri("job-uid-old"))])
    # the trainer's own output is lost too: the FineTuneJob reports the other one
    assert counts == {"wrong adoptions": 1, "lost outputs": 1}


def test_an_output_the_simulated_trainer_never_wrote_is_a_wrong_adoption() -> None:
    counts = verdict_counts([], [job()], [finetunejob(weights="s3://elsewhere/x/")])
    assert counts == {"wrong adoptions": 1}


def test_a_trainer_that_exited_0_under_a_failed_finetunejob_lost_its_output() -> None:
    counts = verdict_counts([rank0()], [job()], [finetunejob(phase="Failed", weights=None)])
    assert counts == {"lost outputs": 1}


def test_the_output_of_a_deleted_finetunejob_is_not_lost() -> None:
    assert verdict_counts([rank0()], [job()], [], deleted={FTJ_UID}) == {}


def test_a_finetunejob_in_a_non_final_phase_is_stuck() -> None:
    counts = verdict_counts([], [job()], [finetunejob(phase="Running", weights=None)])
    assert counts == {"stuck jobs": 1}


def test_progress_behind_the_trainers_last_step_at_the_end_is_frozen() -> None:
    assert progress_behind([rank0(last_step=20)], [job()], [finetunejob(step=17)]) == [
        "a: progress.step 17 at the end; its trainer printed step 20"
    ]
    assert verdict_counts([rank0(last_step=20)], [job()], [finetunejob(step=17)]) == {"frozen progress": 1}


def test_a_traceback_in_an_operator_log_is_an_unhandled_exception_and_a_chain_is_one() -> None:
    log = "\n".join(
        [
            "2026-01-01 00:00:00,000 INFO ok",
            "2026-01-01 00:00:01,000 ERROR reconcile of ns/a failed",
            "Traceback (most recent call last):",
            '  File "x.py", line 1, in f',
            "ConnectionRefusedError: [Errno 111] Connection refused",
            "",
            "During handling of the above exception, another exception occurred:",
            "",
            "Traceback (most recent call last):",
            '  File "y.py", line 2, in g',
            "urllib3.exceptions.MaxRetryError: HTTPSConnectionPool(host='127.0.0.1'): Max retries exceeded",
            "2026-01-01 00:00:02,000 INFO next",
        ]
    )
    verdict = judge([], [], finetunejobs=[], deleted_uids=set(), frozen=[], log_texts={"operator-0.log": log})
    assert verdict.unhandled_exceptions == [
        "operator-0.log:3: 2026-01-01 00:00:01,000 ERROR reconcile of ns/a failed -> "
        "urllib3.exceptions.MaxRetryError: HTTPSConnectionPool(host='127.0.0.1'): Max retries exceeded"
    ]


def test_the_fault_schedule_is_the_plan_at_seeded_moments_in_the_window() -> None:
    first = plan_faults(FaultPlan(), random.Random(7), 5.0, 300.0)
    again = plan_faults(FaultPlan(), random.Random(7), 5.0, 300.0)
    assert first == again
    assert sorted(fault.kind for fault in first) == sorted(FaultPlan().kinds())
    assert all(5.0 <= fault.at <= 300.0 for fault in first)
    assert [fault.at for fault in first] == sorted(fault.at for fault in first)
    assert len(FaultPlan().kinds()) == 5 + 1 + 1 + 1 + 10 + 10 + 1
    assert len(SHORT_PLAN.kinds()) == 2 + 1 + 1


class Trainer:
    """What the progress monitor reads of the simulated trainer: one rank-0 pod that prints a step a second."""

    timing = TrainerTiming(step_seconds=1.0)

    def __init__(self) -> None:
        self.pod = rank0(ended=None, exit_code=None, output=None)
        self.pod.running_at = 0.0

    def pods(self) -> list[PodRecord]:
        return [self.pod]

    def jobs(self) -> list[JobRecord]:
        return [job()]


class FineTuneJobs:
    def __init__(self) -> None:
        self.step = 0

    def objects(self) -> list[dict[str, Any]]:
        return [finetunejob(phase="Running", weights=None, step=self.step)]


def test_progress_still_for_a_minute_while_the_log_grows_is_frozen_but_not_while_a_fault_lasts() -> None:
    trainer, finetunejobs = Trainer(), FineTuneJobs()
    monitor = ProgressMonitor(trainer, finetunejobs, frozen_seconds=60)
    monitor.quiet_since = 0.0

    def printed(now: float) -> None:
        trainer.pod.last_step_at = now
        monitor.sample(now)

    for now in (1.0, 30.0):
        finetunejobs.step += 1
        printed(now)
    with monitor.fault():  # a frozen API server: the status cannot move
        printed(91.0)
        printed(120.0)
    assert monitor.frozen == {}
    monitor.quiet_since = 120.0  # the fault ended then
    printed(170.0)
    assert monitor.frozen == {}
    printed(181.0)
    assert list(monitor.frozen.values()) == ["a: progress.step 2 for 61s while a-train-0-x printed up to step 20"]
