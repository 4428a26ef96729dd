from __future__ import annotations

import logging
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from logbroker_client.records import COMPRESSION_NONE, COMPRESSION_ZSTD, build_batch, iter_batch_headers

from logbroker.storage import filenames
from logbroker.storage.log import PartitionLog
from logbroker.storage.offset_index import ENTRY as OFFSET_ENTRY
from logbroker.storage.recovery import recover_segment
from logbroker.storage.segment import LogSegment
from logbroker.storage.time_index import ENTRY as TIME_ENTRY
from tests.storage.conftest import T0, make_batch, open_log

EPOCH_FIELD = range(12, 16)  # partitionLeaderEpoch: outside the CRC by the format's design


@dataclass
class Stored:
    """One batch as the log stored it."""

    segment: int  # index of its segment file
    position: int  # byte position in that file
    data: bytes
    base_offset: int
    last_offset: int


def write_log(directory: Path, batches: list[bytes], config: dict[str, int]) -> list[Stored]:
    log = open_log(directory, **config)
    for batch in batches:
        log.append(bytearray(batch), 5, T0)
    stored = []
    for index, segment in enumerate(log.segments):
        data = segment.pread(0, segment.size_bytes)
        for position, header in iter_batch_headers(data):
            size = header.batch_length + 12
            stored.append(Stored(index, position, data[position:position + size], header.base_offset,
                                 header.last_offset))
    log.close()
    return stored


def crash(directory: Path) -> None:
    """What a crash leaves: no clean-shutdown marker and no recovery checkpoint."""
    (directory / filenames.CLEAN_SHUTDOWN_FILE).unlink()
    (directory / filenames.RECOVERY_CHECKPOINT_FILE).unlink()


def log_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.log"))


def check_recovered(directory: Path, config: dict[str, int], kept: list[Stored]) -> None:
    log = open_log(directory, **config)
    expected_end = kept[-1].last_offset + 1 if kept else 0
    assert log.log_end_offset == expected_end
    assert log.read(0, 1 << 30) == b"".join(s.data for s in kept)
    for stored in kept:
        for offset in {stored.base_offset, stored.last_offset}:
            assert log.read(offset, 1).startswith(stored.data)
    result = log.append(bytearray(make_batch(2)), 6, T0)
    assert result.base_offset == expected_end
    log.close()
    again = open_log(directory, **config)
    assert again.log_end_offset == expected_end + 2
    assert again.read(0, 1 << 30).startswith(b"".join(s.data for s in kept))
    again.close()


