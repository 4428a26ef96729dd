"""Adversarial tests of a Replica's split flush (_write_then_sync): a small append written on the event loop and
fsynced by a syncer (the broker's native fsync threads, or a stand-in that holds, fails or refuses the fsync),
with the replica closed or the fsync failing while it is in flight."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from logbroker_client import records as rec

from logbroker.cluster.fsync_threads import FsyncThreads
from logbroker.cluster.raft_storage import ReplicaStateFile
from logbroker.cluster.replica import Replica, ReplicaFailedError
from logbroker.raft.membership import Membership
from logbroker.raft.types import Message, RaftConfig, Role
from logbroker.server.config import DEFAULT_RAFT_HEARTBEAT_TICKS
from logbroker.storage.config import LogConfig
from logbroker.storage.errors import StorageError
from logbroker.storage.files import OS_FILES, FileSystem
from logbroker.storage.log import PartitionLog

GROUP = "adv-0"
DEADLINE_S = 5.0


class NoTransport:
    def send_many(self, items: Sequence[tuple[str, Message]]) -> None:
        pass


class StandInSyncer:
    """Fsyncs at once (really, on the loop) unless told to hold, fail or refuse the next ones."""

    def __init__(self) -> None:
        self.mode = "sync"
        self.held: list[tuple[int, asyncio.Future[None]]] = []
        self.calls = 0

    def supports(self, fs: FileSystem) -> bool:
        return True

    def fdatasync(self, fs: FileSystem, fd: int) -> asyncio.Future[None]:
        self.calls += 1
        if self.mode == "refuse":
            raise OSError(errno.EMFILE, "no descriptor left for the copy")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.mode == "hold":
            self.held.append((fd, future))
        elif self.mode == "fail":
            future.set_exception(OSError(errno.EIO, "fdatasync failed: Input/output error"))
        else:
            fs.fdatasync(fd)
            future.set_result(None)
        return future


class GatedFiles(FileSystem):
    """Real files; once armed, the next fsync waits for the gate and records which file (inode) it synced."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.synced: list[tuple[int, int]] = []  # (descriptor, inode) of each gated fsync

    def fsync(self, fd: int) -> None:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.gate.wait(DEADLINE_S)
            try:
                self.synced.append((fd, os.fstat(fd).st_ino))
            except OSError:
                self.synced.append((fd, -1))
        super().fsync(fd)


def one_node_replica(root: Path, executor: ThreadPoolExecutor, syncer: object,
                     fs: FileSystem = OS_FILES) -> Replica:
    directory = root / GROUP
    plog = PartitionLog.open(directory, LogConfig(), "adv", 0, fs)
    return Replica(GROUP, plog, ReplicaStateFile(directory / "raft.state"), Membership.of((1,)),
                   RaftConfig(node_id=1, heartbeat_timeout_ticks=DEFAULT_RAFT_HEARTBEAT_TICKS), NoTransport(),
                   executor, on_commit=lambda r, e: None, syncer=syncer)  # type: ignore[arg-type]


async def until(condition: Callable[[], bool], what: str, replica: Replica | None = None) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {DEADLINE_S} s"
        if replica is not None and not replica.closed:
            replica.tick()
        await asyncio.sleep(0.002)


async def elected(replica: Replica) -> None:
    replica.campaign_now()
    await until(lambda: replica.node.role is Role.LEADER, "the lone replica to lead", replica)
    # its first entry (the new leader's) made durable, so that the next append is a plain small one
    await until(lambda: replica.durable_offset == replica.log.log_end_offset and not replica._busy,
                "the leader's first entry to be durable", replica)


def write_one(replica: Replica, value: bytes) -> int:
    (entry,) = replica.propose([(rec.build_batch([(int(time.time() * 1000), None, value, [])]), 1)])
    return entry.last_offset


def run(root: Path, syncer: object, scenario: Callable[[Replica, ThreadPoolExecutor], Awaitable[None]],
        fs: FileSystem = OS_FILES) -> None:
    async def main() -> None:
        with ThreadPoolExecutor(2) as executor:
            replica = one_node_replica(root, executor, syncer, fs)
            try:
                await elected(replica)
                await scenario(replica, executor)
            finally:
                if not replica.closed or not replica.log.closed:
                    replica.close()
    asyncio.run(main())


def test_nothing_is_durable_or_committed_while_the_split_fsync_is_held(tmp_path: Path) -> None:
    syncer = StandInSyncer()

    async def scenario(replica: Replica, executor: ThreadPoolExecutor) -> None:
        syncer.mode = "hold"
        offset = write_one(replica, b"held")
        durable, committed = replica.wait_durable(offset), replica.wait_committed(offset)
        await until(lambda: bool(syncer.held), "the split fsync to be handed over", replica)
        for _ in range(50):  # the loop turns, ticks come: still nothing may be acknowledged
            replica.tick()
            await asyncio.sleep(0.001)
        assert not durable.done() and not committed.done()
        assert replica.log.durable_offset <= offset
        fd, future = syncer.held.pop()
        os.fdatasync(fd)
        future.set_result(None)
        await asyncio.wait_for(asyncio.gather(durable, committed), DEADLINE_S)
        assert replica.log.durable_offset == offset + 1

    run(tmp_path, syncer, scenario)


