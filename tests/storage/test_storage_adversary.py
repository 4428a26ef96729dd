"""Adversarial durability tests of the storage layer: sequences of crashes and disk errors an operator's
machine really goes through, run on the production classes over a simulated disk (SimDisk) or real files.

The promise under test: once PartitionLog.flush() has returned D (or open() has finished, which makes the
whole recovered log durable), every offset below D keeps its bytes through kill -9, power cuts, failed
fsyncs and full disks; and a ReplicaStateFile never loads a state older than its last save that returned.

Linux detail the simulation must respect: pwrite() on a descriptor opened with O_APPEND writes at the end
of the file whatever offset it is given (pwrite(2), BUGS). Segments are opened O_APPEND, so a rewrite in
place through pwrite on their descriptor appends. LinuxAppendDisk models that explicitly (SimDisk does too
since ca94ffd; it first wrote at the offset, which hid the bug).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from logbroker_client import records as rec

from logbroker.cluster.raft_storage import ReplicaState, ReplicaStateFile
from logbroker.cluster.state_log import RaftStateLog
from logbroker.raft.membership import Membership
from logbroker.storage.config import LogConfig
from logbroker.storage.errors import LogDirectoryError, StorageError
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


class _AllWriteBack(_NoWriteBack):
    """Makes a failed fsync write back every unsynced change (the error came from elsewhere)."""

    def randint(self, low: int, high: int) -> int:
        return high


class ScriptedDisk(SimDisk):
    """SimDisk whose next `fail_fsyncs` fsyncs fail with EIO. By default they write back nothing: the pages
    are marked clean, reads keep showing them, the disk never gets them (Linux after a writeback error);
    with `write_back_all` every unsynced change reaches the disk although the fsync reports an error. A power
    cut keeps nothing that was not fsynced (the worst case, every time)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(random.Random(seed), lambda: T0_MS * 1_000_000)
        self.fail_fsyncs = 0
        self.write_back_all = False

    def _maybe_fail_fsync(self, write_back: Callable[[random.Random], None]) -> None:
        if self.fail_fsyncs:
            self.fail_fsyncs -= 1
            self.stats.fsyncs += 1
            self.stats.fsync_errors += 1
            write_back(_AllWriteBack() if self.write_back_all else _NoWriteBack())  # type: ignore[arg-type]
            raise OSError(errno.EIO, "Input/output error (scripted fsync failure)")
        super()._maybe_fail_fsync(write_back)

    def power_cut(self) -> None:
        rng = self._rng
        self._rng = _NoWriteBack()  # type: ignore[assignment]
        try:
            super().power_cut()
        finally:
            self._rng = rng


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


def batch_at(offset: int, records: int, generation: int, padding_bytes: int = 0) -> bytearray:
    """A batch whose record values name the offsets they are appended at (the log stamps the offsets)."""
    return bytearray(rec.build_batch([(T0_MS + i, None, value_for(offset + i, generation), [])
                                      for i in range(records)] if not padding_bytes else
                                     [(T0_MS, None, value_for(offset, generation) + b"." * padding_bytes, [])]))


def append(plog: PartitionLog, records: int, generation: int = 0, padding_bytes: int = 0) -> list[tuple[int, bytes]]:
    """Append `records` records in one batch (padding_bytes > 0: one record of that much more)."""
    start = plog.log_end_offset
    plog.append(batch_at(start, records, generation, padding_bytes), EPOCH, T0_MS)
    assert plog.log_end_offset == start + records
    if padding_bytes:
        return [(start, value_for(start, generation) + b"." * padding_bytes)]
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


def batch_bases(plog: PartitionLog) -> list[int]:
    bases = []
    offset = plog.log_start_offset
    while offset < plog.log_end_offset:
        for header, _ in rec.iter_batches(plog.read(offset, 1 << 20)):
            bases.append(header.base_offset)
            offset = header.base_offset + header.last_offset_delta + 1
    return bases


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


