"""The broker's native fsync threads (logbroker/cluster/fsync_threads.py and its C extension), on real files."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from pathlib import Path

import pytest

from logbroker.cluster import fsync_threads
from logbroker.storage.files import OS_FILES
from tests.raft.runtime_sim.disk import SimDisk

pytestmark = pytest.mark.skipif(fsync_threads._NativeThreads is None,
                                reason="the native fsync threads were not built (no C compiler at install)")


def start(threads: int = 2) -> fsync_threads.FsyncThreads:
    syncer = fsync_threads.FsyncThreads.start(threads)
    assert syncer is not None
    return syncer


def written_file(path: Path, data: bytes = b"x" * 100) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, data)
    return fd


async def test_an_fsync_is_answered_on_the_loop_and_leaves_the_callers_descriptor_open(tmp_path: Path) -> None:
    syncer = start()
    fd = written_file(tmp_path / "segment.log")
    try:
        await asyncio.wait_for(syncer.fdatasync(OS_FILES, fd), 10)
        assert syncer.in_flight == 0
        os.write(fd, b"more")  # the threads closed their own copy, not this one
    finally:
        os.close(fd)
        syncer.close()


async def test_many_fsyncs_of_many_files_at_once_are_each_answered(tmp_path: Path) -> None:
    syncer = start(threads=3)
    fds = [written_file(tmp_path / f"{i}.log") for i in range(40)]
    try:
        futures = [syncer.fdatasync(OS_FILES, fd) for fd in fds for _ in range(5)]  # more than a batch per thread
        await asyncio.wait_for(asyncio.gather(*futures), 30)
        assert all(f.done() and f.exception() is None for f in futures)
    finally:
        for fd in fds:
            os.close(fd)
        syncer.close()


async def test_a_failed_fsync_raises_its_errno() -> None:
    syncer = start()
    read_end, write_end = os.pipe()  # fdatasync of a pipe fails with EINVAL
    try:
        with pytest.raises(OSError) as failure:
            await asyncio.wait_for(syncer.fdatasync(OS_FILES, write_end), 10)
        assert failure.value.errno == errno.EINVAL
        assert "fdatasync failed" in str(failure.value)
    finally:
        os.close(read_end)
        os.close(write_end)
        syncer.close()


async def test_a_file_closed_while_its_fsync_runs_does_not_redirect_the_fsync(tmp_path: Path) -> None:
    syncer = start(threads=1)
    fd = written_file(tmp_path / "closed.log")
    future = syncer.fdatasync(OS_FILES, fd)
    os.close(fd)  # a replica stopped meanwhile; the number may be reused at once
    reused = os.open(tmp_path / "other.log", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        await asyncio.wait_for(future, 10)
        os.write(reused, b"still mine")
    finally:
        os.close(reused)
        syncer.close()


async def test_close_answers_the_fsyncs_already_asked_for_and_refuses_later_ones(tmp_path: Path) -> None:
    syncer = start()
    fds = [written_file(tmp_path / f"{i}.log") for i in range(10)]
    open_before = len(os.listdir("/proc/self/fd"))
    futures = [syncer.fdatasync(OS_FILES, fd) for fd in fds]
    syncer.close()
    try:
        assert all(f.done() and f.exception() is None for f in futures)
        with pytest.raises(RuntimeError, match="closed"):
            syncer.fdatasync(OS_FILES, fds[0])
        assert len(os.listdir("/proc/self/fd")) == open_before  # every copy made for a job is closed again
    finally:
        for fd in fds:
            os.close(fd)


def test_only_real_files_go_to_the_native_threads() -> None:
    assert fsync_threads.FsyncThreads.supports(OS_FILES)
    assert not fsync_threads.FsyncThreads.supports(SimDisk(random.Random(1), clock_ns=lambda: 0))


def test_the_thread_count_is_checked() -> None:
    with pytest.raises(ValueError, match="threads must be 1 to 64"):
        fsync_threads.FsyncThreads.start(0)
