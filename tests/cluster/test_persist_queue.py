"""PersistQueue: a lone job goes at once, alone; queued jobs share trips to the pool, each with its own outcome,
never more than max_jobs in the pool at once, in the order they came."""

from __future__ import annotations

import asyncio
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest

from logbroker.cluster.persist_queue import PersistQueue

GATE_WAIT_S = 10.0


class Disk:
    """Jobs that record the order they ran in and how many ran at once, held at a gate until it opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.ran: list[int] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()
        self._now = 0
        self.most_at_once = 0

    def job(self, number: int) -> int:
        with self._lock:
            self._now += 1
            self.most_at_once = max(self.most_at_once, self._now)
        try:
            assert self.gate.wait(GATE_WAIT_S), "the test never opened the gate"
            with self._lock:
                self.ran.append(number)
                self.threads.add(threading.current_thread().name)
            return number * 10
        finally:
            with self._lock:
                self._now -= 1

    def failing_job(self, number: int) -> int:
        self.job(number)
        raise OSError(28, f"no space left on device for job {number}")


async def until(condition: object, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + GATE_WAIT_S
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, f"{what} not within {GATE_WAIT_S} s"
        await asyncio.sleep(0.001)


def test_a_lone_job_goes_at_once_in_a_trip_of_its_own() -> None:
    async def scenario() -> None:
        disk = Disk()
        with ThreadPoolExecutor(4) as pool:
            queue = PersistQueue(pool, max_jobs=4)
            assert await queue.run(disk.job, 7) == 70
            assert await queue.run(disk.job, 8) == 80
            assert (queue.trips, queue.jobs) == (2, 2)
            assert all(name != threading.current_thread().name for name in disk.threads)  # ran in the pool

    asyncio.run(scenario())


def test_queued_jobs_share_trips_and_never_exceed_the_pool() -> None:
    async def scenario() -> None:
        disk = Disk()
        with ThreadPoolExecutor(8) as pool:
            queue = PersistQueue(pool, max_jobs=2, max_batch=4)
            disk.gate.clear()
            calls = [asyncio.ensure_future(queue.run(disk.job, n)) for n in range(20)]
            await until(lambda: queue.waiting == 18, "two jobs in the pool and the rest queued")
            disk.gate.set()
            assert await asyncio.gather(*calls) == [n * 10 for n in range(20)]  # each caller its own result
            assert sorted(disk.ran) == list(range(20))  # two trips run side by side: order only within each
            assert disk.most_at_once <= 2, disk.most_at_once
            assert queue.jobs == 20
            assert queue.trips <= 2 + 18 // 4 + 1, queue.trips  # the 18 queued went at most 4 to a trip

    asyncio.run(scenario())


def test_one_job_at_a_time_runs_jobs_in_the_order_they_came() -> None:
    async def scenario() -> None:
        disk = Disk()
        with ThreadPoolExecutor(4) as pool:
            queue = PersistQueue(pool, max_jobs=1, max_batch=3)
            disk.gate.clear()
            calls = [asyncio.ensure_future(queue.run(disk.job, n)) for n in range(10)]
            await until(lambda: queue.waiting == 9, "one job in the pool and the rest queued")
            disk.gate.set()
            await asyncio.gather(*calls)
            assert disk.ran == list(range(10))  # first come, first written
            assert queue.trips == 1 + 3  # then 3, 3 and 3 to a trip

    asyncio.run(scenario())


def test_a_failed_job_fails_its_own_caller_only() -> None:
    async def scenario() -> None:
        disk = Disk()
        with ThreadPoolExecutor(2) as pool:
            queue = PersistQueue(pool, max_jobs=1, max_batch=8)
            disk.gate.clear()
            first = asyncio.ensure_future(queue.run(disk.job, 0))
            await until(lambda: disk.most_at_once == 1, "the first job to be in the pool")
            calls = [asyncio.ensure_future(queue.run(disk.failing_job if n == 2 else disk.job, n)) for n in (1, 2, 3)]
            await until(lambda: queue.waiting == 3, "three jobs queued behind it")
            disk.gate.set()
            assert await first == 0
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            assert outcomes[0] == 10 and outcomes[2] == 30
            assert isinstance(outcomes[1], OSError) and "job 2" in str(outcomes[1])
            assert queue.trips == 2  # the three queued ones shared one trip

    asyncio.run(scenario())


def test_a_caller_that_stops_waiting_leaves_the_others_answered() -> None:
    async def scenario() -> None:
        disk = Disk()
        with ThreadPoolExecutor(2) as pool:
            queue = PersistQueue(pool, max_jobs=1)
            disk.gate.clear()
            first = asyncio.ensure_future(queue.run(disk.job, 0))
            await until(lambda: disk.most_at_once == 1, "the first job to be in the pool")
            abandoned = asyncio.ensure_future(queue.run(disk.job, 1))
            kept = asyncio.ensure_future(queue.run(disk.job, 2))
            await until(lambda: queue.waiting == 2, "two jobs queued")
            abandoned.cancel()  # a replica closed while its write waited
            disk.gate.set()
            assert await first == 0 and await kept == 20
            with pytest.raises(asyncio.CancelledError):
                await abandoned
            assert disk.ran == [0, 1, 2]  # handed over, so it runs: as with run_in_executor

    asyncio.run(scenario())


def test_jobs_after_the_pool_shut_down_fail_with_its_error() -> None:
    async def scenario() -> None:
        disk = Disk()
        pool = ThreadPoolExecutor(1)
        queue = PersistQueue(pool, max_jobs=1)
        pool.shutdown()
        with pytest.raises(RuntimeError, match="shutdown"):
            await queue.run(disk.job, 1)
        assert disk.ran == []

    asyncio.run(scenario())


class Blob:
    """Stands for a Ready's batches (megabytes): weakly referenced to see when the queue lets it go."""


def test_a_jobs_data_is_let_go_once_it_has_run_while_the_rest_of_its_trip_runs() -> None:
    """A trip may carry 32 Readys of up to 4 MiB each: each one's data is freed when its own job has run, not when
    the last job of the trip has (the memory-bound test holds a broker to 280 MiB under 16 busy partitions)."""
    async def scenario() -> None:
        disk = Disk()
        later = threading.Event()
        seen: list[weakref.ref[Blob]] = []

        def blob() -> Blob:
            made = Blob()
            seen.append(weakref.ref(made))
            return made

        with ThreadPoolExecutor(2) as pool:
            queue = PersistQueue(pool, max_jobs=1, max_batch=4)
            disk.gate.clear()
            first = asyncio.ensure_future(queue.run(disk.job, 0))
            await until(lambda: disk.most_at_once == 1, "the first job to be in the pool")
            written = asyncio.ensure_future(queue.run(lambda data: data is not None, blob()))
            still_running = asyncio.ensure_future(queue.run(later.wait, GATE_WAIT_S))
            await until(lambda: queue.waiting == 2, "two jobs queued for one trip")
            disk.gate.set()
            await until(lambda: seen[0]() is None, "the written job's data to be freed while its trip still runs")
            assert not still_running.done()
            later.set()
            assert await first == 0 and await written is True and await still_running is True
            assert queue.trips == 2

    asyncio.run(scenario())