# Regression (found by this file, fixed in ca94ffd):
# LogSegment._redirty rewrites the unsynced bytes with fs.pwrite(fd, ..., start), but the segment's descriptor
# is opened O_RDWR|O_CREAT|O_APPEND (LogSegment.__init__), and on Linux pwrite on an O_APPEND descriptor
# appends: after a failed fsync the .log file grows by a copy of its unsynced bytes instead of having them
# dirtied again in place
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
    """The same sequence on SimDisk as it is: the rewrite of the unsynced bytes protects them."""
    _recovery_fsync_fails_then_power_cut(ScriptedDisk(), tmp_path / "p")


# Regression (found by this file, fixed in ca94ffd):
# Same sequence on a disk with Linux's pwrite semantics: kill -9 with 10 unsynced records; the reopen's
# recovery fsync fails (EIO, nothing written back, pages marked clean); LogSegment._redirty's pwrite on the
# O_APPEND descriptor appends a copy of the whole segment instead of dirtying its bytes in place; the retried
# open cuts the copy (offsets go backwards), its fsync succeeds without writing the clean pages, and it
# reports offsets 10..19 durable; records 20..29 are flushed; a power cut leaves zeros at 10..19 and recovery
# cuts the log at offset 10, losing 20 records flush() and open() had reported durable
def test_recovery_whose_fsync_failed_then_power_cut_with_linux_pwrite(tmp_path: Path) -> None:
    _recovery_fsync_fails_then_power_cut(LinuxAppendDisk(), tmp_path / "p")


# ------------------------------------------------------------------------------ truncation durability

SMALL_SEGMENT_BYTES = 1000
ROLLING_PADDING_BYTES = 700  # one such record does not fit beside five small batches: the log rolls


def _append_singles(plog: PartitionLog, count: int, generation: int) -> dict[int, bytes]:
    values: dict[int, bytes] = {}
    for _ in range(count):
        values.update(append(plog, 1, generation))
    return values


# Regression (found by this file, fixed in ca94ffd):
# LogSegment.truncate_to sets _flushed_size = min(_flushed_size, position): a segment whose bytes were all
# fsynced looks clean after the cut, so neither PartitionLog.truncate_to's keep[-1].flush() nor seal() at the
# next roll fsyncs the ftruncate. Sequence: offsets 0..7 flushed in segment 0; truncate_to(5) (a Raft follower
# dropping a divergent suffix); offset 5 appended again with other bytes, in a new segment because it does not
# fit (roll); flush() returns 6; power cut: segment 0 comes back with its old offsets 5..7, segment 5 no
# longer continues the log and is deleted, and the durable offset 5 now holds the old, truncated record
def test_follower_truncation_then_roll_then_power_cut(tmp_path: Path) -> None:
    disk = ScriptedDisk()
    directory = tmp_path / "p"
    plog = open_log(directory, disk, segment_bytes=SMALL_SEGMENT_BYTES)
    durable = _append_singles(plog, 8, generation=0)
    assert plog.flush() == 8
    assert plog.truncate_to(5) == 5
    durable = {offset: value for offset, value in durable.items() if offset < 5}
    durable.update(append(plog, 1, generation=1, padding_bytes=ROLLING_PADDING_BYTES))
    assert plog.segment_bases() == [0, 5], "the new record must have rolled a new segment"
    assert plog.flush() == 6
    disk.power_cut()
    plog = open_log(directory, disk, segment_bytes=SMALL_SEGMENT_BYTES)
    try:
        assert_durable_kept(plog, durable, "flush, truncate_to(5), append with a roll, flush, power cut")
    finally:
        plog.close()


