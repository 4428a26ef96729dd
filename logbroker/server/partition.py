"""A partition served by this broker: its log, group commit, the high watermark and fetch wake-ups.

Group commit: appends write to the log at once (one os.write per request); an ack under
`flush="always"` then waits for a flush that covers it. One flush runs at a time per partition in a
thread pool, and it covers every append that happened before it started, so N concurrent producers
cost one fsync, not N.

The high watermark is what consumers may read. Under `flush="always"` it is the durable offset, so a
consumer never sees a record that a crash could take back; under `flush="interval"` it is the log end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor

from logbroker.storage.log import AppendResult, PartitionLog

log = logging.getLogger("logbroker.partition")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Partition:
    def __init__(
        self,
        topic: str,
        index: int,
        plog: PartitionLog,
        executor: Executor,
        on_high_watermark: Callable[[], None],
        flush_always: bool,
    ) -> None:
        self.topic = topic
        self.index = index
        self.log = plog
        self.leader_epoch = max(plog.last_epoch(), 0)
        self._executor = executor
        self._on_high_watermark = on_high_watermark
        self._flush_always = flush_always
        self._durable_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._flush_task: asyncio.Task[None] | None = None
        self.high_watermark = plog.durable_offset if flush_always else plog.log_end_offset
        self.closed = False

    @property
    def name(self) -> str:
        return f"{self.topic}-{self.index}"

    async def append(self, batches: bytearray, wait_durable: bool) -> AppendResult:
        """Append validated batches; with wait_durable, return only once they are fsynced."""
        result = self.log.append(batches, self.leader_epoch, now_ms())
        if not self._flush_always:
            self._advance_high_watermark(self.log.log_end_offset)
            return result
        waiter = self._wait_durable(result.last_offset + 1)
        if wait_durable:
            await waiter
        else:  # acks=0: nobody awaits, but the flush must still run so the high watermark moves
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
        return result

    def _wait_durable(self, offset: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._durable_waiters.append((offset, future))
        if self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_until_idle())
        return future

    async def _flush_until_idle(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._durable_waiters and not self.closed:
                try:
                    durable = await loop.run_in_executor(self._executor, self.log.flush)
                except Exception as exc:  # a failing fsync fails every waiter, loudly
                    log.error("%s: fsync failed (%s); producers waiting on it get STORAGE_ERROR", self.name, exc)
                    self._fail_waiters(exc)
                    return
                self._advance_high_watermark(durable)
                self._release_waiters(durable)
        finally:
            self._flush_task = None

    def _release_waiters(self, durable: int) -> None:
        still_waiting = []
        for offset, future in self._durable_waiters:
            if offset <= durable:
                if not future.done():
                    future.set_result(None)
            else:
                still_waiting.append((offset, future))
        self._durable_waiters = still_waiting

    def _fail_waiters(self, exc: BaseException) -> None:
        for _, future in self._durable_waiters:
            if not future.done():
                future.set_exception(exc)
        self._durable_waiters = []

    def _advance_high_watermark(self, offset: int) -> None:
        if offset > self.high_watermark:
            self.high_watermark = offset
            self._on_high_watermark()

    def flush_now(self) -> None:
        """The periodic flush of `flush="interval"` partitions (runs in the thread pool)."""
        if not self.closed:
            self.log.flush()

    async def close(self) -> None:
        if self._flush_task is not None:
            await asyncio.wait([self._flush_task], timeout=10)
        self.closed = True
        self.log.close()
        self._fail_waiters(RuntimeError(f"{self.name} closed"))