batch_strategy = st.builds(
    lambda records, size, ts, zstd, seed: build_batch(
        [(T0 + ts + i, None, bytes([seed]) * size, []) for i in range(records)],
        compression=COMPRESSION_ZSTD if zstd else COMPRESSION_NONE,
    ),
    st.integers(1, 4), st.integers(0, 150), st.integers(0, 10_000), st.booleans(), st.integers(0, 255),
)
config_strategy = st.fixed_dictionaries({
    "segment_bytes": st.sampled_from([1 << 20, 400, 250]),
    "index_interval_bytes": st.sampled_from([0, 100, 4096]),
})
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.lists(batch_strategy, min_size=1, max_size=12), config_strategy, st.data())
def test_truncated_file_recovers_exactly_the_valid_prefix(
    batches: list[bytes], config: dict[str, int], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "orders-3"
        stored = write_log(directory, batches, config)
        files = log_files(directory)
        damaged = data.draw(st.integers(0, len(files) - 1), label="segment")
        size = files[damaged].stat().st_size
        cut = data.draw(st.integers(0, size), label="cut")
        crash(directory)
        os.truncate(files[damaged], cut)
        if cut == size:
            kept = stored
        else:
            kept = [s for s in stored if s.segment < damaged or
                    (s.segment == damaged and s.position + len(s.data) <= cut)]
        check_recovered(directory, config, kept)


@SETTINGS
@given(st.lists(batch_strategy, min_size=1, max_size=12), config_strategy, st.data())
def test_flipped_bit_recovers_exactly_the_batches_before_it(
    batches: list[bytes], config: dict[str, int], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "orders-3"
        stored = write_log(directory, batches, config)
        files = log_files(directory)
        damaged = data.draw(st.integers(0, len(files) - 1), label="segment")
        size = files[damaged].stat().st_size
        assume(size > 0)
        position = data.draw(st.integers(0, size - 1), label="position")
        bit = data.draw(st.integers(0, 7), label="bit")
        hit = next(s for s in stored if s.segment == damaged and s.position <= position < s.position + len(s.data))
        assume(position - hit.position not in EPOCH_FIELD)
        crash(directory)
        with open(files[damaged], "r+b") as file:
            file.seek(position)
            byte = file.read(1)[0]
            file.seek(position)
            file.write(bytes([byte ^ (1 << bit)]))
        kept = [s for s in stored if s.segment < damaged or (s.segment == damaged and s.position < hit.position)]
        check_recovered(directory, config, kept)


def test_partial_batch_at_the_end_is_cut_with_one_clear_log_line(
    log_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stored = write_log(log_dir, [make_batch(2) for _ in range(3)], {})
    crash(log_dir)
    with open(log_files(log_dir)[0], "ab") as file:
        file.write(stored[0].data[:40])
    with caplog.at_level(logging.INFO, logger="logbroker.storage"):
        log = open_log(log_dir)
    assert log.log_end_offset == 6
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith("orders-3: segment 00000000000000000000.log truncated at byte ")
    assert "truncated batch" in errors[0] and "40 bytes dropped" in errors[0]


def test_bad_crc_in_a_middle_segment_drops_the_rest(log_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    batch = make_batch(1, value_size=50)
    config = {"segment_bytes": len(batch) * 2}
    stored = write_log(log_dir, [batch] * 6, config)
    crash(log_dir)
    target = log_files(log_dir)[1]
    raw = bytearray(target.read_bytes())
    raw[len(batch) + 70] ^= 0xFF  # a record byte of the second batch in the second segment
    target.write_bytes(bytes(raw))
    with caplog.at_level(logging.INFO, logger="logbroker.storage"):
        log = open_log(log_dir, **config)
    assert log.log_end_offset == 3
    assert log.read(0, 1 << 20) == b"".join(s.data for s in stored[:3])
    text = caplog.text
    assert f"00000000000000000002.log truncated at byte {len(batch)} (CRC mismatch" in text
    assert "1 batch, " in text
    assert "deleted 1 later segment(s) from 00000000000000000004.log" in text
    assert not (log_dir / "00000000000000000004.log").exists()


def test_offset_going_backwards_is_cut(log_dir: Path) -> None:
    write_log(log_dir, [make_batch(2), make_batch(2)], {})
    crash(log_dir)
    with open(log_files(log_dir)[0], "ab") as file:
        file.write(build_batch([(T0, None, b"x", [])], base_offset=1))  # valid CRC, offset already used
    log = open_log(log_dir)
    assert log.log_end_offset == 4


def test_checkpoint_makes_recovery_skip_older_segments(log_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    batch = make_batch(1, value_size=50)
    config = {"segment_bytes": len(batch) * 2}
    write_log(log_dir, [batch] * 6, config)
    (log_dir / filenames.CLEAN_SHUTDOWN_FILE).unlink()  # a crash after a flush that covered everything
    with caplog.at_level(logging.INFO, logger="logbroker.storage"):
        log = open_log(log_dir, **config)
    assert log.log_end_offset == 6
    assert "segment 00000000000000000004.log recovered" in caplog.text
    assert "00000000000000000000.log recovered" not in caplog.text
    assert "00000000000000000002.log recovered" not in caplog.text


def test_malformed_checkpoint_means_recovering_everything(log_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    batch = make_batch(1, value_size=50)
    config = {"segment_bytes": len(batch) * 2}
    write_log(log_dir, [batch] * 6, config)
    (log_dir / filenames.CLEAN_SHUTDOWN_FILE).unlink()
    (log_dir / filenames.RECOVERY_CHECKPOINT_FILE).write_bytes(b"\x00garbage")
    with caplog.at_level(logging.INFO, logger="logbroker.storage"):
        log = open_log(log_dir, **config)
    assert log.log_end_offset == 6
    assert "ignoring malformed" in caplog.text
    assert "00000000000000000000.log recovered" in caplog.text


@pytest.mark.parametrize("clean", [True, False])
@pytest.mark.parametrize("damage", ["delete", "garbage", "truncate", "empty"])
@pytest.mark.parametrize("which", [".index", ".timeindex"])
def test_missing_or_corrupt_index_is_rebuilt(log_dir: Path, clean: bool, damage: str, which: str) -> None:
    batches = [make_batch(1, timestamp_ms=T0 + i * 10, value_size=40, seed=i) for i in range(60)]
    config = {"index_interval_bytes": 200, "segment_bytes": len(batches[0]) * 25}
    write_log(log_dir, batches, config)
    reference = open_log(log_dir, **config)
    expected = {(offset, ts): (reference.read(offset, 300), reference.offset_for_timestamp(ts))
                for offset in range(0, 60, 7) for ts in (T0 + offset * 10 - 5, T0 + offset * 10)}
    entries = [(s.offset_index.entries, s.time_index.entries) for s in reference.segments]
    reference.close()
    if not clean:
        (log_dir / filenames.CLEAN_SHUTDOWN_FILE).unlink()
    for path in log_dir.glob("*" + which):
        if damage == "delete":
            path.unlink()
        elif damage == "garbage":
            path.write_bytes(os.urandom(path.stat().st_size or 24))
        elif damage == "truncate":
            os.truncate(path, max(0, path.stat().st_size - 3))
        else:
            os.truncate(path, 0)
    log = open_log(log_dir, **config)
    for (offset, ts), (data, found) in expected.items():
        assert log.read(offset, 300) == data
        assert log.offset_for_timestamp(ts) == found
    assert [(s.offset_index.entries, s.time_index.entries) for s in log.segments] == entries
    assert log.log_end_offset == 60


def test_recover_segment_reports_without_raising(tmp_path: Path) -> None:
    segment = LogSegment.create(tmp_path, 0, 4096, T0)
    segment.close()
    (tmp_path / filenames.log_file_name(0)).write_bytes(make_batch(3) + b"\xff" * 100)
    segment = LogSegment.open_existing(tmp_path, 0, 4096)
    report = recover_segment(segment, 0, allow_gaps=False)
    assert (report.valid_batches, report.next_offset, report.truncated_bytes) == (1, 3, 100)
    assert report.reason is not None and report.truncated
    assert "orders-3: segment 00000000000000000000.log truncated at byte" in report.describe("orders-3")
    assert os.path.getsize(tmp_path / filenames.log_file_name(0)) == len(make_batch(3))
    segment.close()


def test_open_ignores_stray_files(log_dir: Path) -> None:
    write_log(log_dir, [make_batch(2)], {})
    (log_dir / (filenames.index_file_name(500))).write_bytes(b"x" * 8)
    (log_dir / "recovery-point.checkpoint.tmp").write_bytes(b"junk")
    log = open_log(log_dir)
    assert log.log_end_offset == 2
    assert not (log_dir / filenames.index_file_name(500)).exists()


# ------------------------------------------------------------------------------------ indexes that lie

def _edit(path: Path, layout: struct.Struct, change: Callable[[list[tuple[int, int]]], None]) -> None:
    entries: list[tuple[int, int]] = [tuple(e) for e in layout.iter_unpack(path.read_bytes())]  # type: ignore[misc]
    change(entries)
    path.write_bytes(b"".join(layout.pack(*e) for e in entries))


def _into_a_batch(entries: list[tuple[int, int]], i: int) -> None:
    entries[i] = (entries[i][0], entries[i][1] + 9)


def _past_the_end(entries: list[tuple[int, int]]) -> None:
    entries[-1] = (entries[-1][0], entries[-1][1] + 1_000_000)


def _out_of_order(entries: list[tuple[int, int]]) -> None:
    entries[1], entries[2] = entries[2], entries[1]


def _wrong_batch(entries: list[tuple[int, int]]) -> None:
    entries[1] = (entries[0][0] + 1, entries[2][1] - 1)  # in order, but names a later batch


def _no_such_timestamp(entries: list[tuple[int, int]]) -> None:
    entries[-1] = (entries[-1][0] + 5, entries[-1][1])


INDEX_DAMAGE: dict[str, tuple[str, Callable[[list[tuple[int, int]]], None]]] = {
    "an offset entry into the middle of a batch": (".index", lambda entries: _into_a_batch(entries, 1)),
    "the last offset entry into the middle of a batch": (".index", lambda entries: _into_a_batch(entries, -1)),
    "an offset entry past the end of the file": (".index", _past_the_end),
    "offset entries out of order": (".index", _out_of_order),
    "a time entry naming the wrong batch": (".timeindex", _wrong_batch),
    "a last time entry with a timestamp no batch has": (".timeindex", _no_such_timestamp),
    "time entries out of order": (".timeindex", _out_of_order),
}


@pytest.mark.parametrize("segment", [0, 2], ids=["sealed segment", "active segment"])
@pytest.mark.parametrize("damage", sorted(INDEX_DAMAGE))
def test_an_index_that_lies_is_rebuilt_and_reads_stay_right(
    log_dir: Path, caplog: pytest.LogCaptureFixture, damage: str, segment: int
) -> None:
    batches = [make_batch(2, timestamp_ms=T0 + i * 10, value_size=40, seed=i) for i in range(60)]
    config = {"index_interval_bytes": 200, "segment_bytes": len(batches[0]) * 25}  # 25, 25 and 10 batches
    stored = write_log(log_dir, batches, config)
    reference = open_log(log_dir, **config)
    timestamps = range(T0 - 5, T0 + 600, 7)
    expected = [reference.offset_for_timestamp(ts) for ts in timestamps]
    entries = [(s.offset_index.entries, s.time_index.entries) for s in reference.segments]
    reference.close()
    suffix, change = INDEX_DAMAGE[damage]
    victim = sorted(log_dir.glob("*" + suffix))[segment]
    _edit(victim, OFFSET_ENTRY if suffix == ".index" else TIME_ENTRY, change)

    with caplog.at_level(logging.WARNING, logger="logbroker.storage"):
        log = open_log(log_dir, **config)
        for s in stored:
            assert log.read(s.base_offset, 1) == log.read(s.last_offset, 1) == s.data
        assert [log.offset_for_timestamp(ts) for ts in timestamps] == expected
    assert [(s.offset_index.entries, s.time_index.entries) for s in log.segments] == entries
    assert log.log_end_offset == 120
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and victim.with_suffix(".log").name in warnings[0], warnings


# ------------------------------------------------------------------------------------ bit rot after a clean shutdown

@SETTINGS
@given(st.lists(batch_strategy, min_size=1, max_size=12), config_strategy, st.data())
def test_a_flipped_byte_in_the_last_batch_is_cut_at_open_even_after_a_clean_shutdown(
    batches: list[bytes], config: dict[str, int], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "orders-3"
        stored = write_log(directory, batches, config)  # closed cleanly: the marker says "skip recovery"
        last = stored[-1]
        position = data.draw(st.integers(0, len(last.data) - 1).filter(lambda p: p not in EPOCH_FIELD))
        bit = data.draw(st.integers(0, 7), label="bit")
        with open(log_files(directory)[last.segment], "r+b") as file:
            file.seek(last.position + position)
            byte = file.read(1)[0]
            file.seek(last.position + position)
            file.write(bytes([byte ^ (1 << bit)]))
        assert (directory / filenames.CLEAN_SHUTDOWN_FILE).exists()
        check_recovered(directory, config, stored[:-1])


def test_the_tail_check_reads_only_the_batches_after_the_last_index_entry(
    log_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """So its cost does not grow with the log; damage further back is left to the readers' CRC checks."""
    batches = [make_batch(1, value_size=100, seed=i) for i in range(100)]
    stored = write_log(log_dir, batches, {"index_interval_bytes": 1000})
    raw = bytearray(log_files(log_dir)[0].read_bytes())
    raw[stored[3].position + 70] ^= 0x01  # far before the last index entry
    log_files(log_dir)[0].write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="logbroker.storage"):
        log = open_log(log_dir, index_interval_bytes=1000)
    assert log.log_end_offset == 100 and not caplog.records


# ------------------------------------------------------------------ a log shorter than it once was made durable


def written_in_segments(directory: Path, batches: int = 40) -> PartitionLog:
    log = open_log(directory, segment_bytes=1024)
    for seed in range(batches):
        log.append(bytearray(make_batch(value_size=100, seed=seed)), 5, T0)
    log.flush()
    assert len(log.segments) >= 3, "the test needs several segments"
    return log


def test_a_log_whose_newest_segment_files_were_deleted_says_it_lost_records_it_had_made_durable(
        log_dir: Path) -> None:
    """An operator deleting the newest segment's files leaves older segments that load cleanly: only the recovery
    checkpoint (written at every clean close, and on the first flush into each new segment) still says how far the
    log had been fsynced. A Raft replica must then catch up before it votes (Replica.lost_its_log)."""
    log = written_in_segments(log_dir)
    end = log.log_end_offset
    newest_base = log.segments[-1].base_offset
    log.close()
    for path in log_dir.iterdir():
        if path.stem == Path(filenames.log_file_name(newest_base)).stem:
            path.unlink()
    reopened = open_log(log_dir, segment_bytes=1024)
    assert reopened.log_end_offset == newest_base
    assert reopened.lost_durable_records == (newest_base, end)
    reopened.close()


def test_a_crashed_log_cut_below_its_checkpoint_says_it_lost_records_and_a_whole_one_does_not(
        log_dir: Path) -> None:
    log = written_in_segments(log_dir)
    newest_base = log.segments[-1].base_offset
    log.append(bytearray(make_batch(value_size=100, seed=99)), 5, T0)
    log.flush()  # the first flush into the newest segment wrote the checkpoint past its base
    log.close()
    whole = open_log(log_dir, segment_bytes=1024)
    assert whole.lost_durable_records is None
    whole.close()
    (log_dir / filenames.CLEAN_SHUTDOWN_FILE).unlink()  # a crash: recovery reads every unchecked segment
    newest = log_files(log_dir)[-1]
    with open(newest, "r+b") as f:
        f.truncate(10)  # cut inside its first batch, below what the checkpoint says was fsynced
    cut = open_log(log_dir, segment_bytes=1024)
    assert cut.log_end_offset == newest_base
    assert cut.lost_durable_records is not None and cut.lost_durable_records[0] == newest_base
    cut.close()


def test_a_newest_segment_flushed_while_empty_is_still_covered_once_its_records_are_durable(log_dir: Path) -> None:
    """A flush can run between a roll and the write it makes room for (flush() runs in another thread while the
    owner appends): it saw the newest segment empty and checkpointed its base. Without a second checkpoint once
    records land there, deleting that segment left a log ending exactly at the checkpoint, and the loss went
    unseen (the deleted-files adversary's 60 acknowledged records)."""
    log = written_in_segments(log_dir)
    log._roll(T0)  # the roll of an append whose write has not happened yet
    newest_base = log.segments[-1].base_offset
    log.flush()
    log.append(bytearray(make_batch(value_size=100, seed=98)), 5, T0)
    log.flush()
    end = log.log_end_offset
    (log_dir / filenames.CLEAN_SHUTDOWN_FILE).touch()  # as if closed cleanly, without close()'s own checkpoint
    log._close_files()
    for path in log_dir.iterdir():
        if path.stem == Path(filenames.log_file_name(newest_base)).stem:
            path.unlink()
    reopened = open_log(log_dir, segment_bytes=1024)
    assert reopened.lost_durable_records == (newest_base, end)
    reopened.close()