# Regression (found by this file, fixed in ca94ffd):
# The cut ReplicaManager._open_log makes at damaged_from is not durable (LogSegment.truncate_to marks the cut
# segment flushed, see test_follower_truncation_then_roll_then_power_cut). Sequence: offsets 0..4 flushed;
# 5..7 appended; the fsync fails (EIO) although the disk did get 5..7; forget_unsynced cuts them in the page
# cache; power cut; the reopened log holds 0..7 again and is cut at damaged_from=5 as ReplicaManager does; a
# record appended at 5 rolls a new segment; flush() returns 6; power cut: offsets 5..7 of the failed write
# come back in segment 0 and the flushed record at offset 5 is lost
def test_cut_at_damaged_from_then_roll_then_power_cut(tmp_path: Path) -> None:
    disk = ScriptedDisk()
    directory = tmp_path / "p"
    plog = open_log(directory, disk, segment_bytes=SMALL_SEGMENT_BYTES)
    durable = _append_singles(plog, 5, generation=0)
    assert plog.flush() == 5
    _append_singles(plog, 3, generation=0)
    disk.fail_fsyncs, disk.write_back_all = 1, True
    with pytest.raises(LogDirectoryError):
        plog.flush()
    assert plog.forget_unsynced() == 5
    damaged_from = plog.unsynced_from
    assert damaged_from == 5
    plog.close()
    disk.power_cut()
    plog = open_log(directory, disk, segment_bytes=SMALL_SEGMENT_BYTES)
    assert_durable_kept(plog, durable, "failed fsync, forget_unsynced, power cut")
    plog.truncate_to(damaged_from)  # as ReplicaManager._open_log does with the stopped replica's damaged_from
    durable.update(append(plog, 1, generation=1, padding_bytes=ROLLING_PADDING_BYTES))
    assert plog.segment_bases() == [0, 5], "the new record must have rolled a new segment"
    assert plog.flush() == 6
    disk.power_cut()
    plog = open_log(directory, disk, segment_bytes=SMALL_SEGMENT_BYTES)
    try:
        assert_durable_kept(plog, durable, "cut at damaged_from, append with a roll, flush, power cut")
    finally:
        plog.close()


def test_cut_dropped_by_a_failed_fsync_then_power_cut(tmp_path: Path) -> None:
    disk = ScriptedDisk()
    directory = tmp_path / "p"
    plog = open_log(directory, disk, segment_bytes=SMALL_SEGMENT_BYTES)
    durable = _append_singles(plog, 5, generation=0)
    assert plog.flush() == 5
    append(plog, 3, generation=0)
    disk.fail_fsyncs, disk.write_back_all = 1, True
    with pytest.raises(LogDirectoryError):
        plog.flush()
    assert plog.forget_unsynced() == 5
    disk.kill()
    disk.fail_fsyncs, disk.write_back_all = 1, False
    with pytest.raises(LogDirectoryError):
        open_log(directory, disk, segment_bytes=SMALL_SEGMENT_BYTES)
    plog = open_log(directory, disk, segment_bytes=SMALL_SEGMENT_BYTES)
    assert_durable_kept(plog, durable, "failed fsync, forget_unsynced, kill -9, failed reopen, reopen")
    assert plog.log_end_offset == 5
    durable.update(append(plog, 1, generation=1))
    assert plog.flush() == 6
    durable.update(append(plog, 1, generation=1, padding_bytes=ROLLING_PADDING_BYTES))
    assert plog.segment_bases() == [0, 6], "the record at 6 must have rolled a new segment"
    assert plog.flush() == 7
    disk.power_cut()
    plog = open_log(directory, disk, segment_bytes=SMALL_SEGMENT_BYTES)
    try:
        assert_durable_kept(plog, durable, "flush at 6 and 7 over a cut a failed fsync dropped, power cut")
    finally:
        plog.close()


def test_truncation_then_append_in_the_same_segment_then_power_cut(tmp_path: Path) -> None:
    """Control: when the new records land in the truncated segment, their fsync carries the cut with it."""
    disk = ScriptedDisk()
    directory = tmp_path / "p"
    plog = open_log(directory, disk, segment_bytes=SMALL_SEGMENT_BYTES)
    durable = _append_singles(plog, 8, generation=0)
    assert plog.flush() == 8
    assert plog.truncate_to(5) == 5
    durable = {offset: value for offset, value in durable.items() if offset < 5}
    durable.update(append(plog, 1, generation=1))
    assert plog.segment_bases() == [0]
    assert plog.flush() == 6
    disk.power_cut()
    plog = open_log(directory, disk, segment_bytes=SMALL_SEGMENT_BYTES)
    try:
        assert_durable_kept(plog, durable, "flush, truncate_to(5), append, flush, power cut")
        assert plog.log_end_offset == 6, "the truncated records came back after the new one"
    finally:
        plog.close()


