"""A replica whose small appends are written on the event loop and fsynced apart (Replica._write_then_sync, the
broker's native fsync threads): it acknowledges nothing before that fsync returned, a failed one stops it as a
failed pool fsync does, and with the real threads a group commits and keeps every entry.

Three production Replicas on one event loop (the harness of test_replica_quiescence)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pytest

from logbroker.cluster import fsync_threads
from logbroker.cluster.replica import Replica
from logbroker.raft.types import Role
from logbroker.storage.config import LogConfig
from logbroker.storage.files import OS_FILES, FileSystem
from logbroker.storage.log import PartitionLog
from logbroker.storage.segment import LogSegment
from tests.cluster.test_replica_quiescence import GROUP, Network, open_replicas, until, write_one


class HeldSyncer:
    """Fsyncs that wait until the test lets them run (then really run, on the loop), counted per descriptor."""

    def __init__(self) -> None:
        self.held: list[tuple[int, asyncio.Future[None]]] = []
        self.failing = False

    @staticmethod
    def supports(fs: FileSystem) -> bool:
        return fs is OS_FILES

    def fdatasync(self, fs: FileSystem, fd: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.held.append((fd, future))
        return future

    def release(self) -> int:
        released = 0
        for fd, future in self.held:
            if future.done():
                continue
            if self.failing:
                future.set_exception(OSError(errno.EIO, "fdatasync failed: Input/output error"))
            else:
                OS_FILES.fsync(fd)
                future.set_result(None)
            released += 1
        self.held.clear()
        return released


@contextlib.asynccontextmanager
async def elected_group(tmp_path: Path, syncer: object) -> AsyncIterator[tuple[Network, dict[int, Replica]]]:
    """Three replicas on the given syncer, node 1 elected and known to all; closed afterwards."""
    with ThreadPoolExecutor(2) as executor:
        network = Network()
        replicas = open_replicas(tmp_path, network, executor, syncer=syncer)  # type: ignore[arg-type]
        try:
            replicas[1].campaign_now()
            await until(network, lambda: replicas[1].node.role is Role.LEADER, "node 1 to lead")
            await until(network, lambda: all(r.node.leader_id == 1 for r in replicas.values()),
                        "every replica's leader")
            yield network, replicas
        finally:
            for replica in replicas.values():
                replica.close()


def test_nothing_is_acknowledged_before_the_split_fsync_returned(tmp_path: Path) -> None:
    async def scenario() -> None:
        syncer = HeldSyncer()
        async with elected_group(tmp_path, syncer) as (network, replicas):
            syncer.release()
            first = write_one(replicas[1], b"first")  # the first flush of each log pays its directory's sync
            await until(network, lambda: syncer.release() >= 0 and replicas[1].high_watermark > first.last_offset,
                        "the first write to commit")
            entry = write_one(replicas[1], b"held at the fsync")
            durable = replicas[1].wait_durable(entry.last_offset)
            committed = replicas[1].wait_committed(entry.last_offset)
            await until(network, lambda: len(syncer.held) == 3, "every replica to ask for its fsync")
            for _ in range(20):
                network.deliver()
                await asyncio.sleep(0.001)
            assert not durable.done() and not committed.done()  # written everywhere, durable nowhere
            assert all(r.durable_offset <= entry.last_offset for r in replicas.values())
            assert syncer.release() == 3
            await until(network, committed.done, "the write to commit once its fsyncs returned")
            assert durable.done() and committed.exception() is None

    asyncio.run(scenario())


def test_a_failed_split_fsync_stops_the_replica_and_its_reopen_cuts_what_was_not_durable(tmp_path: Path) -> None:
    async def scenario() -> None:
        syncer = HeldSyncer()
        async with elected_group(tmp_path, syncer) as (network, replicas):
            first = write_one(replicas[1], b"durable")
            await until(network, lambda: syncer.release() >= 0 and all(
                r.durable_offset > first.last_offset for r in replicas.values()), "the first write on every disk")
            entry = write_one(replicas[1], b"its fsync fails")
            await until(network, lambda: len(syncer.held) == 3, "every replica to ask for its fsync")
            syncer.failing = True
            syncer.release()
            await until(network, lambda: all(r.closed for r in replicas.values()), "every replica to stop")
            for replica in replicas.values():
                assert replica.damaged_from == entry.base_offset, (replica.node_id, replica.damaged_from)
                assert "fdatasync failed" in str(replica.failure)
                assert replica.log.log_end_offset == entry.base_offset  # cut at once (forget_unsynced)

    asyncio.run(scenario())


@pytest.mark.skipif(fsync_threads._NativeThreads is None,
                    reason="the native fsync threads were not built (no C compiler at install)")
def test_a_group_on_the_native_fsync_threads_commits_and_keeps_every_entry(tmp_path: Path) -> None:
    async def scenario() -> None:
        syncer = fsync_threads.FsyncThreads.start(2)
        assert syncer is not None
        try:
            async with elected_group(tmp_path, syncer) as (network, replicas):
                entries = []
                for i in range(50):
                    entries.append(write_one(replicas[1], f"record {i}".encode()))
                    if i % 7 == 0:  # some alone, some sharing a Ready
                        await until(network, lambda: replicas[1].high_watermark > entries[-1].last_offset,
                                    f"record {i} to commit")
                last = entries[-1].last_offset
                await until(network, lambda: all(r.durable_offset > last for r in replicas.values()),
                            "every record on every disk")
        finally:
            syncer.close()
        for node in (1, 2, 3):
            reopened = PartitionLog.open(tmp_path / f"broker-{node}" / GROUP, replicas[1].log.config, "calm", 0)
            assert reopened.log_end_offset > last
            reopened.close()

    asyncio.run(scenario())


def test_a_roll_never_seals_a_segment_on_the_event_loop(tmp_path: Path) -> None:
    """Small segments, so that appends keep rolling: sealing the old segment fsyncs it, which must happen in the
    flush pool, never on the loop where the split path writes."""
    sealed_on: list[str] = []
    appending = True  # close() seals the active segment on the caller's thread, as it always did: not counted
    real_seal = LogSegment.seal

    def recording_seal(self: LogSegment) -> None:
        if appending:
            sealed_on.append(threading.current_thread().name)
        real_seal(self)

    async def scenario() -> None:
        nonlocal appending
        syncer = HeldSyncer()
        with ThreadPoolExecutor(2, thread_name_prefix="flush") as executor:
            network = Network()
            replicas = open_replicas(tmp_path, network, executor, LogConfig(segment_bytes=400),
                                     syncer=syncer)
            try:
                replicas[1].campaign_now()
                await until(network, lambda: replicas[1].node.role is Role.LEADER, "node 1 to lead")
                for i in range(30):
                    last = write_one(replicas[1], b"v" * 60 + str(i).encode()).last_offset
                    await until(network, lambda last=last: syncer.release() >= 0 and all(  # type: ignore[misc]
                        r.durable_offset > last for r in replicas.values()), f"record {i} everywhere")
            finally:
                appending = False
                for replica in replicas.values():
                    replica.close()
        assert all(len(r.log.segments) > 5 for r in replicas.values())

    with mock.patch.object(LogSegment, "seal", recording_seal):
        asyncio.run(scenario())
    assert sealed_on and all(name.startswith("flush") for name in sealed_on), sorted(set(sealed_on))


class NoDescriptorLeft(HeldSyncer):
    """The native threads' hand-over fails before any fsync ran (os.dup: EMFILE)."""

    def fdatasync(self, fs: FileSystem, fd: int) -> asyncio.Future[None]:
        raise OSError(errno.EMFILE, "Too many open files")


