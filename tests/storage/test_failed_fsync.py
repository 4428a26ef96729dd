"""A failed fsync: Linux drops the pages it could not write, yet reads keep showing them and a later fsync
succeeds without writing them. The log must stop trusting them at once, not only when it is reopened: a
process killed before the reopen would otherwise come back trusting them (tests/raft/runtime_sim/disk.py
models those semantics)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from logbroker_client.records import iter_batch_headers

from logbroker.storage.config import LogConfig
from logbroker.storage.errors import LogDirectoryError, StorageError
from logbroker.storage.log import PartitionLog
from tests.raft.runtime_sim.disk import SimDisk
from tests.storage.conftest import T0, make_batch

DIRECTORY = Path("/sim/orders-3")


def open_on(disk: SimDisk, **config: int) -> PartitionLog:
    return PartitionLog.open(DIRECTORY, LogConfig(**config), "orders", 3, fs=disk)


def log_with_a_failed_fsync(disk: SimDisk, **config: int) -> PartitionLog:
    """Offsets 0..5 durable, 6..9 written, then an fsync that fails."""
    log = open_on(disk, **config)
    for seed in range(3):
        log.append(bytearray(make_batch(2, seed=seed)), 1, T0)
    assert log.flush() == 6
    for seed in range(3, 5):
        log.append(bytearray(make_batch(2, seed=seed)), 1, T0)
    disk.fsync_error_rate = 1.0
    with pytest.raises(StorageError, match="flushing"):
        log.flush()
    disk.fsync_error_rate = 0.0
    assert log.unsynced_from == 6 and log.log_end_offset == 10
    return log


@pytest.mark.parametrize("segment_bytes", [1 << 20, 200], ids=["one segment", "a segment per batch"])
def test_the_log_cuts_what_a_failed_fsync_may_have_dropped_so_a_killed_process_does_not_trust_it(
        segment_bytes: int) -> None:
    disk = SimDisk(random.Random(1), clock_ns=lambda: T0 * 1_000_000)
    log = log_with_a_failed_fsync(disk, segment_bytes=segment_bytes)
    assert log.forget_unsynced() == 6
    assert log.log_end_offset == 6
    assert log.read(6, 1 << 20) == b""  # reads no longer show the dropped entries
    with pytest.raises(LogDirectoryError, match="refuses writes"):
        log.append(bytearray(make_batch(1)), 1, T0)
    disk.kill()  # kill -9 before anyone reopened the log: the page cache is all a restart sees
    reopened = open_on(disk, segment_bytes=segment_bytes)
    assert reopened.log_end_offset == 6
    batches = [(h.base_offset, h.last_offset) for _, h in iter_batch_headers(reopened.read(0, 1 << 20))]
    assert batches == [(0, 1), (2, 3), (4, 5)]


def test_nothing_is_cut_when_every_fsync_succeeded() -> None:
    disk = SimDisk(random.Random(2), clock_ns=lambda: T0 * 1_000_000)
    log = open_on(disk)
    log.append(bytearray(make_batch(3)), 1, T0)
    log.flush()
    assert log.unsynced_from is None
    assert log.forget_unsynced() is None
    assert log.log_end_offset == 3
    log.append(bytearray(make_batch(1)), 1, T0)  # still writable
    assert log.log_end_offset == 4



@pytest.mark.parametrize("seed", range(5))
def test_an_open_whose_recovery_fsync_failed_leaves_the_bytes_dirty_so_the_next_open_makes_them_durable(
        seed: int) -> None:
    """kill -9 after writes nobody fsynced; the restart's recovery reads them and fsyncs them, and that fsync
    fails. The open fails; the retry reads the same bytes and must really get them onto the disk, or a power
    cut takes entries the reopened replica goes on to acknowledge."""
    disk = SimDisk(random.Random(seed), clock_ns=lambda: T0 * 1_000_000)
    log = open_on(disk)
    for batch_seed in range(5):
        log.append(bytearray(make_batch(2, seed=batch_seed)), 1, T0)
    disk.kill()
    disk.fsync_error_rate = 1.0
    with pytest.raises(StorageError):
        open_on(disk)
    disk.fsync_error_rate = 0.0
    assert open_on(disk).log_end_offset == 10  # the retry recovers and fsyncs all of it
    disk.power_cut()
    assert open_on(disk).log_end_offset == 10