# ------------------------------------------------------------------- random crash and disk-error sequences


class LogUnderTest:
    """A PartitionLog on a SimDisk, driven as a Raft replica drives it, with a model of what it promised.

    `written` is what the log should hold now (offset -> value); `durable` the offsets flush() or open()
    reported durable, with their values. A failure is handled as Replica and ReplicaManager do: cut what
    a failed fsync may have lost (forget_unsynced), stop, reopen (retried while the disk fails), and cut the
    reopened log at the offset the failed fsync reported (damaged_from)."""

    def __init__(self, directory: Path, disk: SimDisk, rng: random.Random, segment_bytes: int,
                 truncations: bool) -> None:
        self.directory = directory
        self.disk = disk
        self.rng = rng
        self.config = LogConfig(segment_bytes=segment_bytes, index_interval_bytes=128)
        self.generation = 0
        self.truncations = truncations
        self.history: list[str] = []
        self.written: dict[int, bytes] = {}
        self.durable: dict[int, bytes] = {}
        self.plog = self._reopen(None)

    def _reopen(self, damaged_from: int | None) -> PartitionLog:
        """Open as ReplicaManager does (cutting at damaged_from), retried while the disk fails; after a few
        failures the disk heals (the operator replaced it). Checks the promise before the cut."""
        error_rate = self.disk.fsync_error_rate
        try:
            for attempt in range(50):
                if attempt == 5:
                    self.disk.fsync_error_rate = 0.0
                try:
                    plog = PartitionLog.open(self.directory, self.config, TOPIC, PARTITION, fs=self.disk)
                except StorageError:
                    self.history.append("open failed")
                    continue
                assert_durable_kept(plog, self.durable, f"after {self.history[-25:]}")
                if damaged_from is not None and plog.log_start_offset <= damaged_from < plog.log_end_offset:
                    try:
                        plog.truncate_to(damaged_from)
                    except StorageError:
                        self.history.append("cut at damaged_from failed")
                        self._close_quietly(plog)
                        continue
                self._accept(plog)
                return plog
            raise AssertionError("the log could not be reopened on a healthy disk")
        finally:
            self.disk.fsync_error_rate = error_rate

    @staticmethod
    def _close_quietly(plog: PartitionLog) -> None:
        with contextlib.suppress(StorageError):
            plog.close()

    def _accept(self, plog: PartitionLog) -> None:
        context = f"after {self.history[-25:]}"
        values = read_values(plog)
        for offset, value in values.items():
            assert offset in self.durable or value in self._ever_written(offset), (
                f"{context}: offset {offset} holds {value!r}, which was never written there")
        self.written = values
        self.durable = dict(values)  # open() made everything it kept durable

    def _ever_written(self, offset: int) -> set[bytes]:
        return {value_for(offset, generation) for generation in range(self.generation + 1)}

    def step(self) -> None:
        roll = self.rng.random()
        try:
            if roll < 0.45:
                self._append()
            elif roll < 0.70:
                self._flush()
            elif roll < 0.76:
                if self.truncations:
                    self._truncate()
            elif roll < 0.82:
                self.disk.full = not self.disk.full
                self.history.append(f"disk full={self.disk.full}")
            elif roll < 0.88:
                self._restart("kill -9", self.disk.kill)
            elif roll < 0.94:
                self._restart("power cut", self.disk.power_cut)
            else:
                self._restart("clean restart", None)
        except StorageError as exc:
            self._after_failure(exc)

    def _append(self) -> None:
        start = self.plog.log_end_offset
        records = self.rng.randint(1, 4)
        self.history.append(f"append {start}..{start + records - 1}")
        self.plog.append(batch_at(start, records, self.generation), EPOCH, T0_MS)
        for offset in range(start, start + records):
            self.written[offset] = value_for(offset, self.generation)

    def _flush(self) -> None:
        self.history.append("flush")
        durable_offset = self.plog.flush()
        self.history[-1] = f"flush -> {durable_offset}"
        for offset in range(self.plog.log_start_offset, durable_offset):
            assert offset in self.written, f"flush() reported offset {offset} durable, the log never held it"
            self.durable[offset] = self.written[offset]

    def _truncate(self) -> None:
        """A Raft follower drops a divergent suffix; the next appends carry other values at those offsets.
        The suffix is given up before the call: a truncation that fails half way may leave any of it."""
        plog = self.plog
        target = self.rng.randint(plog.log_start_offset, plog.log_end_offset)
        self.history.append(f"truncate_to {target}")
        cut = max([base for base in batch_bases(plog) if base <= target], default=target)
        cut = target if target == plog.log_end_offset else cut
        self.generation += 1
        for mapping in (self.written, self.durable):
            for offset in [o for o in mapping if o >= cut]:
                del mapping[offset]
        assert plog.truncate_to(target) == cut

    def _restart(self, what: str, crash: Callable[[], None] | None) -> None:
        self.history.append(what)
        if crash is None:
            try:
                self.plog.close()
            except StorageError:
                self.history.append("close failed")
        else:
            crash()
        self.disk.full = False
        self.plog = self._reopen(None)

    def _after_failure(self, exc: StorageError) -> None:
        self.history.append(f"failed: {type(exc).__name__}")
        plog = self.plog
        if plog.unsynced_from is not None:
            plog.forget_unsynced()  # as Replica._forget_unsynced, in the pool, right after the failed fsync
            self.generation += 1  # what is appended again at the forgotten offsets differs from what was
        damaged_from = plog.unsynced_from
        for offset in [o for o in self.written if o >= plog.log_end_offset]:
            del self.written[offset]
        fate = self.rng.choice(("stop", "kill -9", "power cut"))
        self.history.append(f"replica stops ({fate})")
        self._close_quietly(plog)
        if fate == "kill -9":
            self.disk.kill()
        elif fate == "power cut":
            self.disk.power_cut()
        self.disk.full = False
        self.plog = self._reopen(damaged_from)

    def close(self) -> None:
        self.disk.full = False
        self.disk.fsync_error_rate = 0.0
        self.plog.close()


