"""The reconcile queue: one key at a time, coalesced, retried with backoff, requeued on request.

The queue runs on an event loop on virtual time (conftest.VirtualTimeLoop), with the loop's clock as its own: a
backoff of one second is one second of that clock, exactly, and costs no real time.
"""

from __future__ import annotations

import asyncio

import pytest

from conftest import run_in_virtual_time
from finetune_operator.workqueue import Key, WorkQueue

KEY = ("ns", "a")
# Long enough in virtual time for every timer the queue could set (its longest backoff is a minute).
SETTLE = 600.0


def test_events_for_one_key_never_run_concurrently_and_coalesce() -> None:
    async def scenario() -> tuple[int, int]:
        running = most = runs = 0
        started, release = asyncio.Event(), asyncio.Event()

        async def worker(key: Key) -> float | None:
            nonlocal running, most, runs
            running += 1
            most = max(most, running)
            runs += 1
            started.set()
            await release.wait()
            running -= 1
            return None

        queue = WorkQueue(worker, concurrency=4, clock=asyncio.get_running_loop().time)
        queue.start()
        queue.add(KEY)
        await started.wait()
        for _ in range(50):  # arrive while the key runs: one more run afterwards, not fifty
            queue.add(KEY)
        release.set()
        await asyncio.sleep(SETTLE)  # virtual time moves only once every run that was ready has run
        await queue.stop()
        return most, runs

    assert run_in_virtual_time(scenario) == (1, 2)


@pytest.mark.parametrize(
    ("max_backoff", "expected_times"),
    [
        (60.0, [0.0, 1.0, 3.0, 7.0, 7.25]),  # 0.5 s doubled per failure: 1, 2, 4; then the requested 0.25
        (1.5, [0.0, 1.0, 2.5, 4.0, 4.25]),  # capped at max_backoff
    ],
)
def test_failures_are_retried_with_exponential_backoff_and_requeue_after_is_honoured(
    max_backoff: float, expected_times: list[float]
) -> None:
    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        times: list[float] = []
        done = asyncio.Event()

        async def worker(key: Key) -> float | None:
            times.append(loop.time())
            if len(times) <= 3:
                raise RuntimeError("API server unavailable")
            if len(times) == 4:
                return 0.25
            done.set()
            return None

        queue = WorkQueue(worker, concurrency=1, max_backoff=max_backoff, clock=loop.time)
        queue.start()
        queue.add(KEY)
        await done.wait()
        await asyncio.sleep(SETTLE)  # and no run after the last, which asked for none
        await queue.stop()
        return times

    assert run_in_virtual_time(scenario) == pytest.approx(expected_times)


def test_one_slow_key_does_not_hold_up_another() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        done: list[str] = []
        slow = asyncio.Event()
        finished = {"slow": asyncio.Event(), "fast": asyncio.Event()}

        async def worker(key: Key) -> float | None:
            if key[1] == "slow":
                await slow.wait()
            done.append(key[1])
            finished[key[1]].set()
            return None

        queue = WorkQueue(worker, concurrency=2, clock=asyncio.get_running_loop().time)
        queue.start()
        queue.add(("ns", "slow"))
        queue.add(("ns", "fast"))
        await finished["fast"].wait()
        while_slow_waits = list(done)
        slow.set()
        await finished["slow"].wait()
        await queue.stop()
        return while_slow_waits, done

    assert run_in_virtual_time(scenario) == (["fast"], ["fast", "slow"])


def test_a_queue_with_work_and_no_finished_run_for_the_threshold_is_stalled() -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        release = asyncio.Event()

        async def worker(key: Key) -> float | None:
            await release.wait()
            return None

        queue = WorkQueue(worker, concurrency=1, clock=asyncio.get_running_loop().time)
        queue.start()
        idle = queue.stalled(threshold=30)
        queue.add(KEY)
        await asyncio.sleep(29)
        early = queue.stalled(threshold=30)
        await asyncio.sleep(2)
        wedged = queue.stalled(threshold=30)
        release.set()
        await queue.stop()
        return idle, early, wedged

    assert run_in_virtual_time(scenario) == (False, False, True)