def test_an_fsync_that_cannot_be_handed_to_the_threads_runs_in_the_pool_and_is_no_failure(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with elected_group(tmp_path, NoDescriptorLeft()) as (network, replicas):
            entry = write_one(replicas[1], b"fsynced by the pool instead")
            await until(network, lambda: all(r.durable_offset > entry.last_offset for r in replicas.values()),
                        "the write on every disk")
            assert not any(r.closed for r in replicas.values())

    asyncio.run(scenario())


def test_flush_interval_appends_are_written_in_the_pool(tmp_path: Path) -> None:
    """Dirty pages pile up between an interval topic's fsyncs, and the kernel throttles a writer past its dirty
    limits: such appends stay off the event loop, whatever their size."""
    written_on: list[str] = []
    real_append = PartitionLog.append_replicated

    def recording_append(self: PartitionLog, batches: bytes | bytearray, now_ms: int | None = None) -> object:
        written_on.append(threading.current_thread().name)
        return real_append(self, batches, now_ms)

    async def scenario() -> None:
        syncer = HeldSyncer()
        with ThreadPoolExecutor(2, thread_name_prefix="flush") as executor:
            network = Network()
            replicas = open_replicas(tmp_path, network, executor, LogConfig(flush="interval"), syncer=syncer)
            try:
                replicas[1].campaign_now()
                await until(network, lambda: replicas[1].node.role is Role.LEADER, "node 1 to lead")
                last = write_one(replicas[1], b"interval").last_offset
                await until(network, lambda: replicas[1].high_watermark > last, "the write to commit")
            finally:
                for replica in replicas.values():
                    replica.close()
        assert not syncer.held  # nothing was handed to the fsync threads either

    with mock.patch.object(PartitionLog, "append_replicated", recording_append):
        asyncio.run(scenario())
    assert written_on and all(name.startswith("flush") for name in written_on), sorted(set(written_on))