def _run_random_sequence(directory: Path, seed: int, fsync_errors: bool, truncations: bool) -> None:
    rng = random.Random(seed)
    disk = SimDisk(random.Random(seed ^ 0x5EED), lambda: T0_MS * 1_000_000)
    disk.fsync_error_rate = rng.choice((0.03, 0.1)) if fsync_errors else 0.0
    subject = LogUnderTest(directory, disk, rng, segment_bytes=rng.choice((200, 400, 1000)), truncations=truncations)
    for _ in range(150):
        subject.step()
    subject._restart("final power cut", disk.power_cut)
    subject.close()
    assert disk.stats.power_cuts >= 1


@pytest.mark.parametrize("seed", range(40))
def test_random_kills_power_cuts_and_full_disks_keep_every_durable_offset(tmp_path: Path, seed: int) -> None:
    """Appends, flushes, full disks, kill -9, power cuts (each file keeps a random prefix of its unsynced
    writes, the last maybe torn) and clean restarts, with segments of a few batches so that recovery crosses
    segment boundaries and the recovery checkpoint lags the durable offset."""
    _run_random_sequence(tmp_path / "p", seed, fsync_errors=False, truncations=False)


def test_random_failed_fsyncs_and_truncations_keep_every_durable_offset(tmp_path: Path) -> None:
    failures: list[str] = []
    for seed in range(60):
        try:
            _run_random_sequence(tmp_path / f"seed-{seed}", seed, fsync_errors=True, truncations=True)
        except AssertionError as exc:
            failures.append(f"seed {seed}: {str(exc)[:600]}")
    assert not failures, f"{len(failures)} of 60 sequences broke the promise:\n" + "\n".join(failures)


# ------------------------------------------------------------------------------------- the Raft state file

MEMBERSHIP = Membership.of((1, 2, 3))


def _state(term: int, vote: int | None) -> ReplicaState:
    return ReplicaState(term=term, vote=vote, voters=(1, 2, 3))


