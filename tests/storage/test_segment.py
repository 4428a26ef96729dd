from __future__ import annotations

import os
from pathlib import Path

from logbroker_client.records import build_batch, iter_batch_headers, read_header

from logbroker.storage.segment import BatchInfo, LogSegment
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
