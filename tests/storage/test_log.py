from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import pytest
from logbroker_client.records import (
    build_batch,
    iter_batch_headers,
    iter_batches,
    read_header,
    stamp_batch,
    validate_batch,
)

from logbroker.storage import filenames
from logbroker.storage.config import LogConfig
from logbroker.storage.errors import (
    InvalidAppendError,
    LogClosedError,
    LogDirectoryError,
    OffsetOutOfRangeError,
    RecordTooLargeError,
    StorageFullError,
)
from logbroker.storage.log import PartitionLog
from tests.storage.conftest import T0, make_batch, open_log


def append(log: PartitionLog, batch: bytes, epoch: int = 1, now_ms: int = T0) -> int:
    return log.append(bytearray(batch), epoch, now_ms).base_offset


def headers(data: bytes) -> list[tuple[int, int]]:
    return [(h.base_offset, h.last_offset) for _, h in iter_batch_headers(data)]


# ------------------------------------------------------------------------------------------- append/read

def test_append_assigns_consecutive_offsets_and_stamps_epoch(log_dir: Path) -> None:
    log = open_log(log_dir)
    first = log.append(bytearray(make_batch(3)), 7, T0)
    second = log.append(bytearray(make_batch(2) + make_batch(4)), 8, T0)
    assert (first.base_offset, first.last_offset) == (0, 2)
    assert (second.base_offset, second.last_offset) == (3, 8)
    assert log.log_end_offset == 9
    data = log.read(0, 1 << 20)
    assert headers(data) == [(0, 2), (3, 4), (5, 8)]
    assert [h.leader_epoch for _, h in iter_batch_headers(data)] == [7, 8, 8]
    for position, _ in iter_batch_headers(data):
        validate_batch(data, position)  # stamping kept the CRC valid
    assert log.last_epoch() == 8
    assert log.epoch_at(0) == 7 and log.epoch_at(4) == 8 and log.epoch_at(8) == 8


def test_append_result_reports_max_timestamp_and_position(log_dir: Path) -> None:
    log = open_log(log_dir)
    batch = make_batch(2, timestamp_ms=T0 + 50)
    r1 = log.append(bytearray(batch), 1, T0)
    r2 = log.append(bytearray(make_batch(1, timestamp_ms=T0 + 10)), 1, T0)
    assert r1.max_timestamp == T0 + 51 and r1.position_in_log == 0
    assert r2.position_in_log == len(batch)


def test_read_returns_the_batch_containing_the_offset(log_dir: Path) -> None:
    log = open_log(log_dir)
    for _ in range(5):
        append(log, make_batch(10))
    assert headers(log.read(37, 1 << 20)) == [(30, 39), (40, 49)]
    assert log.read(50, 100) == b""