@pytest.mark.parametrize("seed", range(40))
def test_raft_state_file_never_loads_a_state_older_than_its_last_save(tmp_path: Path, seed: int) -> None:
    """Saves of term and vote under failing fdatasyncs (partial write-back, then the slot voided), kill -9
    and power cuts: a load after any of them gives the last save that returned, or one attempted after it
    (a failed save may still have reached the disk), never an older state: that would let the replica vote
    twice in a term."""
    rng = random.Random(seed)
    disk = SimDisk(random.Random(seed ^ 0xC0FFEE), lambda: T0_MS * 1_000_000)
    disk.fsync_error_rate = rng.choice((0.05, 0.2))
    directory = tmp_path / "p"
    disk.mkdir(directory)
    path = directory / "raft.state"
    state_file = ReplicaStateFile(path, fs=disk)
    loaded = state_file.load(MEMBERSHIP)
    error_rate, disk.fsync_error_rate = disk.fsync_error_rate, 0.0
    state_file.save(loaded)  # the file's creation succeeds (test_raft_state_file_whose_creation_failed: when not)
    disk.fsync_error_rate = error_rate
    last_saved: tuple[int, int | None] = (loaded.term, loaded.vote)
    attempted_since: list[tuple[int, int | None]] = []
    history: list[str] = []
    term = loaded.term
    for _ in range(200):
        roll = rng.random()
        if roll < 0.8:
            term += rng.randint(0, 1)
            wanted = (term, rng.choice((None, 1, 2, 3)))
            attempted_since.append(wanted)
            try:
                state_file.save(_state(*wanted))
            except OSError:
                history.append(f"save {wanted} failed")
                state_file.close()  # the replica stops; the broker reopens it from disk
            else:
                history.append(f"save {wanted}")
                last_saved, attempted_since = wanted, []
                continue
        crash = rng.choice(("stop", "kill -9", "power cut"))
        history.append(crash)
        state_file.close()
        if crash == "kill -9":
            disk.kill()
        elif crash == "power cut":
            disk.power_cut()
        state_file = ReplicaStateFile(path, fs=disk)
        loaded = state_file.load(MEMBERSHIP)
        got = (loaded.term, loaded.vote)
        assert got == last_saved or got in attempted_since, (
            f"seed {seed}: loaded term {got[0]} vote {got[1]}, but the last save that returned was {last_saved} "
            f"(attempted since: {attempted_since}); history {history}")
        term = max(term, got[0])


def test_raft_state_file_whose_creation_failed(tmp_path: Path) -> None:
    disk = ScriptedDisk()
    directory = tmp_path / "p"
    disk.mkdir(directory)
    path = directory / "raft.state"
    state_file = ReplicaStateFile(path, fs=disk)
    state_file.load(MEMBERSHIP)
    disk.fail_fsyncs = 1
    with pytest.raises(OSError):
        state_file.save(_state(1, 1))
    state_file.close()
    disk.kill()
    state_file = ReplicaStateFile(path, fs=disk)
    assert state_file.load(MEMBERSHIP).term == 0
    state_file.save(_state(2, 3))
    state_file.close()
    disk.power_cut()
    loaded = ReplicaStateFile(path, fs=disk).load(MEMBERSHIP)
    assert (loaded.term, loaded.vote) == (2, 3), (
        f"a save of term 2 vote 3 returned, yet after a power cut the file gives term {loaded.term} "
        f"vote {loaded.vote}")


# --------------------------------------------------------------------------- the broker's Raft state log

STATE_LOG_GROUPS = ("orders-0", "orders-1", "__controller-0")


def _open_state_log(directory: Path, disk: SimDisk, history: list[str]) -> RaftStateLog:
    """Open as a restarting broker does, retried while the disk fails (it heals after a few tries)."""
    error_rate = disk.fsync_error_rate
    try:
        for attempt in range(20):
            if attempt == 5:
                disk.fsync_error_rate = 0.0
            try:
                return RaftStateLog.open(directory, fs=disk, min_compact_bytes=2048)
            except OSError:
                history.append("open failed")
        raise AssertionError("the state log could not be opened on a healthy disk")
    finally:
        disk.fsync_error_rate = error_rate


