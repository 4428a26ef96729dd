from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logbroker.storage.offset_index import ENTRY_SIZE, OffsetIndex

BASE = 1000


def written(path: Path, entries: list[tuple[int, int]]) -> OffsetIndex:
    index = OffsetIndex(path, BASE)
    for offset, position in entries:
        index.append(offset, position)
    index.write_pending()
    return index


def test_entries_are_8_byte_big_endian_relative_offset_and_position(tmp_path: Path) -> None:
    written(tmp_path / "a.index", [(BASE + 5, 100), (BASE + 70000, 0x01020304)]).close()
    assert (tmp_path / "a.index").read_bytes() == struct.pack(">IIII", 5, 100, 70000, 0x01020304)


def test_lookup_returns_greatest_entry_at_or_below(tmp_path: Path) -> None:
    index = written(tmp_path / "a.index", [(BASE + 10, 400), (BASE + 20, 800), (BASE + 30, 1200)])
    assert index.lookup(BASE) == (BASE, 0)
    assert index.lookup(BASE + 9) == (BASE, 0)
    assert index.lookup(BASE + 10) == (BASE + 10, 400)
    assert index.lookup(BASE + 29) == (BASE + 20, 800)
    assert index.lookup(BASE + 10**6) == (BASE + 30, 1200)
    assert index.lookup_position(799) == (BASE + 10, 400)
    assert index.lookup_position(800) == (BASE + 20, 800)
    assert index.lookup_position(10) == (BASE, 0)
    assert index.last_entry() == (BASE + 30, 1200)


def test_append_refuses_non_increasing_or_oversized_entries(tmp_path: Path) -> None:
    index = written(tmp_path / "a.index", [(BASE + 10, 400)])
    for offset, position in ((BASE + 10, 500), (BASE + 11, 400), (BASE - 1, 500), (BASE + 2**32, 500)):
        with pytest.raises(ValueError):
            index.append(offset, position)


def test_truncate_to_drops_entries_at_and_after_offset(tmp_path: Path) -> None:
    index = written(tmp_path / "a.index", [(BASE + 10, 400), (BASE + 20, 800), (BASE + 30, 1200)])
    index.truncate_to(BASE + 20)
    assert index.entries == 1 and index.last_entry() == (BASE + 10, 400)
    assert (tmp_path / "a.index").stat().st_size == ENTRY_SIZE
    index.append(BASE + 15, 600)
    index.write_pending()
    assert (tmp_path / "a.index").stat().st_size == 2 * ENTRY_SIZE


def test_rollback_forgets_staged_entries(tmp_path: Path) -> None:
    index = written(tmp_path / "a.index", [(BASE + 10, 400)])
    index.append(BASE + 20, 800)
    index.rollback_to(1)
    index.write_pending()
    assert index.entries == 1 and (tmp_path / "a.index").stat().st_size == ENTRY_SIZE


def test_load_accepts_a_sane_file(tmp_path: Path) -> None:
    written(tmp_path / "a.index", [(BASE + 10, 400), (BASE + 20, 800)]).close()
    index = OffsetIndex(tmp_path / "a.index", BASE)
    assert index.load(log_size=801) is None
    assert index.lookup(BASE + 25) == (BASE + 20, 800)


@pytest.mark.parametrize(("content", "log_size", "problem"), [
    (b"\x00" * 7, 100, "not a multiple of 8"),
    (struct.pack(">IIII", 5, 100, 5, 200), 1000, "offsets are not strictly increasing"),
    (struct.pack(">IIII", 5, 100, 6, 100), 1000, "positions are not strictly increasing"),
    (struct.pack(">II", 5, 100), 100, "beyond the end of the log"),
])
def test_load_reports_corruption_instead_of_raising(tmp_path: Path, content: bytes, log_size: int,
                                                    problem: str) -> None:
    (tmp_path / "a.index").write_bytes(content)
    index = OffsetIndex(tmp_path / "a.index", BASE)
    reason = index.load(log_size)
    assert reason is not None and problem in reason and "a.index" in reason
    assert index.entries == 0 and index.lookup(BASE + 50) == (BASE, 0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 50), st.integers(1, 5000)), max_size=60), st.integers(0, 3000))
def test_lookup_matches_a_linear_scan(steps: list[tuple[int, int]], target: int) -> None:
    entries = []
    offset, position = BASE, 0
    for offset_step, position_step in steps:
        offset += offset_step
        position += position_step
        entries.append((offset, position))
    with tempfile.TemporaryDirectory() as tmp:
        index = written(Path(tmp) / "a.index", entries)
        expected = max((e for e in entries if e[0] <= BASE + target), default=(BASE, 0))
        assert index.lookup(BASE + target) == expected
        index.close()
        reloaded = OffsetIndex(Path(tmp) / "a.index", BASE)
        assert reloaded.load(position + 1) is None
        assert reloaded.lookup(BASE + target) == expected
        reloaded.close()
