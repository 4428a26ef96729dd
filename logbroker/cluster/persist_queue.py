"""Many replicas' writes and fsyncs in one trip to the flush pool when they queue.

Every Ready that appends entries hands its write and fsync to the broker's thread pool and awaits them. A trip
to the pool costs the event loop more than the job's own Python: a concurrent future wrapped in an asyncio one,
a queue put and a thread wake-up going, a call_soon_threadsafe and a loop wake-up coming back, and a worker
thread contending for the GIL at each end. After a broker dies, each survivor's thousands of new leaders and
followers persist their first entry at once, and those trips were an eighth of its event loop's time.

A PersistQueue keeps at most ``max_jobs`` jobs in the pool (its threads). While fewer run, a job goes at once,
alone, exactly as run_in_executor would send it: an idle broker's lone write waits for nothing. Once all run,
the next ones wait here, and each job that finishes takes up to ``max_batch`` of them into one trip, run one
after the other in the worker (each with its own result or exception), and answered from one loop callback.
The fsyncs keep the pool's parallelism (``max_jobs`` at a time); only the trips are shared.

All methods run on the event loop; only _run_each runs in a worker.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")

# How many queued jobs one trip carries at most: the last of them waits for the others' fsyncs, so enough to
# make trips rare under a burst (3,000 first entries: about a hundred trips) and few enough that one trip's
# serial fsyncs stay a few milliseconds on a disk whose fsync takes a tenth of one.
DEFAULT_MAX_BATCH = 32

Call = tuple[Callable[..., Any], tuple[Any, ...]]
Queued = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


class PersistQueue:
    def __init__(self, executor: Executor, max_jobs: int, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        assert max_jobs >= 1 and max_batch >= 1, (max_jobs, max_batch)
        self._executor = executor
        self._max_jobs = max_jobs
        self._max_batch = max_batch
        self._queued: deque[Queued] = deque()
        self._running = 0
        self.trips = 0  # trips to the pool so far
        self.jobs = 0  # jobs run so far (jobs / trips: how much the queue shared)

    @property
    def waiting(self) -> int:
        """Jobs queued here, not yet handed to the pool."""
        return len(self._queued)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the pool; return its result or raise its exception, as run_in_executor does."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queued.append((fn, args, future))
        del args  # the queue holds the job's data now, and lets it go once the job has run
        if self._running < self._max_jobs:
            self._start(loop)
        return await future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        count = min(self._max_batch, len(self._queued))
        calls: list[Call | None] = []
        futures: list[asyncio.Future[Any]] = []
        for _ in range(count):
            fn, args, future = self._queued.popleft()
            calls.append((fn, args))
            futures.append(future)
        try:
            if count == 1:
                fn, args = calls.pop()  # type: ignore[misc]
                trip = loop.run_in_executor(self._executor, fn, *args)  # as run_in_executor would: one job
            else:
                trip = loop.run_in_executor(self._executor, _run_each, calls)
        except RuntimeError as exc:  # the pool is shut down: the broker is closing
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        self._running += 1
        self.trips += 1
        self.jobs += count
        # Only the futures are kept here: each job's data (a Ready's batches, up to megabytes) is let go as soon as
        # that job has run, not when the whole trip has.
        trip.add_done_callback(lambda done: self._finished(loop, futures, done))

    def _finished(self, loop: asyncio.AbstractEventLoop, futures: list[asyncio.Future[Any]],
                  trip: asyncio.Future[Any]) -> None:
        self._running -= 1
        if trip.cancelled():
            for future in futures:
                future.cancel()
        elif (failure := trip.exception()) is not None:
            for future in futures:  # a lone job's exception, or the trip itself failed
                if not future.done():
                    future.set_exception(failure)
        elif len(futures) == 1:
            _answer(futures[0], True, trip.result())
        else:
            for future, (ok, value) in zip(futures, trip.result(), strict=True):
                _answer(future, ok, value)
        while self._queued and self._running < self._max_jobs:
            self._start(loop)


def _answer(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return  # its caller stopped waiting (a replica closed meanwhile); the job ran all the same
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def _run_each(calls: list[Call | None]) -> list[tuple[bool, Any]]:
    """In a worker: every job in order, each one's result or exception kept apart from the others'. Each job is
    dropped from the list once it has run, so its data can be freed while the rest run."""
    outcomes: list[tuple[bool, Any]] = []
    for index, call in enumerate(calls):
        assert call is not None
        fn, args = call
        calls[index] = None
        del call
        try:
            outcomes.append((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - handed to its own caller, as the pool would
            outcomes.append((False, exc))
    return outcomes
