"""Adversarial durability tests of the storage layer: sequences of crashes and disk errors an operator's
machine really goes through, run on the production classes over a simulated disk (SimDisk) or real files.

The promise under test: once PartitionLog.flush() has returned D (or open() has finished, which makes the
whole recovered log durable), every offset below D keeps its bytes through kill -9, power cuts, failed
fsyncs and full disks; and a ReplicaStateFile never loads a state older than its last save that returned.

Linux detail the simulation must respect: pwrite() on a descriptor opened with O_APPEND writes at the end
of the file whatever offset it is given (pwrite(2), BUGS). LinuxAppendDisk models that; SimDisk writes at
the offset. Segments are opened O_APPEND, so a rewrite in place through pwrite behaves differently on the
two.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from logbroker_client import records as rec

from logbroker.storage.config import LogConfig
from logbroker.storage.errors import LogDirectoryError
from logbroker.storage.files import FileSystem
from logbroker.storage.log import PartitionLog
from tests.raft.runtime_sim.disk import SimDisk

TOPIC = "adversary"
PARTITION = 0
T0_MS = 1_700_000_000_000
EPOCH = 3


# ---------------------------------------------------------------------------------------------- disks


class _NoWriteBack:
    """An rng for SimDisk's write_back_part that makes a failed fsync write back nothing (Linux may)."""

    def randint(self, low: int, high: int) -> int:
        return low

    def random(self) -> float:
        return 1.0


