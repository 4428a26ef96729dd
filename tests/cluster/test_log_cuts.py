"""Cutting a replica's log (a Raft log reset, retention, a snapshot) survives a crash at any point.

What the new log start needs (the term before it, the membership) is saved with the Raft state before
the log is cut; a crash between the two leaves a state the next open finishes, never a log it
misdescribes."""

from __future__ import annotations

from pathlib import Path

from logbroker_client import records as rec

from logbroker.cluster.raft_storage import PartitionLogStorage, ReplicaState
from logbroker.cluster.replica import finish_log_cut
from logbroker.storage.config import LogConfig
from logbroker.storage.log import PartitionLog

SEGMENT_BYTES = 4096


def log_of_segments(directory: Path, batches: int = 60) -> PartitionLog:
    plog = PartitionLog.open(directory, LogConfig(segment_bytes=SEGMENT_BYTES), "t", 0)
    for i in range(batches):
        builder = rec.BatchBuilder()
        builder.append(1_700_000_000_000 + i, None, b"x" * 200)
        batch = bytearray(builder.build())
        rec.stamp_batch(batch, i, 1)
        plog.append_replicated(bytes(batch), 1_700_000_000_000)
    assert len(plog.segment_bases()) > 3, "the test wants several segments"
    return plog


def test_a_prefix_cut_interrupted_by_a_crash_is_finished_at_open(tmp_path: Path) -> None:
    plog = log_of_segments(tmp_path / "p")
    cut = plog.segment_bases()[2]
    finish_log_cut(plog, cut)  # the state says the log starts there; the segments below were not yet gone
    assert plog.log_start_offset == cut and plog.log_end_offset == 60


def test_a_reset_interrupted_by_a_crash_is_finished_at_open(tmp_path: Path) -> None:
    plog = log_of_segments(tmp_path / "p")
    finish_log_cut(plog, 500)  # a Raft log reset to 500: the old log was never thrown away
    assert plog.log_start_offset == plog.log_end_offset == 500


def test_a_finished_cut_is_left_alone(tmp_path: Path) -> None:
    plog = log_of_segments(tmp_path / "p")
    finish_log_cut(plog, -1)
    finish_log_cut(plog, 0)
    assert plog.log_start_offset == 0 and plog.log_end_offset == 60


def test_the_saved_term_before_the_start_is_used_only_for_the_start_it_was_saved_for(tmp_path: Path) -> None:
    plog = log_of_segments(tmp_path / "p")
    cut = plog.segment_bases()[1]
    plog.delete_segments_before(cut)
    storage = PartitionLogStorage(plog, ReplicaState(start_prev_term=7, log_start_offset=cut))
    assert storage.term_at(cut - 1) == 7
    stale = PartitionLogStorage(plog, ReplicaState(start_prev_term=7, log_start_offset=cut - 5))
    assert stale.term_at(cut - 1) is None  # unknown, so never matched: the leader sends a reset