def test_read_max_bytes_returns_whole_batches_and_at_least_one(log_dir: Path) -> None:
    log = open_log(log_dir)
    batch = make_batch(1, value_size=100)
    for _ in range(10):
        append(log, batch)
    size = len(batch)
    assert headers(log.read(0, size * 3 + size // 2)) == [(0, 0), (1, 1), (2, 2)]
    assert headers(log.read(4, 1)) == [(4, 4)]  # one whole batch even though larger than max_bytes
    assert headers(log.read(4, 0)) == [(4, 4)]


def test_read_max_offset_stops_before_batches_reaching_the_high_watermark(log_dir: Path) -> None:
    log = open_log(log_dir)
    for _ in range(4):
        append(log, make_batch(5))
    assert headers(log.read(0, 1 << 20, max_offset=12)) == [(0, 4), (5, 9)]
    assert headers(log.read(0, 1 << 20, max_offset=10)) == [(0, 4), (5, 9)]
    assert log.read(10, 1 << 20, max_offset=12) == b""  # batch 10..14 is not fully committed
    assert log.read(12, 1 << 20, max_offset=12) == b""
    assert headers(log.read(0, 1 << 20, max_offset=20)) == [(0, 4), (5, 9), (10, 14), (15, 19)]


def test_read_with_sparse_index_jumps_and_cuts_correctly(log_dir: Path) -> None:
    log = open_log(log_dir, index_interval_bytes=256)
    batches = [make_batch(1, value_size=40 + i % 7, seed=i) for i in range(300)]
    for batch in batches:
        append(log, batch)
    assert log.segments[0].offset_index.entries > 10
    for offset in (0, 1, 77, 150, 299):
        for max_bytes in (1, 500, 5000):
            for max_offset in (None, offset + 3, 300):
                data = log.read(offset, max_bytes, max_offset)
                expected: list[int] = []
                total = 0
                for i in range(offset, 300):
                    if max_offset is not None and i >= max_offset:
                        break
                    if expected and total + len(batches[i]) > max_bytes:
                        break
                    expected.append(i)
                    total += len(batches[i])
                assert [b for b, _ in headers(data)] == expected, (offset, max_bytes, max_offset)


def test_offset_out_of_range_names_partition_and_valid_range(log_dir: Path) -> None:
    log = open_log(log_dir)
    append(log, make_batch(5))
    with pytest.raises(OffsetOutOfRangeError) as info:
        log.read(6, 100)
    assert "orders-3" in str(info.value) and "0..5" in str(info.value)
    assert (info.value.offset, info.value.log_start, info.value.log_end) == (6, 0, 5)
    with pytest.raises(OffsetOutOfRangeError):
        log.read(-1, 100)
    assert log.read(5, 100) == b""
    with pytest.raises(OffsetOutOfRangeError):
        log.epoch_at(5)


def test_append_rejects_malformed_streams_without_writing(log_dir: Path) -> None:
    log = open_log(log_dir)
    batch = make_batch(2)
    for bad in (b"", batch[:30], batch + batch[:70], bytearray(batch[:-1])):
        with pytest.raises(InvalidAppendError, match="orders-3"):
            log.append(bytearray(bad), 1, T0)
    assert log.log_end_offset == 0 and log.size_bytes == 0


def test_append_rejects_batches_over_max_message_bytes(log_dir: Path) -> None:
    log = open_log(log_dir, max_message_bytes=200)
    append(log, make_batch(1, value_size=50))
    with pytest.raises(RecordTooLargeError, match="max.message.bytes=200"):
        append(log, make_batch(1, value_size=500))
    assert log.log_end_offset == 1


def test_append_replicated_keeps_offsets_and_epochs(log_dir: Path, tmp_path: Path) -> None:
    leader = open_log(tmp_path / "leader")
    append(leader, make_batch(3), epoch=4)
    append(leader, make_batch(2), epoch=5)
    follower = open_log(log_dir)
    result = follower.append_replicated(leader.read(0, 1 << 20), now_ms=T0)
    assert (result.base_offset, result.last_offset) == (0, 4)
    assert follower.read(0, 1 << 20) == leader.read(0, 1 << 20)
    assert follower.last_epoch() == 5 and follower.epoch_at(1) == 4
    with pytest.raises(InvalidAppendError, match="continues at 5"):
        follower.append_replicated(leader.read(3, 1 << 20))
    assert follower.log_end_offset == 5


# ------------------------------------------------------------------------------------------- segments

def test_roll_by_size_and_reads_across_segments(log_dir: Path) -> None:
    batch = make_batch(2, value_size=100)
    log = open_log(log_dir, segment_bytes=len(batch) * 3)
    for _ in range(10):
        append(log, batch)
    assert [s.base_offset for s in log.segments] == [0, 6, 12, 18]
    assert all(s.size_bytes <= len(batch) * 3 for s in log.segments)
    assert headers(log.read(0, 1 << 20)) == [(i, i + 1) for i in range(0, 20, 2)]
    assert headers(log.read(5, len(batch) * 2)) == [(4, 5), (6, 7)]  # crosses the 0 -> 6 boundary
    assert headers(log.read(11, 1)) == [(10, 11)]
    files = sorted(p.name for p in log_dir.iterdir())
    assert "00000000000000000006.log" in files
    assert "00000000000000000006.timeindex" in files
    # Segments of three small batches get no offset-index entry, so their .index files are never created.
    assert "00000000000000000006.index" not in files


def test_roll_by_time(log_dir: Path) -> None:
    log = open_log(log_dir, segment_ms=1000)
    append(log, make_batch(), now_ms=T0)
    append(log, make_batch(), now_ms=T0 + 999)
    assert log.segment_count == 1
    append(log, make_batch(), now_ms=T0 + 1000)
    assert [s.base_offset for s in log.segments] == [0, 2]
    append(log, make_batch(), now_ms=T0 + 1500)
    assert log.segment_count == 2


def test_rolled_segment_is_fsynced(log_dir: Path) -> None:
    batch = make_batch(1, value_size=100)
    log = open_log(log_dir, segment_bytes=len(batch))
    append(log, batch)
    append(log, batch)
    old = log.segments[0]
    assert not old.dirty and old.flushed_size_bytes == len(batch)


def test_offset_for_timestamp_across_segments(log_dir: Path) -> None:
    batch_size = len(make_batch(1, value_size=50))
    log = open_log(log_dir, segment_bytes=batch_size * 4, index_interval_bytes=batch_size)
    stamps = [T0 + 10 * i for i in range(20)]
    stamps[7] = T0 + 1000  # an out-of-order timestamp raises the max early
    for ts in stamps:
        append(log, make_batch(1, timestamp_ms=ts, value_size=50))
    assert log.segment_count == 5

    def expected(ts: int) -> int | None:
        return next((i for i, s in enumerate(stamps) if s >= ts), None)

    for ts in [T0 - 5, T0, T0 + 1, T0 + 35, T0 + 70, T0 + 71, T0 + 150, T0 + 190, T0 + 191, T0 + 999, T0 + 2000]:
        assert log.offset_for_timestamp(ts) == expected(ts), ts


# ------------------------------------------------------------------------------------------- retention

def test_retention_by_time_deletes_old_segments_never_the_active(log_dir: Path) -> None:
    batch_size = len(make_batch(1, value_size=50))
    log = open_log(log_dir, segment_bytes=batch_size * 2, retention_ms=1000)
    for i in range(6):
        append(log, make_batch(1, timestamp_ms=T0 + 100 * i, value_size=50))
    assert [s.base_offset for s in log.segments] == [0, 2, 4]
    assert log.apply_retention(now_ms=T0 + 1100) == 0  # newest of the first segment is T0+100
    assert log.apply_retention(now_ms=T0 + 1102) == 1
    assert log.log_start_offset == 2
    with pytest.raises(OffsetOutOfRangeError, match="2..6"):
        log.read(1, 100)
    assert log.apply_retention(now_ms=T0 + 100_000) == 1  # the active segment stays
    assert [s.base_offset for s in log.segments] == [4]
    assert not (log_dir / "00000000000000000000.log").exists()
    assert headers(log.read(4, 1 << 20)) == [(4, 4), (5, 5)]


def test_retention_by_time_respects_max_offset(log_dir: Path) -> None:
    batch_size = len(make_batch(1, value_size=50))
    log = open_log(log_dir, segment_bytes=batch_size * 2, retention_ms=1000)
    for _ in range(6):
        append(log, make_batch(1, value_size=50))
    assert log.apply_retention(now_ms=T0 + 10_000, max_offset=3) == 1
    assert log.log_start_offset == 2


def test_retention_by_size(log_dir: Path) -> None:
    batch = make_batch(1, value_size=50)
    log = open_log(log_dir, segment_bytes=len(batch) * 2, retention_bytes=len(batch) * 3, retention_ms=-1)
    for _ in range(9):
        append(log, batch)
    assert log.segment_count == 5 and log.size_bytes == len(batch) * 9
    assert log.apply_retention(now_ms=T0 + 10**12) == 3
    assert log.size_bytes == len(batch) * 3 and log.log_start_offset == 6
    assert log.apply_retention(now_ms=T0) == 0


# ------------------------------------------------------------------------------------------- truncation

def test_truncate_to_drops_everything_from_offset(log_dir: Path) -> None:
    batch_size = len(make_batch(3, value_size=30))
    log = open_log(log_dir, segment_bytes=batch_size * 2, index_interval_bytes=batch_size)
    for i in range(6):
        append(log, make_batch(3, value_size=30), epoch=i)
    assert log.segment_count == 3
    assert log.truncate_to(9) == 9
    assert log.log_end_offset == 9 and log.last_epoch() == 2
    assert headers(log.read(0, 1 << 20)) == [(0, 2), (3, 5), (6, 8)]
    assert log.truncate_to(4) == 3  # offset 4 is inside the batch 3..5, which goes entirely
    assert headers(log.read(0, 1 << 20)) == [(0, 2)]
    assert log.durable_offset <= 3
    assert append(log, make_batch(1), epoch=9) == 3
    assert log.epoch_at(3) == 9 and log.epoch_at(2) == 0
    log.close()
    reopened = open_log(log_dir, segment_bytes=batch_size * 2, index_interval_bytes=batch_size)
    assert headers(reopened.read(0, 1 << 20)) == [(0, 2), (3, 3)]


def test_truncate_to_segment_base_and_below_log_start(log_dir: Path) -> None:
    batch = make_batch(2, value_size=30)
    log = open_log(log_dir, segment_bytes=len(batch) * 2, retention_ms=10)
    for _ in range(6):
        append(log, batch)
    assert log.truncate_to(8) == 8
    assert [s.base_offset for s in log.segments] == [0, 4]  # the segment starting at 8 is gone
    assert append(log, batch) == 8
    assert [s.base_offset for s in log.segments] == [0, 4, 8]
    assert log.truncate_to(6) == 6
    assert [s.base_offset for s in log.segments] == [0, 4]
    assert append(log, batch) == 6
    log.apply_retention(now_ms=T0 + 10**9)
    assert log.log_start_offset == 4  # the segment 4..7 is active again, so it stays
    assert log.truncate_to(3) == 3  # below the log start: start over there
    assert (log.log_start_offset, log.log_end_offset) == (3, 3)


def test_reset_to_starts_empty_at_offset(log_dir: Path) -> None:
    log = open_log(log_dir)
    append(log, make_batch(5))
    log.reset_to(1000)
    assert (log.log_start_offset, log.log_end_offset, log.size_bytes) == (1000, 1000, 0)
    assert log.last_epoch() == -1
    assert append(log, make_batch(2)) == 1000
    assert sorted(p.name for p in log_dir.glob("*.log")) == ["00000000000000001000.log"]
    log.close()
    assert open_log(log_dir).log_end_offset == 1002


# ------------------------------------------------------------------------------------------- durability

def test_close_then_open_skips_recovery_and_removes_marker(log_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = open_log(log_dir, index_interval_bytes=100)
    for i in range(50):
        append(log, make_batch(2, timestamp_ms=T0 + i), epoch=3)
    data = log.read(0, 1 << 20)
    log.close()
    assert (log_dir / filenames.CLEAN_SHUTDOWN_FILE).exists()
    with caplog.at_level(logging.INFO, logger="logbroker.storage"):
        reopened = open_log(log_dir, index_interval_bytes=100)
    assert "recovered" not in caplog.text
    assert not (log_dir / filenames.CLEAN_SHUTDOWN_FILE).exists()
    assert reopened.read(0, 1 << 20) == data
    assert reopened.log_end_offset == 100 and reopened.last_epoch() == 3
    assert reopened.offset_for_timestamp(T0 + 30) == 58
    with pytest.raises(LogClosedError):
        log.append(bytearray(make_batch()), 1, T0)


def checkpoint_offset(log_dir: Path) -> int:
    version, offset = (log_dir / filenames.RECOVERY_CHECKPOINT_FILE).read_text().split()
    assert version == "1"
    return int(offset)


def test_flush_returns_durable_offset_and_checkpoints_once_it_passes_a_segment_base(log_dir: Path) -> None:
    batch = make_batch(4, value_size=50)
    log = open_log(log_dir, segment_bytes=len(batch) * 2)
    append(log, batch)
    assert log.durable_offset == 0
    assert log.flush() == 4
    assert log.durable_offset == 4
    # Recovery decides per segment, and no segment starts in 1..4: the file need not exist (a new log has
    # nothing a checkpoint could let recovery skip, so its open writes none).
    assert not (log_dir / filenames.RECOVERY_CHECKPOINT_FILE).exists()
    append(log, batch)
    append(log, batch)  # rolls: a segment starts at 8
    assert [segment.base_offset for segment in log.segments] == [0, 8]
    assert log.flush() == 12
    assert checkpoint_offset(log_dir) == 12
    append(log, batch)
    assert log.flush() == 16
    assert checkpoint_offset(log_dir) == 12  # still no new segment base below 16


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced files")
def test_flush_from_a_second_thread_while_appending(log_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Record each file's size at every fsync; a crash keeps only that. Everything below a durable offset
    that flush() returned must survive it."""
    synced: dict[str, int] = {}
    real_fsync = os.fsync
    guard = threading.Lock()

    def recording_fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        size = os.fstat(fd).st_size
        real_fsync(fd)
        with guard:
            synced[path] = size

    monkeypatch.setattr(os, "fsync", recording_fsync)
    batch = make_batch(3, value_size=64)
    log = open_log(log_dir, segment_bytes=len(batch) * 40, index_interval_bytes=512)
    returned: list[tuple[int, int]] = []
    stop = threading.Event()

    def flusher() -> None:
        while True:  # at least one flush, even if the appends finish first
            durable = log.flush()
            returned.append((durable, log.log_end_offset))
            if stop.is_set():
                return

    thread = threading.Thread(target=flusher)
    thread.start()
    try:
        for _ in range(400):
            append(log, batch)
    finally:
        stop.set()
        thread.join()
    assert returned and all(durable <= end and durable % 3 == 0 for durable, end in returned)
    assert [d for d, _ in returned] == sorted(d for d, _ in returned)
    last_durable = returned[-1][0]
    assert last_durable == log.durable_offset
    monkeypatch.undo()

    # Crash: no close(); every file keeps only what its last fsync covered.
    for path in log_dir.iterdir():
        if path.suffix in (".log", ".index", ".timeindex"):
            keep = synced.get(str(path.resolve()), 0)
            os.truncate(path, min(keep, path.stat().st_size))
    reopened = open_log(log_dir, segment_bytes=len(batch) * 40, index_interval_bytes=512)
    assert reopened.log_end_offset >= last_durable
    data = reopened.read(0, 1 << 30, max_offset=last_durable)
    assert headers(data) == [(i, i + 2) for i in range(0, last_durable, 3)]


def test_enospc_leaves_the_log_unchanged(log_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = open_log(log_dir, index_interval_bytes=0)
    append(log, make_batch(2))
    before = (log.log_end_offset, log.size_bytes, log.read(0, 1 << 20))
    real_write = os.write
    calls = {"n": 0}

    def full_disk(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data)[:10])  # a short write first, as a filling disk does
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(StorageFullError, match="orders-3") as info:
        log.append(bytearray(make_batch(3)), 1, T0)
    assert "Free space" in str(info.value)
    monkeypatch.undo()
    assert (log.log_end_offset, log.size_bytes, log.read(0, 1 << 20)) == before
    assert os.path.getsize(log_dir / "00000000000000000000.log") == before[1]
    assert append(log, make_batch(3)) == 2
    log.close()
    reopened = open_log(log_dir, index_interval_bytes=0)
    assert headers(reopened.read(0, 1 << 20)) == [(0, 1), (2, 4)]


def test_enospc_while_writing_the_index_rolls_back_the_log(log_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = open_log(log_dir, index_interval_bytes=0)
    append(log, make_batch(2))
    size = log.size_bytes
    real_write = os.write
    calls = {"n": 0}

    def index_fails(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, data)  # the .log write succeeds
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", index_fails)
    with pytest.raises(StorageFullError):
        log.append(bytearray(make_batch(1)), 1, T0)
    monkeypatch.undo()
    assert log.size_bytes == size and os.path.getsize(log_dir / "00000000000000000000.log") == size
    assert log.segments[0].offset_index.entries == 1
    assert os.path.getsize(log_dir / "00000000000000000000.index") == 8
    assert append(log, make_batch(1)) == 2


def test_open_on_an_unusable_directory_names_the_partition(tmp_path: Path) -> None:
    (tmp_path / "orders-3").write_bytes(b"not a directory")
    with pytest.raises(LogDirectoryError, match="orders-3: I/O error while opening"):
        open_log(tmp_path / "orders-3")


def test_delete_removes_the_directory(log_dir: Path) -> None:
    log = open_log(log_dir)
    append(log, make_batch())
    log.delete()
    assert not log_dir.exists()
    assert log.closed


def test_records_survive_the_round_trip(log_dir: Path) -> None:
    log = open_log(log_dir)
    append(log, make_batch(3, key=b"k"))
    records = [r for _, rs in iter_batches(log.read(0, 1 << 20)) for r in rs]
    assert [(r.offset, r.key) for r in records] == [(0, b"k"), (1, b"k"), (2, b"k")]
    assert read_header(log.read(1, 100)).records_count == 3


def test_one_append_of_many_batches_rolls_between_them(tmp_path: Path) -> None:
    """A Raft follower writes a whole catch-up in one call; segments must still respect segment.bytes."""
    config = LogConfig.from_mapping({"segment.bytes": "4096"})
    plog = PartitionLog.open(tmp_path / "t-0", config, "t", 0)
    batches = [bytearray(build_batch([(1000 + i, None, b"v" * 900, [])])) for i in range(20)]
    stream = bytearray()
    for offset, batch in enumerate(batches):
        stamp_batch(batch, offset, 1)
        stream += batch
    result = plog.append_replicated(stream, 5000)
    assert (result.base_offset, result.last_offset) == (0, 19)
    assert plog.segment_count >= 5
    assert all(segment.size_bytes <= 4096 for segment in plog.segments)
    assert plog.read(7, 1) == bytes(batches[7])
    plog.close()


# ------------------------------------------------------------------------------------------- many partitions

def test_a_new_log_costs_no_fsync_until_its_first_flush_makes_its_file_names_durable() -> None:
    import random

    from tests.raft.runtime_sim.disk import SimDisk

    disk = SimDisk(random.Random(3), lambda: 0)
    directory = Path("/sim/orders-3")
    log = PartitionLog.open(directory, LogConfig(), "orders", 3, fs=disk)
    assert disk.stats.fsyncs == 0  # neither a directory fsync nor a recovery checkpoint at creation
    disk.power_cut()  # may keep any part of the new files, or none: the log opens empty either way
    log = PartitionLog.open(directory, LogConfig(), "orders", 3, fs=disk)
    assert log.log_end_offset == 0
    append(log, make_batch(2))
    assert log.flush() == 2
    disk.power_cut()
    reopened = PartitionLog.open(directory, LogConfig(), "orders", 3, fs=disk)
    assert reopened.log_end_offset == 2  # the flush made the segment's name durable with its bytes


def test_a_first_flush_sync_that_fails_is_run_again_by_the_next_flush(log_dir: Path) -> None:
    log = open_log(log_dir)
    calls: list[str] = []

    def failing_once() -> None:
        calls.append("sync")
        if len(calls) == 1:
            raise OSError(errno.EIO, "simulated")

    log.sync_at_first_flush(failing_once)
    append(log, make_batch(1))
    with pytest.raises(LogDirectoryError):
        log.flush()
    log2 = open_log(log_dir.parent / "other-0")
    log2.sync_at_first_flush(failing_once)
    log2.flush()
    log2.flush()
    assert calls == ["sync", "sync"]  # retried once, then never again


def test_a_new_segment_holds_one_descriptor_until_its_indexes_get_entries(log_dir: Path) -> None:
    log = open_log(log_dir)
    append(log, make_batch(1))
    log.flush()
    assert [p.name for p in log_dir.iterdir() if p.suffix in (".index", ".timeindex")] == []
    segment = log.segments[0]
    assert segment.offset_index._fd < 0 and segment.time_index._fd < 0  # no entry yet: no file, no descriptor
    log.close()
    reopened = open_log(log_dir)
    assert reopened.log_end_offset == 1 and reopened.segments[0].offset_index._fd < 0


def test_running_out_of_descriptors_says_which_limit_and_how_to_raise_it(
        log_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_descriptors(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "open", no_descriptors)
    with pytest.raises(LogDirectoryError, match=r"out of file descriptors.*ulimit -n"):
        open_log(log_dir)
