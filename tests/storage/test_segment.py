from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import pytest
from logbroker_client.records import build_batch, iter_batch_headers, read_header

from logbroker.storage.offset_index import ENTRY as OFFSET_ENTRY
from logbroker.storage.segment import BatchInfo, LogSegment
from logbroker.storage.time_index import ENTRY as TIME_ENTRY
from tests.storage.conftest import T0

BASE = 100


class Writer:
    """Appends batches to a segment the way PartitionLog does: stamped, with per-batch info."""

    def __init__(self, segment: LogSegment) -> None:
        self.segment = segment
        self.next_offset = segment.base_offset
        self.batches: list[bytes] = []

    def add(self, records: int = 1, timestamp_ms: int = T0, value_size: int = 40, epoch: int = 2) -> bytes:
        return self.add_many([(records, timestamp_ms, value_size)], epoch)[0]

    def add_many(self, specs: list[tuple[int, int, int]], epoch: int = 2) -> list[bytes]:
        batches, infos = [], []
        position = 0
        for records, timestamp_ms, value_size in specs:
            batch = build_batch([(timestamp_ms, None, b"v" * value_size, [])] * records,
                                base_offset=self.next_offset, leader_epoch=epoch)
            infos.append(BatchInfo(position, self.next_offset, self.next_offset + records - 1, timestamp_ms,
                                   len(batch)))
            batches.append(batch)
            self.next_offset += records
            position += len(batch)
        self.segment.append(b"".join(batches), infos, epoch, T0)
        self.batches.extend(batches)
        return batches


def new_segment(directory: Path, interval: int = 4096) -> LogSegment:
    return LogSegment.create(directory, BASE, interval, T0)


def test_append_and_read_whole_batches(tmp_path: Path) -> None:
    writer = Writer(new_segment(tmp_path))
    first = writer.add(3)
    second, third = writer.add_many([(2, T0, 40), (1, T0, 40)])
    segment = writer.segment
    assert segment.next_offset == BASE + 6 and segment.size_bytes == len(first + second + third)
    assert segment.read(BASE, 1 << 20) == first + second + third
    assert segment.read(BASE + 4, 1 << 20) == second + third
    assert segment.read(BASE + 4, 1) == second  # at least one whole batch
    assert segment.read(BASE + 4, 1, min_one=False) == b""
    assert segment.read(BASE, 1 << 20, max_offset=BASE + 5) == first + second
    assert segment.read(BASE + 6, 100) == b""
    assert segment.find_position(BASE + 5) == len(first + second)
    assert segment.find_position(BASE + 6) is None
    assert segment.last_epoch == 2
    assert (tmp_path / "00000000000000000100.log").read_bytes() == first + second + third


def test_read_slice_says_whether_it_reached_the_end(tmp_path: Path) -> None:
    writer = Writer(new_segment(tmp_path))
    first, second = writer.add_many([(1, T0, 40), (1, T0, 40)])
    assert writer.segment.read_slice(BASE, 1 << 20) == (first + second, True)
    assert writer.segment.read_slice(BASE, len(first)) == (first, False)


