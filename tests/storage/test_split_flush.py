"""PartitionLog.begin_flush / end_flush: flush() in two halves around an fsync that runs elsewhere (the broker's
native fsync threads). The log may count offsets durable only once that fsync returned, and a failed one must
be handled exactly as a failed flush() (test_failed_fsync.py): cut back, written again, refused writes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from logbroker_client.records import iter_batch_headers

from logbroker.storage.config import LogConfig
from logbroker.storage.errors import LogClosedError, LogDirectoryError, StorageError
from logbroker.storage.log import PartitionLog
from tests.raft.runtime_sim.disk import SimDisk
from tests.storage.conftest import T0, make_batch

DIRECTORY = Path("/sim/orders-3")


def new_disk(seed: int = 1) -> SimDisk:
    return SimDisk(random.Random(seed), clock_ns=lambda: T0 * 1_000_000)


def open_on(disk: SimDisk, **config: int) -> PartitionLog:
    return PartitionLog.open(DIRECTORY, LogConfig(**config), "orders", 3, fs=disk)


def created_log(disk: SimDisk, **config: int) -> PartitionLog:
    """A new partition's log whose files the broker's creation made durable (creation_made_durable), so its first
    flush owes no directory fsync and may be split."""
    log = open_on(disk, **config)
    log.creation_made_durable()
    return log


def append_batches(log: PartitionLog, first_seed: int, count: int) -> None:
    for seed in range(first_seed, first_seed + count):
        log.append(bytearray(make_batch(2, seed=seed)), 1, T0)


def split_flush(log: PartitionLog, disk: SimDisk) -> int:
    """What Replica._write_then_sync does, with the fsync run here instead of in a native thread."""
    pending = log.begin_flush()
    assert pending is not None
    error: OSError | None = None
    if pending.fd is not None:
        try:
            disk.fsync(pending.fd)
        except OSError as exc:
            error = exc
    return log.end_flush(pending, error)


def test_offsets_count_as_durable_only_once_the_fsync_run_elsewhere_returned() -> None:
    disk = new_disk()
    log = created_log(disk)
    append_batches(log, 0, 3)
    observed: list[float] = []
    log.flush_observer = observed.append
    pending = log.begin_flush()
    assert pending is not None and pending.fd is not None and pending.target == 6
    assert log.durable_offset == 0  # asked for, not yet done
    disk.fsync(pending.fd)
    assert log.end_flush(pending, None) == 6
    assert log.durable_offset == 6 and len(observed) == 1  # the fsync metric sees split flushes too
    disk.power_cut()
    assert open_on(disk).log_end_offset == 6


def test_a_split_flush_with_nothing_unsynced_asks_for_no_fsync() -> None:
    disk = new_disk()
    log = created_log(disk)
    append_batches(log, 0, 1)
    assert split_flush(log, disk) == 2
    pending = log.begin_flush()
    assert pending is not None and pending.fd is None
    assert log.end_flush(pending, None) == 2


def test_a_new_partitions_deferred_syncs_send_the_flush_back_to_flush() -> None:
    disk = new_disk()
    log = open_on(disk)  # its directory's fsync is owed to the first flush
    append_batches(log, 0, 1)
    assert log.begin_flush() is None
    assert log.flush() == 2
    assert log.begin_flush() is not None  # paid: later flushes may be split


@pytest.mark.parametrize("segment_bytes", [1 << 20, 200], ids=["one segment", "a segment per batch"])
def test_a_failed_split_fsync_is_handled_as_a_failed_flush(segment_bytes: int) -> None:
    disk = new_disk()
    log = created_log(disk, segment_bytes=segment_bytes)
    append_batches(log, 0, 3)
    assert split_flush(log, disk) == 6
    append_batches(log, 3, 2)
    disk.fsync_error_rate = 1.0
    with pytest.raises(StorageError, match="flushing"):
        split_flush(log, disk)
    disk.fsync_error_rate = 0.0
    assert log.durable_offset == 6 and log.unsynced_from == 6
    assert log.forget_unsynced() == 6
    with pytest.raises(LogDirectoryError, match="refuses writes"):
        log.append(bytearray(make_batch(1)), 1, T0)
    disk.kill()  # kill -9 before anyone reopened the log: the page cache is all a restart sees
    reopened = open_on(disk, segment_bytes=segment_bytes)
    batches = [(h.base_offset, h.last_offset) for _, h in iter_batch_headers(reopened.read(0, 1 << 20))]
    assert batches == [(0, 1), (2, 3), (4, 5)]


def test_a_failed_split_fsync_writes_the_bytes_again_so_a_later_fsync_makes_them_durable() -> None:
    """Linux marks the pages a failed fsync could not write clean: without writing them again, the next fsync
    succeeds without them. The replica cuts the log anyway; this is the segment's half (LogSegment._redirty)."""
    disk = new_disk()
    log = created_log(disk)
    append_batches(log, 0, 2)
    disk.fsync_error_rate = 1.0
    with pytest.raises(StorageError):
        split_flush(log, disk)
    disk.fsync_error_rate = 0.0
    assert disk.unsynced_bytes() > 0  # dirty again
    disk.sync_all()
    disk.power_cut()
    assert open_on(disk).log_end_offset == 4


def test_a_log_closed_while_its_fsync_ran_refuses_to_count_it() -> None:
    disk = new_disk()
    log = created_log(disk)
    append_batches(log, 0, 1)
    pending = log.begin_flush()
    assert pending is not None and pending.fd is not None
    log.close()
    with pytest.raises(LogClosedError, match="closed during its flush"):
        log.end_flush(pending, None)
