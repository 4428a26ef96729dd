"""The leader-epoch cache: where each epoch begins, answered from memory, kept right through appends,
truncation, retention, resets and restarts, and rebuilt from the log when its file is missing or wrong."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from logbroker.storage import filenames
from logbroker.storage.leader_epochs import UNDEFINED_EPOCH, UNDEFINED_OFFSET
from logbroker.storage.log import PartitionLog
from tests.storage.conftest import T0, make_batch, open_log

# (epoch, records): offsets 0-2 in epoch 2, 3-4 in epoch 2, 5-8 in epoch 5, 9 in epoch 7
WRITES = [(2, 3), (2, 2), (5, 4), (7, 1)]
EXPECTED = [(2, 0), (5, 5), (7, 9)]


def written(directory: Path, **config: object) -> PartitionLog:
    log = open_log(directory, **config)
    for epoch, records in WRITES:
        log.append(bytearray(make_batch(records)), epoch, T0)
    return log


def every_epoch_from_disk(log: PartitionLog) -> list[int]:
    return [log._epoch_on_disk(o) for o in range(log.log_start_offset, log.log_end_offset)]


def test_epoch_starts_are_recorded_as_batches_are_appended(log_dir: Path) -> None:
    log = written(log_dir)
    assert log.epochs.entries() == EXPECTED
    assert [log.epoch_at(o) for o in range(10)] == every_epoch_from_disk(log) == [2] * 5 + [5] * 4 + [7]


def test_epoch_at_reads_no_disk(log_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = written(log_dir)

    def no_disk(*_: object) -> None:
        raise AssertionError("epoch_at read the disk")

    monkeypatch.setattr(log, "_epoch_on_disk", no_disk)
    assert log.epoch_at(7) == 5


def test_a_follower_records_the_epochs_of_what_it_copies(log_dir: Path, tmp_path: Path) -> None:
    leader = written(tmp_path / "leader")
    follower = open_log(log_dir)
    follower.append_replicated(leader.read(0, 1 << 20), now_ms=T0)
    assert follower.epochs.entries() == EXPECTED


def test_end_offset_for_an_epoch_answers_as_kafka_does(log_dir: Path) -> None:
    log = written(log_dir)
    end = log.log_end_offset
    assert log.epochs.end_offset_for(2, end) == (2, 5)
    assert log.epochs.end_offset_for(4, end) == (2, 5)  # an epoch with no batches: the one before it
    assert log.epochs.end_offset_for(7, end) == (7, 10)  # the latest: the log end
    assert log.epochs.end_offset_for(9, end) == (7, 10)
    assert log.epochs.end_offset_for(1, end) == (UNDEFINED_EPOCH, UNDEFINED_OFFSET)


def test_truncation_and_reset_forget_the_epochs_they_remove(log_dir: Path) -> None:
    log = written(log_dir)
    log.truncate_to(6)  # inside epoch 5's batch of 5..8: the whole batch goes
    assert log.epochs.entries() == [(2, 0)]
    log.append(bytearray(make_batch(1)), 8, T0)
    assert log.epochs.entries() == [(2, 0), (8, 5)]
    log.reset_to(100)
    assert log.epochs.entries() == []
    log.append(bytearray(make_batch(1)), 9, T0)
    assert log.epochs.entries() == [(9, 100)] and log.epoch_at(100) == 9


def test_a_shorter_log_start_moves_the_first_epochs_start(log_dir: Path) -> None:
    log = written(log_dir, segment_bytes=100)  # every batch in a segment of its own
    log.delete_segments_before(log.prefix_cut_point(7))
    assert log.log_start_offset == 5 and log.epochs.entries() == [(5, 5), (7, 9)]
    log.delete_segments_before(log.prefix_cut_point(9))
    assert log.epochs.entries() == [(7, 9)]


def test_a_reopened_log_has_the_same_epochs(log_dir: Path) -> None:
    written(log_dir).close()
    assert open_log(log_dir).epochs.entries() == EXPECTED


@pytest.mark.parametrize("damage", ["missing", "garbage", "stale", "lying", "beyond the log"])
def test_a_missing_or_wrong_checkpoint_is_rebuilt_from_the_log(log_dir: Path, damage: str) -> None:
    written(log_dir).close()
    path = log_dir / filenames.LEADER_EPOCH_CHECKPOINT_FILE
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint\n")
    elif damage == "stale":  # written before epoch 7 began (a crash lost the later write)
        path.write_text("0\n2\n2 0\n5 5\n")
    elif damage == "lying":  # epoch 5 does not begin at 4
        path.write_text("0\n3\n2 0\n5 4\n7 9\n")
    else:  # an entry for a tail the crash took away
        path.write_text("0\n4\n2 0\n5 5\n7 9\n9 30\n")
    log = open_log(log_dir)
    assert log.epochs.entries() == EXPECTED
    assert [log.epoch_at(o) for o in range(10)] == every_epoch_from_disk(log)
    assert path.read_text() == "0\n3\n2 0\n5 5\n7 9\n"  # written back right



def test_a_checkpoint_older_than_a_reset_to_an_empty_log_is_dropped(log_dir: Path) -> None:
    # A reset that failed half way (a full disk) leaves the old file beside an empty log at a later offset; the
    # runtime simulation found that open then asked the empty log for an epoch and failed, every time.
    written(log_dir).close()
    saved = (log_dir / filenames.LEADER_EPOCH_CHECKPOINT_FILE).read_bytes()
    log = open_log(log_dir)
    log.reset_to(13)
    log.close()
    (log_dir / filenames.LEADER_EPOCH_CHECKPOINT_FILE).write_bytes(saved)
    log = open_log(log_dir)
    assert (log.log_start_offset, log.log_end_offset) == (13, 13) and log.epochs.entries() == []


def test_deleting_every_batch_below_an_empty_active_segment_forgets_every_epoch(log_dir: Path) -> None:
    # An append that failed right after a roll leaves the new active segment empty; deleting the segments below
    # it left epoch 7 "beginning" at the log end, and the next leader's first append then tripped an assertion
    # (found by the runtime simulation).
    log = written(log_dir, segment_bytes=100)
    log._roll(T0)  # the active segment is now empty, at the log end
    end = log.log_end_offset
    log.delete_segments_before(log.prefix_cut_point(end))
    assert (log.log_start_offset, log.log_end_offset) == (end, end) and log.epochs.entries() == []
    log.append(bytearray(make_batch(1)), 9, T0)
    assert log.epochs.entries() == [(9, end)] and log.epoch_at(end) == 9


def test_a_full_disk_when_saving_the_epochs_does_not_half_do_a_retention(log_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The save came between dropping the segments from the list and deleting their files: a failure left the
    # files, and the next open found them, then a gap, and cut every later segment (runtime simulation).
    log = written(log_dir, segment_bytes=100)  # every batch in a segment of its own
    log.append(bytearray(make_batch(1)), 7, T0)

    def disk_full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(log.epochs, "save", disk_full)
    log.delete_segments_before(log.prefix_cut_point(9))
    assert log.log_start_offset == 9
    monkeypatch.undo()
    log.append(bytearray(make_batch(1)), 8, T0)
    end = log.log_end_offset
    log.close()
    reopened = open_log(log_dir)
    assert (reopened.log_start_offset, reopened.log_end_offset) == (9, end)
    assert reopened.epochs.entries() == [(7, 9), (8, end - 1)]
