"""Log followers: a coroutine a job, throttled status patches, streams resumed where they stopped until the end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from finetune_contract.protocol import ProgressEvent, encode
from finetune_operator.api.status import FineTuneJobStatus, Progress
from finetune_operator.kube import Conflict
from finetune_operator.log_follower import LogFollowers, Stream
from finetune_operator.settings import Settings

SETTINGS = Settings(progress_interval_seconds=0.2)


def progress(step: int) -> str:
    return encode(ProgressEvent(step=step, total_steps=500, epoch=step / 500, loss=1.0))


def stamped(second: int, text: str) -> str:
    return f"2026-11-28T12:00:{second:02d}.000000000Z {text}"


Script = Callable[[str | None], AsyncIterator[str]]


class FakeApi:
    """Serves scripted log streams per pod and records the status patches per FineTuneJob."""

    def __init__(self, scripts: dict[str, Script], terminated: Callable[[str], bool]) -> None:
        self.scripts = scripts
        self.terminated = terminated
        self.since: dict[str, list[str | None]] = {}
        self.followed: dict[str, list[bool]] = {}
        self.patches: dict[str, list[Mapping[str, Any]]] = {}
        self.gone: set[str] = set()
        self.reading = asyncio.Event()  # a follower asked for a log

    def lines(
        self,
        namespace: str,
        pod: str,
        container: str,
        since_time: str | None,
        idle_timeout: float,
        *,
        follow: bool = True,
    ) -> AsyncIterator[str]:
        self.since.setdefault(pod, []).append(since_time)
        self.followed.setdefault(pod, []).append(follow)
        self.reading.set()
        return self.scripts[pod](since_time)

    async def container_terminated(self, namespace: str, pod: str, container: str) -> bool:
        return self.terminated(pod)

    def patch_log_fields(self, namespace: str, name: str, uid: str, fields: Mapping[str, Any]) -> None:
        if name in self.gone:
            raise Conflict(name)
        self.patches.setdefault(name, []).append(fields)


def stream(job: str) -> Stream:
    return Stream(namespace="ns", finetunejob=job, uid=f"uid-{job}", pod=f"{job}-pod", container="trainer")


class Ends:
    """The streams whose followers read them to their end (the followers' `on_end`), awaitable."""

    def __init__(self) -> None:
        self.streams: list[Stream] = []
        self._arrived = asyncio.Event()

    def __call__(self, stream: Stream) -> None:
        self.streams.append(stream)
        self._arrived.set()

    async def wait_for(self, stream: Stream | None = None, timeout: float = 10.0) -> None:
        """Until `stream` (or any stream) has ended."""
        async with asyncio.timeout(timeout):
            while not (stream in self.streams if stream is not None else self.streams):
                self._arrived.clear()
                await self._arrived.wait()


def followers(api: FakeApi, ends: Ends, settings: Settings = SETTINGS) -> LogFollowers:
    return LogFollowers(api, api, settings, ends, asyncio.get_running_loop(), backoff=lambda _: 0.0)


def test_a_stalled_log_stream_never_delays_another_job() -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        async def stalled(_: str | None) -> AsyncIterator[str]:
            await release.wait()
            yield stamped(1, progress(1))

        async def chatty(_: str | None) -> AsyncIterator[str]:
            for step in range(1, 11):
                yield stamped(step, progress(step))

        api = FakeApi({"stuck-pod": stalled, "fast-pod": chatty}, terminated=lambda pod: pod == "fast-pod")
        ended = Ends()
        logs = followers(api, ended)
        logs.follow(stream("stuck"), FineTuneJobStatus())
        logs.follow(stream("fast"), FineTuneJobStatus())
        await ended.wait_for(stream("fast"))
        assert api.patches["fast"][-1]["progress"]["step"] == 10
        assert "stuck" not in api.patches
        assert logs.active == 1
        release.set()
        await logs.stop_all()

    asyncio.run(scenario())


def test_status_patches_are_throttled_and_the_last_state_is_always_written() -> None:
    async def scenario() -> None:
        async def burst(_: str | None) -> AsyncIterator[str]:
            for step in range(1, 501):
                yield stamped(1, progress(step))
                await asyncio.sleep(0)  # a real stream waits for the network between chunks

        api = FakeApi({"job-pod": burst}, terminated=lambda _: True)
        ended = Ends()
        # An interval longer than any test: what is written does not depend on how fast this machine is.
        followers(api, ended, Settings(progress_interval_seconds=3600)).follow(stream("job"), FineTuneJobStatus())
        await ended.wait_for()
        steps = [patch["progress"]["step"] for patch in api.patches["job"]]
        # 500 events in one burst: the first is written at once, the last when the stream ends, none between.
        assert steps == [1, 500]

    asyncio.run(scenario())


def test_a_broken_stream_resumes_where_it_stopped_and_reads_nothing_twice() -> None:
    log = [stamped(second, progress(second)) for second in range(1, 9)]

    async def scenario() -> None:
        reads = 0

        async def flaky(since: str | None) -> AsyncIterator[str]:
            nonlocal reads
            reads += 1
            served = [line for line in log if since is None or line[:19] >= since[:19]]
            for index, line in enumerate(served):
                if reads < 4 and index == 3:
                    raise ConnectionResetError("kubelet went away")
                yield line

        api = FakeApi({"job-pod": flaky}, terminated=lambda _: reads >= 4)
        ended = Ends()
        followers(api, ended).follow(stream("job"), FineTuneJobStatus())
        await ended.wait_for()
        assert api.since["job-pod"] == [None, "2026-11-28T12:00:03Z", "2026-11-28T12:00:05Z", "2026-11-28T12:00:07Z"]
        tail = api.patches["job"][-1]["logs"].splitlines()
        assert tail == [line.split(" ", 1)[1] for line in log]
        assert api.patches["job"][-1]["progress"]["step"] == 8

    asyncio.run(scenario())


def test_a_stream_that_went_quiet_before_the_end_of_a_finished_log_is_read_to_its_end() -> None:
    log = [stamped(second, progress(second)) for second in range(1, 9)]

    async def scenario() -> None:
        async def stalls_after_three(since: str | None) -> AsyncIterator[str]:
            served = [line for line in log if since is None or line[:19] >= since[:19]]
            if api.followed["job-pod"][-1]:
                # The stream delivers three lines, then nothing while the trainer prints the rest and exits.
                for line in served[:3]:
                    yield line
                raise TimeoutError("Timeout on reading data from socket")
            for line in served:
                yield line

        api = FakeApi({"job-pod": stalls_after_three}, terminated=lambda _: True)
        ended = Ends()
        followers(api, ended).follow(stream("job"), FineTuneJobStatus())
        await ended.wait_for()
        assert api.followed["job-pod"] == [True, False]
        assert api.since["job-pod"] == [None, "2026-11-28T12:00:03Z"]
        assert api.patches["job"][-1]["progress"]["step"] == 8
        assert api.patches["job"][-1]["logs"].splitlines() == [line.split(" ", 1)[1] for line in log]

    asyncio.run(scenario())


def test_an_outage_of_any_length_never_makes_the_follower_give_up() -> None:
    async def scenario() -> None:
        attempts = 0

        async def down_for_a_while(_: str | None) -> AsyncIterator[str]:
            nonlocal attempts
            attempts += 1
            if attempts <= 25:
                raise ConnectionRefusedError("the API server is down")
            yield stamped(1, progress(7))

        api = FakeApi({"job-pod": down_for_a_while}, terminated=lambda _: attempts > 25)
        ended = Ends()
        followers(api, ended).follow(stream("job"), FineTuneJobStatus())
        await ended.wait_for()
        assert attempts == 26
        assert api.patches["job"][-1]["progress"]["step"] == 7

    asyncio.run(scenario())


def test_a_new_follower_starts_where_the_status_says_the_last_one_got_to() -> None:
    async def scenario() -> None:
        async def whole_log(since: str | None) -> AsyncIterator[str]:
            for second in range(1, 9):
                line = stamped(second, progress(second))
                if since is None or line[:19] >= since[:19]:
                    yield line

        api = FakeApi({"job-pod": whole_log}, terminated=lambda _: True)
        ended = Ends()
        earlier = FineTuneJobStatus(
            progress=Progress(step=5, total_steps=500, last_heartbeat="2026-11-28T12:00:05Z"), logs="line from before"
        )
        followers(api, ended).follow(stream("job"), earlier)
        await ended.wait_for()
        assert api.since["job-pod"] == ["2026-11-28T12:00:05Z"]
        last = api.patches["job"][-1]
        assert last["progress"]["step"] == 8
        assert last["logs"].splitlines() == ["line from before", *(progress(second) for second in range(5, 9))]

    asyncio.run(scenario())


def test_following_stops_when_the_finetunejob_is_gone_or_re_created() -> None:
    async def scenario() -> None:
        async def endless(_: str | None) -> AsyncIterator[str]:
            step = 0
            while True:
                step += 1
                yield stamped(1, progress(step))
                await asyncio.sleep(0.01)

        api = FakeApi({"job-pod": endless}, terminated=lambda _: False)
        api.gone.add("job")
        ended = Ends()
        logs = followers(api, ended)
        logs.follow(stream("job"), FineTuneJobStatus())
        # The endless stream's follower ends only by stopping: once it reads, wait for every other task to end.
        await asyncio.wait_for(api.reading.wait(), timeout=10)
        others = asyncio.all_tasks() - {asyncio.current_task()}
        await asyncio.wait_for(asyncio.gather(*others), timeout=10)
        assert logs.active == 0
        assert ended.streams == []
        assert "job" not in api.patches

    asyncio.run(scenario())