def test_index_entries_every_interval_bytes(tmp_path: Path) -> None:
    writer = Writer(new_segment(tmp_path, interval=300))
    batches = [writer.add(1, T0 + i, value_size=40) for i in range(40)]
    size = len(batches[0])  # every batch has the same size here
    per_entry = -(-300 // size)  # batches between entries
    segment = writer.segment
    assert segment.offset_index.entries == (40 - 1) // per_entry
    first_entry = segment.offset_index.lookup(BASE + per_entry)
    assert first_entry == (BASE + per_entry, per_entry * size)
    assert segment.time_index.entries == segment.offset_index.entries
    for offset in range(BASE, BASE + 40):
        assert segment.read(offset, 1) == batches[offset - BASE]


def test_find_offset_for_timestamp(tmp_path: Path) -> None:
    writer = Writer(new_segment(tmp_path, interval=0))
    stamps = [T0 + 10, T0 + 5, T0 + 30, T0 + 20, T0 + 40]
    for ts in stamps:
        writer.add(2, ts)
    segment = writer.segment
    assert segment.max_timestamp == T0 + 40
    for target, expected in [(T0, BASE), (T0 + 10, BASE), (T0 + 11, BASE + 4), (T0 + 25, BASE + 4),
                             (T0 + 31, BASE + 8), (T0 + 40, BASE + 8), (T0 + 41, None)]:
        assert segment.find_offset_for_timestamp(target) == expected, target


def test_truncate_to_drops_the_batch_holding_the_offset(tmp_path: Path) -> None:
    writer = Writer(new_segment(tmp_path, interval=0))
    batches = [writer.add(3, T0 + i) for i in range(5)]
    segment = writer.segment
    removed = segment.truncate_to(BASE + 7)  # inside the batch 106..108
    assert removed == sum(len(b) for b in batches[2:])
    assert segment.next_offset == BASE + 6 and segment.size_bytes == len(batches[0] + batches[1])
    assert segment.max_timestamp == T0 + 1
    assert segment.offset_index.last_entry() == (BASE + 3, len(batches[0]))
    assert os.path.getsize(segment.log_path) == segment.size_bytes
    assert segment.truncate_to(BASE + 6) == 0
    segment.truncate_to(BASE)
    assert segment.is_empty and segment.next_offset == BASE and segment.max_timestamp == -1


def test_flush_tracks_what_was_synced(tmp_path: Path) -> None:
    writer = Writer(new_segment(tmp_path))
    writer.add()
    segment = writer.segment
    assert segment.dirty and segment.flushed_size_bytes == 0
    segment.flush()
    assert not segment.dirty and segment.flushed_size_bytes == segment.size_bytes


def test_sealed_segment_loads_trusted(tmp_path: Path) -> None:
    writer = Writer(new_segment(tmp_path, interval=200))
    for i in range(30):
        writer.add(2, T0 + (i * 7) % 50, epoch=4)
    segment = writer.segment
    state = (segment.size_bytes, segment.next_offset, segment.max_timestamp, segment.last_epoch)
    segment.seal()
    segment.close()
    loaded = LogSegment.open_existing(tmp_path, BASE, 200)
    assert loaded.load_trusted() is None
    assert (loaded.size_bytes, loaded.next_offset, loaded.max_timestamp, loaded.last_epoch) == state
    assert loaded.read(BASE, 1 << 20) == b"".join(writer.batches)


def test_load_trusted_rejects_a_partial_tail(tmp_path: Path) -> None:
    writer = Writer(new_segment(tmp_path))
    batch = writer.add()
    writer.segment.seal()
    writer.segment.close()
    with open(tmp_path / "00000000000000000100.log", "ab") as file:
        file.write(batch[:20])
    loaded = LogSegment.open_existing(tmp_path, BASE, 4096)
    problem = loaded.load_trusted()
    assert problem is not None and "ends inside a batch" in problem


def test_iter_headers_reads_past_the_scan_block(tmp_path: Path) -> None:
    writer = Writer(new_segment(tmp_path))
    writer.add_many([(1, T0, 30_000), (1, T0, 10), (1, T0, 20_000)])
    segment = writer.segment
    found = [(p, h.base_offset) for p, h in segment.iter_headers(0, segment.size_bytes)]
    expected = [(p, h.base_offset) for p, h in iter_batch_headers(b"".join(writer.batches))]
    assert found == expected and len(found) == 3
    assert read_header(segment.read(BASE + 2, 1)).base_offset == BASE + 2


def test_delete_removes_all_three_files(tmp_path: Path) -> None:
    writer = Writer(new_segment(tmp_path))
    writer.add()
    writer.segment.delete()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ damaged indexes

def read_entries(path: Path, layout: struct.Struct) -> list[tuple[int, int]]:
    return [tuple(entry) for entry in layout.iter_unpack(path.read_bytes())]  # type: ignore[misc]


def write_entries(path: Path, layout: struct.Struct, entries: list[tuple[int, int]]) -> None:
    path.write_bytes(b"".join(layout.pack(*entry) for entry in entries))


def sealed_segment(directory: Path) -> Writer:
    """30 two-record batches, a timestamp 10 ms later each, an index entry every other batch; closed."""
    writer = Writer(new_segment(directory, interval=200))
    for i in range(30):
        writer.add(2, T0 + 10 * i)
    writer.segment.seal()
    writer.segment.close()
    return writer


def reopened(directory: Path) -> LogSegment:
    segment = LogSegment.open_existing(directory, BASE, 200)
    assert segment.load_trusted() is None  # what open checks cannot see
    return segment


def test_an_index_entry_into_the_middle_of_a_batch_is_found_on_first_use_and_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = sealed_segment(tmp_path)
    path = writer.segment.offset_index.path
    original = path.read_bytes()
    entries = read_entries(path, OFFSET_ENTRY)
    entries[3] = (entries[3][0], entries[3][1] + 7)  # still in order, but inside the batch it names
    write_entries(path, OFFSET_ENTRY, entries)
    segment = reopened(tmp_path)
    with caplog.at_level(logging.WARNING, logger="logbroker.storage"):
        for offset in range(BASE, BASE + 60):
            assert segment.read(offset, 1) == writer.batches[(offset - BASE) // 2]
    [warning] = caplog.records
    assert "rebuilding the indexes of 00000000000000000100.log" in warning.getMessage()
    assert path.read_bytes() == original


def test_a_time_index_entry_naming_the_wrong_batch_is_found_on_first_use_and_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = sealed_segment(tmp_path)
    path = writer.segment.time_index.path
    original = path.read_bytes()
    entries = read_entries(path, TIME_ENTRY)
    # Claims batches up to a later offset are all older than they are: a scan would start too late.
    entries[2] = (entries[1][0] + 1, entries[3][1] - 2)
    write_entries(path, TIME_ENTRY, entries)
    segment = reopened(tmp_path)
    with caplog.at_level(logging.WARNING, logger="logbroker.storage"):
        for target in range(T0 - 5, T0 + 300, 3):
            expected = next((BASE + 2 * i for i in range(30) if T0 + 10 * i >= target), None)
            assert segment.find_offset_for_timestamp(target) == expected, target
    [warning] = caplog.records
    assert "00000000000000000100.log" in warning.getMessage() and "names no such batch" in warning.getMessage()
    assert path.read_bytes() == original


def test_open_refuses_a_last_time_index_entry_that_names_no_such_batch(tmp_path: Path) -> None:
    writer = sealed_segment(tmp_path)
    path = writer.segment.time_index.path
    entries = read_entries(path, TIME_ENTRY)
    entries[-1] = (entries[-1][0] + 1000, entries[-1][1])  # a largest timestamp no batch has
    write_entries(path, TIME_ENTRY, entries)
    problem = LogSegment.open_existing(tmp_path, BASE, 200).load_trusted()
    assert problem is not None and "names no such batch" in problem


def test_the_tail_check_finds_a_damaged_or_misplaced_last_batch(tmp_path: Path) -> None:
    writer = Writer(new_segment(tmp_path, interval=200))
    for i in range(30):
        writer.add(2, T0 + 10 * i)
    writer.add_many([(1, T0, 40), (1, T0, 40)])  # old timestamps; the last batch is named by no index
    writer.segment.seal()
    writer.segment.close()
    log_path = writer.segment.log_path
    last = len(b"".join(writer.batches[:-1]))
    data = bytearray(log_path.read_bytes())
    data[last + 70] ^= 0x01  # a record byte, under the CRC
    log_path.write_bytes(bytes(data))
    assert LogSegment.open_existing(tmp_path, BASE, 200).load_trusted() is None  # not looked at
    problem = LogSegment.open_existing(tmp_path, BASE, 200).load_trusted(check_tail=True)
    assert problem is not None and f"the batch at byte {last} fails its check: CRC mismatch" in problem

    data[last + 70] ^= 0x01
    struct.pack_into(">q", data, last, BASE + 62)  # baseOffset, outside the CRC: one past where it belongs
    log_path.write_bytes(bytes(data))
    problem = LogSegment.open_existing(tmp_path, BASE, 200).load_trusted(check_tail=True)
    assert problem is not None and f"has offset {BASE + 62}, expected {BASE + 61}" in problem
    assert LogSegment.open_existing(tmp_path, BASE, 200).load_trusted(check_tail=True, allow_gaps=True) is None