class ScriptedDisk(SimDisk):
    """SimDisk whose next `fail_fsyncs` fsyncs fail with EIO and write back nothing: the pages are marked
    clean, reads keep showing them, the disk never gets them (Linux's behaviour after a writeback error)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(random.Random(seed), lambda: T0_MS * 1_000_000)
        self.fail_fsyncs = 0

    def _maybe_fail_fsync(self, write_back: Callable[[random.Random], None]) -> None:
        if self.fail_fsyncs:
            self.fail_fsyncs -= 1
            self.stats.fsyncs += 1
            self.stats.fsync_errors += 1
            write_back(_NoWriteBack())  # type: ignore[arg-type]
            raise OSError(errno.EIO, "Input/output error (scripted fsync failure)")
        super()._maybe_fail_fsync(write_back)


class LinuxAppendDisk(ScriptedDisk):
    """ScriptedDisk where pwrite on an O_APPEND descriptor appends, as Linux does (see
    test_linux_pwrite_on_an_o_append_descriptor_appends, which checks the real kernel)."""

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        descriptor = self._descriptor(fd)
        if descriptor.append:
            offset = len(descriptor.file.data)
        return self._write_at(descriptor.file, bytes(data), offset)


class FsyncFailsOnce(FileSystem):
    """The real OS, except that the fsync after arm() fails with EIO (the data stays in the page cache)."""

    def __init__(self) -> None:
        self.armed = False

    def arm(self) -> None:
        self.armed = True

    def fsync(self, fd: int) -> None:
        if self.armed:
            self.armed = False
            raise OSError(errno.EIO, "Input/output error (injected)")
        super().fsync(fd)


# ---------------------------------------------------------------------------------------------- helpers


def value_for(offset: int, generation: int) -> bytes:
    return b"offset=%d gen=%d" % (offset, generation)


def batch_at(offset: int, records: int, generation: int) -> bytearray:
    """A batch whose record values name the offsets they are appended at (the log stamps the offsets)."""
    return bytearray(rec.build_batch([(T0_MS + i, None, value_for(offset + i, generation), [])
                                      for i in range(records)]))


def append(plog: PartitionLog, records: int, generation: int = 0) -> list[tuple[int, bytes]]:
    start = plog.log_end_offset
    plog.append(batch_at(start, records, generation), EPOCH, T0_MS)
    assert plog.log_end_offset == start + records
    return [(start + i, value_for(start + i, generation)) for i in range(records)]


def read_values(plog: PartitionLog) -> dict[int, bytes]:
    """Every record in the log, offset -> value, checking offsets are contiguous from the log start."""
    out: dict[int, bytes] = {}
    offset = plog.log_start_offset
    expected = offset
    while offset < plog.log_end_offset:
        data = plog.read(offset, 1 << 20)
        assert data, f"read at offset {offset} returned nothing before the log end {plog.log_end_offset}"
        for header, records in rec.iter_batches(data):
            for record in records:
                assert record.offset == expected, f"offset {record.offset} where {expected} was expected"
                out[record.offset] = record.value or b""
                expected += 1
            offset = header.base_offset + header.last_offset_delta + 1
    return out


def open_log(directory: Path, fs: FileSystem, segment_bytes: int = 1 << 20) -> PartitionLog:
    return PartitionLog.open(directory, LogConfig(segment_bytes=segment_bytes), TOPIC, PARTITION, fs=fs)


def assert_durable_kept(plog: PartitionLog, durable: dict[int, bytes], context: str) -> None:
    values = read_values(plog)
    lost = sorted(offset for offset in durable if offset not in values)
    changed = sorted(offset for offset in durable if offset in values and values[offset] != durable[offset])
    assert not lost and not changed, (
        f"{context}: offsets that flush() or open() had reported durable were lost {lost[:10]} "
        f"(of {len(lost)}) or changed {changed[:10]} (of {len(changed)}); the log is now "
        f"{plog.log_start_offset}..{plog.log_end_offset}")


# ------------------------------------------------------------------------ failed fsync and O_APPEND


def test_linux_pwrite_on_an_o_append_descriptor_appends(tmp_path: Path) -> None:
    """The kernel fact the disk models rest on: pwrite ignores its offset on an O_APPEND descriptor."""
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, b"abcdef")
        os.pwrite(fd, b"XY", 1)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"abcdefXY"


@pytest.mark.xfail(strict=True, reason=(
    "LogSegment._redirty rewrites the unsynced bytes with fs.pwrite(fd, ..., start), but the segment's "
    "descriptor is opened O_RDWR|O_CREAT|O_APPEND (LogSegment.__init__), and on Linux pwrite on an O_APPEND "
    "descriptor appends: after a failed fsync the .log file grows by a copy of its unsynced bytes instead of "
    "having them dirtied again in place"))
def test_failed_fsync_on_real_files_leaves_the_segment_file_as_the_log_sees_it(tmp_path: Path) -> None:
    fs = FsyncFailsOnce()
    plog = open_log(tmp_path / "p", fs)
    try:
        append(plog, 5)
        plog.flush()
        append(plog, 5)
        fs.arm()
        with pytest.raises(LogDirectoryError):
            plog.flush()
        segment = plog.segments[-1]
        on_disk = os.path.getsize(segment.log_path)
        assert on_disk == segment.size_bytes, (
            f"after a failed fsync the segment file holds {on_disk} bytes, the segment {segment.size_bytes}: "
            f"{on_disk - segment.size_bytes} bytes were appended by the rewrite of the unsynced ones")
    finally:
        plog.close()


def _recovery_fsync_fails_then_power_cut(disk: ScriptedDisk, directory: Path) -> None:
    """kill -9 with unsynced records in the page cache; the reopen's own fsync fails (EIO); the retried
    open succeeds; new records are flushed (flush() reports them durable); then the power goes."""
    plog = open_log(directory, disk)
    durable = dict(append(plog, 10))
    assert plog.flush() == 10
    append(plog, 10)  # never fsynced by this process
    disk.kill()
    disk.fail_fsyncs = 1
    with pytest.raises(LogDirectoryError):
        open_log(directory, disk)  # recovery fsyncs what it kept: that fsync fails
    plog = open_log(directory, disk)  # the broker retries the open once the disk answers again
    durable = read_values(plog)  # open() makes everything it kept durable
    assert len(durable) == 20
    durable.update(append(plog, 10, generation=1))
    assert plog.flush() == 30
    disk.power_cut()
    plog = open_log(directory, disk)
    try:
        assert_durable_kept(plog, durable, "kill -9, failed recovery fsync, retried open, flush, power cut")
    finally:
        plog.close()


def test_recovery_whose_fsync_failed_then_power_cut_on_simdisk(tmp_path: Path) -> None:
    """Control: on SimDisk (pwrite writes in place) the rewrite of the unsynced bytes protects them."""
    _recovery_fsync_fails_then_power_cut(ScriptedDisk(), tmp_path / "p")


@pytest.mark.xfail(strict=True, reason=(
    "Same sequence on a disk with Linux's pwrite semantics: kill -9 with 10 unsynced records; the reopen's "
    "recovery fsync fails (EIO, nothing written back, pages marked clean); LogSegment._redirty's pwrite on "
    "the O_APPEND descriptor appends a copy of the whole segment instead of dirtying its bytes in place; the "
    "retried open cuts the copy (offsets go backwards), its fsync succeeds without writing the clean pages, "
    "and it reports offsets 10..19 durable; records 20..29 are flushed; a power cut leaves zeros at 10..19 "
    "and recovery cuts the log at offset 10, losing 20 records flush() and open() had reported durable"))
def test_recovery_whose_fsync_failed_then_power_cut_with_linux_pwrite(tmp_path: Path) -> None:
    _recovery_fsync_fails_then_power_cut(LinuxAppendDisk(), tmp_path / "p")
