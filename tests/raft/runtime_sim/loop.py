"""A deterministic asyncio event loop on a virtual clock, and an executor that runs jobs on it later.

SimEventLoop is asyncio's own BaseEventLoop (so tasks, futures, call_later, sleep and run_in_executor behave
as in production) with the selector replaced: instead of waiting for I/O, select(timeout) moves the virtual
clock to the next timer. Callbacks run in the order asyncio would run them, and nothing depends on the real
time or on threads, so a seed replays exactly and a simulated minute takes what its callbacks cost.

SimExecutor is what Replica gets instead of a thread pool: a job submitted by run_in_executor runs on the
loop after a random virtual latency (a write or an fsync taking time). kill() drops the jobs of a crashed
node: their futures are cancelled, so the coroutine waiting for them ends, and the work never happens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import random
from collections.abc import Callable
from typing import Any


class DeadlockError(RuntimeError):
    """Nothing is scheduled and nothing is ready: the simulation would wait for ever."""


class _VirtualSelector:
    def __init__(self, loop: SimEventLoop) -> None:
        self._loop = loop

    def select(self, timeout: float | None) -> list[Any]:
        if timeout is None:
            raise DeadlockError("the simulated event loop has nothing to do and nothing scheduled")
        if timeout > 0:
            self._loop._virtual_now += timeout
        return []

    def close(self) -> None:
        pass


class SimEventLoop(asyncio.BaseEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self._virtual_now = 0.0
        self._clock_resolution = 1e-9
        self._selector = _VirtualSelector(self)  # type: ignore[assignment]
        self.errors: list[BaseException | str] = []  # exceptions that reached the loop's handler
        self.set_exception_handler(self._record_error)

    def time(self) -> float:
        return self._virtual_now

    def _process_events(self, event_list: list[Any]) -> None:
        """No file descriptors are watched: the virtual selector never reports events, so none to process."""

    def _write_to_self(self) -> None:
        """call_soon_threadsafe wakes a real selector from another thread; the virtual loop has no selector to
        wake and runs every callback on its own next step."""

    def _record_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exception = context.get("exception")
        self.errors.append(exception if exception is not None else str(context.get("message")))


Job = tuple[Callable[..., Any], tuple[Any, ...]]


class SimExecutor(concurrent.futures.Executor):
    """Runs each submitted job on the loop after a latency drawn by ``latency(job)`` (virtual seconds).

    ``split(fn, args)`` may name the steps a job takes (each a function and its arguments): they then run one
    after the other, each after its own latency, so a crash can fall between them as it can in a real thread
    (a write that reached the page cache before the process died, its fsync never begun)."""

    def __init__(self, loop: SimEventLoop, latency: Callable[[Callable[..., Any]], float],
                 split: Callable[[Callable[..., Any], tuple[Any, ...]], list[Job] | None] = lambda fn, args: None,
                 ) -> None:
        self._loop = loop
        self._latency = latency
        self._split = split
        self.dead = False
        self._pending: list[concurrent.futures.Future[Any]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self.dead:
            future.cancel()
            return future
        self._pending.append(future)
        if kwargs:
            fn = functools.partial(fn, **kwargs)
        self._next_step(future, self._split(fn, args) or [(fn, args)])
        return future

    def _next_step(self, future: concurrent.futures.Future[Any], steps: list[Job]) -> None:
        self._loop.call_later(self._latency(steps[0][0]), self._run, future, steps)

    def _run(self, future: concurrent.futures.Future[Any], steps: list[Job]) -> None:
        if future not in self._pending:
            return  # the process was killed meanwhile
        if future.done() or self.dead:
            self._pending.remove(future)
            future.cancel()
            return
        fn, args = steps[0]
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine, as a thread pool does
            self._pending.remove(future)
            future.set_exception(exc)
            return
        if len(steps) > 1:
            self._next_step(future, steps[1:])
            return
        self._pending.remove(future)
        future.set_result(result)

    def kill(self) -> None:
        """The process died: pending jobs never run, and whoever waits for them is cancelled."""
        self.dead = True
        for future in self._pending:
            future.cancel()
        self._pending.clear()


def uniform_latency(rng: random.Random, low_s: float, high_s: float) -> Callable[[Callable[..., Any]], float]:
    def latency(fn: Callable[..., Any]) -> float:
        return rng.uniform(low_s, high_s)
    return latency