@pytest.mark.parametrize("seed", range(40))
def test_raft_state_log_never_loads_a_state_older_than_its_last_save(tmp_path: Path, seed: int) -> None:
    """Saves and forgets of three groups in the broker's one state log, under failing fdatasyncs (partial
    write-back, the rest dropped), rewrites (every 2 KiB), kill -9 and power cuts: after every reopen each
    group has the state of its last save or forget that returned, or of one attempted after it, never an
    older one (a replica that forgot its vote could vote twice in a term)."""
    rng = random.Random(seed)
    disk = SimDisk(random.Random(seed ^ 0xFEED), lambda: T0_MS * 1_000_000)
    disk.fsync_error_rate = rng.choice((0.05, 0.2))
    directory = tmp_path / "broker"
    history: list[str] = []
    state_log = _open_state_log(directory, disk, history)
    returned: dict[str, tuple[int, int | None] | None] = dict.fromkeys(STATE_LOG_GROUPS)
    attempted: dict[str, list[tuple[int, int | None] | None]] = {group: [] for group in STATE_LOG_GROUPS}
    term = 0
    for _ in range(150):
        group = rng.choice(STATE_LOG_GROUPS)
        roll = rng.random()
        if roll < 0.75:
            term += rng.randint(0, 1)
            wanted: tuple[int, int | None] | None = None if roll < 0.05 else (term, rng.choice((None, 1, 2, 3)))
            attempted[group].append(wanted)
            try:
                if wanted is None:
                    state_log.forget(group)
                else:
                    state_log.save(group, _state(*wanted))
            except OSError:
                history.append(f"{group} {wanted} failed")
            else:
                history.append(f"{group} {wanted}")
                returned[group], attempted[group] = wanted, []
            continue
        crash = rng.choice(("kill -9", "power cut"))
        history.append(crash)
        state_log.close()
        if crash == "kill -9":
            disk.kill()
        else:
            disk.power_cut()
        state_log = _open_state_log(directory, disk, history)
        for name in STATE_LOG_GROUPS:
            state = state_log.state_of(name)
            got = None if state is None else (state.term, state.vote)
            assert got == returned[name] or got in attempted[name], (
                f"seed {seed}: group {name} loaded {got}, but its last save that returned was {returned[name]} "
                f"(attempted since: {attempted[name]}); history {history[-20:]}")
    state_log.close()


# ------------------------------------------------------------------------ the active segment's indexes


INDEXED_LOG_CONFIG = LogConfig(segment_bytes=1 << 20, index_interval_bytes=256)


def test_routine_flushes_fsync_only_the_active_log_and_a_power_cut_rebuilds_its_indexes(tmp_path: Path) -> None:
    """flush() fsyncs the active segment's .log and not its index files (the loader rebuilds the active
    segment's indexes after a crash); after a power cut that drops every index byte written since, lookups by
    offset and by time still find every durable record."""
    disk = ScriptedDisk()
    directory = tmp_path / "p"
    plog = PartitionLog.open(directory, INDEXED_LOG_CONFIG, TOPIC, PARTITION, fs=disk)
    durable = dict(append(plog, 3))
    plog.flush()  # the first flush also makes the new directory durable
    for _ in range(40):
        durable.update(append(plog, 3))
        fsyncs_before = disk.stats.fsyncs
        assert plog.flush() == plog.log_end_offset
        assert disk.stats.fsyncs - fsyncs_before == 1  # the log file alone
    assert plog._segments[-1].offset_index.entries > 5, "the records must span several index entries"
    disk.power_cut()
    plog = PartitionLog.open(directory, INDEXED_LOG_CONFIG, TOPIC, PARTITION, fs=disk)
    try:
        assert_durable_kept(plog, durable, "flushes without index fsyncs, power cut")
        assert plog._segments[-1].offset_index.entries > 5, "recovery rebuilt the offset index"
        for offset in range(0, plog.log_end_offset, 7):
            first = rec.iter_batch_headers(plog.read(offset, 1 << 16))
            _, header = next(first)
            assert header.base_offset <= offset <= header.base_offset + header.last_offset_delta
    finally:
        plog.close()
