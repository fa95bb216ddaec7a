"""Log followers: one thread a job, throttled status patches, streams read again until the trainer ends."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from finetune_contract.protocol import ProgressEvent, encode
from finetune_operator.log_follower import LogFollowers, Stream
from finetune_operator.settings import Settings


def progress(step: int) -> str:
    return encode(ProgressEvent(step=step, total_steps=500, epoch=step / 500, loss=1.0))


class FakeLogApi:
    """Serves scripted log streams per pod and records the status patches per FineTuneJob."""

    def __init__(self, streams: dict[str, Callable[[], Iterator[str]]], terminated: Callable[[str], bool]) -> None:
        self.streams = streams
        self.terminated = terminated
        self.reads: dict[str, int] = {}
        self.patches: dict[str, list[Mapping[str, Any]]] = {}
        self.lock = threading.Lock()

    def follow_log(self, namespace: str, pod: str, container: str, idle_timeout: float) -> Iterator[str]:
        with self.lock:
            self.reads[pod] = self.reads.get(pod, 0) + 1
        return self.streams[pod]()

    def container_terminated(self, namespace: str, pod: str, container: str) -> bool:
        return self.terminated(pod)

    def patch_finetunejob_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        with self.lock:
            self.patches.setdefault(name, []).append(status)


def stream(job: str) -> Stream:
    return Stream(namespace="ns", finetunejob=job, uid=f"uid-{job}", pod=f"{job}-pod", container="trainer")


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_stalled_log_stream_never_delays_another_job() -> None:
    release = threading.Event()

    def stalled() -> Iterator[str]:
        release.wait()
        yield progress(1)

    def chatty() -> Iterator[str]:
        yield from (progress(step) for step in range(1, 11))

    api = FakeLogApi({"stuck-pod": stalled, "fast-pod": chatty}, terminated=lambda pod: True)
    ended: list[Stream] = []
    followers = LogFollowers(api, Settings(progress_interval_seconds=0.01), on_end=ended.append)
    followers.follow(stream("stuck"))
    followers.follow(stream("fast"))
    wait_until(lambda: stream("fast") in ended)
    assert api.patches["fast"][-1]["progress"]["step"] == 10
    assert "stuck" not in api.patches
    release.set()
    wait_until(lambda: stream("stuck") in ended)
    assert api.patches["stuck"][-1]["progress"]["step"] == 1


def test_status_patches_are_throttled_and_the_last_state_is_always_written() -> None:
    api = FakeLogApi({"job-pod": lambda: iter([progress(step) for step in range(1, 501)])}, lambda pod: True)
    ended: list[Stream] = []
    followers = LogFollowers(api, Settings(progress_interval_seconds=3600), on_end=ended.append)
    followers.follow(stream("job"))
    wait_until(lambda: bool(ended))
    # 500 events inside one interval: the first patch at once, the final state when the stream ends.
    assert [patch["progress"]["step"] for patch in api.patches["job"]] == [1, 500]


def test_a_stream_that_ends_while_the_trainer_runs_is_read_again() -> None:
    reads = {"job-pod": 0}

    def log() -> Iterator[str]:
        reads["job-pod"] += 1
        yield from (progress(step) for step in range(1, 3 * reads["job-pod"] + 1))

    api = FakeLogApi({"job-pod": log}, terminated=lambda pod: reads["job-pod"] >= 2)
    ended: list[Stream] = []
    followers = LogFollowers(api, Settings(progress_interval_seconds=0.01), on_end=ended.append)
    followers.follow(stream("job"))
    wait_until(lambda: bool(ended))
    assert api.reads["job-pod"] == 2
    assert api.patches["job"][-1]["progress"]["step"] == 6
    followers.follow(stream("job"))  # read to its end once: not followed again
    time.sleep(0.05)
    assert api.reads["job-pod"] == 2
