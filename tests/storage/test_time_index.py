from __future__ import annotations

import struct
from pathlib import Path

import pytest

from logbroker.storage.time_index import TimeIndex

BASE = 500


def written(path: Path, entries: list[tuple[int, int]]) -> TimeIndex:
    index = TimeIndex(path, BASE)
    for timestamp, offset in entries:
        index.maybe_append(timestamp, offset)
    index.write_pending()
    return index


def test_entries_are_12_byte_big_endian_timestamp_and_relative_offset(tmp_path: Path) -> None:
    written(tmp_path / "a.timeindex", [(1_700_000_000_000, BASE + 3)]).close()
    assert (tmp_path / "a.timeindex").read_bytes() == struct.pack(">qI", 1_700_000_000_000, 3)


def test_only_growing_timestamps_are_added(tmp_path: Path) -> None:
    index = TimeIndex(tmp_path / "a.timeindex", BASE)
    assert index.maybe_append(100, BASE)
    assert not index.maybe_append(100, BASE + 5)
    assert not index.maybe_append(90, BASE + 6)
    assert index.maybe_append(150, BASE + 7)
    assert index.entries == 2 and index.last_entry() == (150, BASE + 7)


def test_lookup_gives_where_to_start_scanning(tmp_path: Path) -> None:
    index = written(tmp_path / "a.timeindex", [(100, BASE + 10), (200, BASE + 20), (300, BASE + 30)])
    assert index.lookup(50) == BASE  # nothing older: scan from the segment start
    assert index.lookup(100) == BASE  # the batch at BASE+10 itself may be the answer
    assert index.lookup(101) == BASE + 10  # everything up to BASE+10 is older than 101
    assert index.lookup(250) == BASE + 20
    assert index.lookup(10**15) == BASE + 30


def test_truncate_to_and_load(tmp_path: Path) -> None:
    index = written(tmp_path / "a.timeindex", [(100, BASE + 10), (200, BASE + 20), (300, BASE + 30)])
    index.truncate_to(BASE + 20)
    assert index.last_entry() == (100, BASE + 10)
    index.close()
    reloaded = TimeIndex(tmp_path / "a.timeindex", BASE)
    assert reloaded.load(next_offset=BASE + 11) is None
    assert reloaded.last_entry() == (100, BASE + 10)


@pytest.mark.parametrize(("content", "problem"), [
    (b"\x01" * 13, "not a multiple of 12"),
    (struct.pack(">qIqI", 200, 1, 100, 2), "does not follow"),
    (struct.pack(">qIqI", 100, 2, 200, 2), "does not follow"),
    (struct.pack(">qI", 100, 50), "beyond the end of the log"),
])
def test_load_reports_corruption_instead_of_raising(tmp_path: Path, content: bytes, problem: str) -> None:
    (tmp_path / "a.timeindex").write_bytes(content)
    index = TimeIndex(tmp_path / "a.timeindex", BASE)
    reason = index.load(next_offset=BASE + 20)
    assert reason is not None and problem in reason
    assert index.entries == 0 and index.lookup(10**12) == BASE