def test_a_failed_split_fsync_stops_the_replica_fails_its_waiters_and_cuts_what_was_not_durable(
        tmp_path: Path) -> None:
    syncer = StandInSyncer()

    async def scenario(replica: Replica, executor: ThreadPoolExecutor) -> None:
        end_before = replica.log.log_end_offset
        syncer.mode = "fail"
        offset = write_one(replica, b"lost")
        durable = replica.wait_durable(offset)
        with pytest.raises(ReplicaFailedError):
            await asyncio.wait_for(durable, DEADLINE_S)
        assert replica.closed and isinstance(replica.failure, StorageError)
        assert replica.damaged_from == end_before  # a reopen cuts there
        assert replica.log.log_end_offset == end_before  # cut at once in the page cache too
        assert replica.log.unsynced_from == end_before

    run(tmp_path, syncer, scenario)


@pytest.mark.parametrize("outcome", ["ok", "eio"])
def test_a_replica_closed_while_its_split_fsync_is_in_flight_fails_its_waiter_and_ignores_the_answer(
        tmp_path: Path, outcome: str) -> None:
    syncer = StandInSyncer()

    async def scenario(replica: Replica, executor: ThreadPoolExecutor) -> None:
        syncer.mode = "hold"
        offset = write_one(replica, b"in flight at close")
        durable = replica.wait_durable(offset)
        await until(lambda: bool(syncer.held), "the split fsync to be handed over", replica)
        replica.close()
        with pytest.raises(RuntimeError, match="replica closed"):
            await asyncio.wait_for(durable, DEADLINE_S)
        _, future = syncer.held.pop()
        if outcome == "ok":
            future.set_result(None)
        else:
            future.set_exception(OSError(errno.EIO, "late failure"))
        await until(lambda: not replica._busy, "the Ready task to end")
        assert replica.failure is None  # closed on purpose: a late answer is no failure
        assert replica.damaged_from is None

    run(tmp_path, syncer, scenario)


def test_a_replica_closed_with_the_real_threads_busy_reopens_with_every_acknowledged_write(tmp_path: Path) -> None:
    syncer = FsyncThreads.start(2)
    if syncer is None:
        pytest.skip("the native fsync threads are not built")
    acknowledged: list[int] = []

    def note_acknowledged(offset: int, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is None:
            acknowledged.append(offset)

    async def scenario(replica: Replica, executor: ThreadPoolExecutor) -> None:
        waiters = []
        for index in range(40):
            offset = write_one(replica, b"r%d" % index)
            waiter = replica.wait_durable(offset)
            waiter.add_done_callback(functools.partial(note_acknowledged, offset))
            waiters.append(waiter)
            if index < 10:  # the first ones acknowledged one by one, the rest still in flight at the close
                await asyncio.wait_for(waiter, DEADLINE_S)
        replica.close()  # mid-stream: some fsyncs are still with the threads
        await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), DEADLINE_S)
        await until(lambda: syncer.in_flight == 0, "the threads to answer every fsync")

    try:
        run(tmp_path, syncer, scenario)
    finally:
        syncer.close()
    assert acknowledged, "nothing was acknowledged at all: the test did not exercise the split path"
    plog = PartitionLog.open(tmp_path / GROUP, LogConfig(), "adv", 0)
    try:
        assert plog.log_end_offset > max(acknowledged)
    finally:
        plog.close()


def test_an_fsync_the_threads_refuse_goes_to_the_pool_and_is_acknowledged_after_it(tmp_path: Path) -> None:
    syncer = StandInSyncer()

    async def scenario(replica: Replica, executor: ThreadPoolExecutor) -> None:
        syncer.mode = "refuse"
        offsets = [write_one(replica, b"fallback %d" % i) for i in range(3)]
        await asyncio.wait_for(replica.wait_durable(offsets[-1]), DEADLINE_S)
        assert syncer.calls >= 1 and not replica.closed and replica.failure is None
        assert replica.log.durable_offset == offsets[-1] + 1

    run(tmp_path, syncer, scenario)


def test_the_pool_fallback_never_fsyncs_a_file_that_took_the_closed_segments_descriptor(tmp_path: Path) -> None:
    syncer = StandInSyncer()
    files = GatedFiles()
    stranger_fds: list[int] = []

    async def scenario(replica: Replica, executor: ThreadPoolExecutor) -> None:
        segment_fd = replica.log._segments[-1].fd
        segment_inode = os.fstat(segment_fd).st_ino
        syncer.mode = "refuse"
        files.armed = True
        write_one(replica, b"fallback while closing")
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, files.entered.wait, DEADLINE_S), "the pool fsync never started"
        replica.close()  # the segment's descriptor is closed while the pool job holds its number
        for index in range(64):  # another partition opens files: the lowest free numbers come back
            fd = os.open(tmp_path / f"stranger-{index}", os.O_RDWR | os.O_CREAT, 0o644)
            stranger_fds.append(fd)
            if fd == segment_fd:
                break
        assert segment_fd in stranger_fds, "the descriptor number was not reused (the test proves nothing)"
        files.gate.set()
        await until(lambda: bool(files.synced), "the pool fsync to run")
        await until(lambda: not replica._busy, "the Ready task to end")
        fd, inode = files.synced[0]
        assert fd == segment_fd
        assert inode in (segment_inode, -1), "the pool fsynced another file that took the segment's descriptor"

    try:
        run(tmp_path, syncer, scenario, files)
    finally:
        files.gate.set()
        for fd in stranger_fds:
            os.close(fd)
