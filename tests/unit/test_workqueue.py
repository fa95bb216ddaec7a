"""The reconcile queue: one key at a time, coalesced, retried with backoff, requeued on request."""

from __future__ import annotations

import asyncio

from finetune_operator.workqueue import Key, WorkQueue


def test_events_for_one_key_never_run_concurrently_and_coalesce() -> None:
    async def scenario() -> tuple[int, int]:
        running = 0
        most = 0
        runs = 0
        release = asyncio.Event()

        async def worker(key: Key) -> float | None:
            nonlocal running, most, runs
            running += 1
            most = max(most, running)
            runs += 1
            await release.wait()
            running -= 1
            return None

        queue = WorkQueue(worker, concurrency=4)
        queue.start()
        queue.add(("ns", "a"))
        await asyncio.sleep(0.01)
        for _ in range(50):  # arrive while the key runs: one more run afterwards, not fifty
            queue.add(("ns", "a"))
        release.set()
        await asyncio.sleep(0.05)
        await queue.stop()
        return most, runs

    most, runs = asyncio.run(scenario())
    assert most == 1
    assert runs == 2


def test_failures_are_retried_and_requeue_after_is_honoured() -> None:
    async def scenario() -> list[str]:
        calls: list[str] = []

        async def worker(key: Key) -> float | None:
            calls.append("call")
            if len(calls) == 1:
                raise RuntimeError("API server unavailable")
            return 0.05 if len(calls) == 2 else None

        queue = WorkQueue(worker, concurrency=1)
        queue.start()
        queue.add(("ns", "a"))
        await asyncio.sleep(1.5)  # first retry after 1 s, then the requested 0.05 s
        await queue.stop()
        return calls

    assert len(asyncio.run(scenario())) == 3


def test_one_slow_key_does_not_hold_up_another() -> None:
    async def scenario() -> list[str]:
        done: list[str] = []
        slow = asyncio.Event()

        async def worker(key: Key) -> float | None:
            if key[1] == "slow":
                await slow.wait()
            done.append(key[1])
            return None

        queue = WorkQueue(worker, concurrency=2)
        queue.start()
        queue.add(("ns", "slow"))
        queue.add(("ns", "fast"))
        await asyncio.sleep(0.05)
        slow.set()
        await asyncio.sleep(0.05)
        await queue.stop()
        return done

    assert asyncio.run(scenario()) == ["fast", "slow"]
