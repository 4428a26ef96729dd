"""The Raft state file and the partition log as a Raft log."""

from __future__ import annotations

from pathlib import Path

import pytest
from logbroker_client import records as rec

from logbroker.cluster.raft_storage import (
    SLOT_BYTES,
    PartitionLogStorage,
    ReplicaState,
    ReplicaStateCorruptError,
    ReplicaStateFile,
    entries_to_batches,
)
from logbroker.raft.membership import Membership
from logbroker.raft.types import Entry, EntryKind
from logbroker.storage.config import LogConfig
from logbroker.storage.log import PartitionLog

MEMBERS = Membership.of([1, 2, 3])


def test_a_missing_state_file_means_a_fresh_replica(tmp_path: Path) -> None:
    state = ReplicaStateFile(tmp_path / "g.raftstate").load(MEMBERS)
    assert (state.term, state.vote, state.voters) == (0, None, (1, 2, 3))


def test_the_latest_save_wins(tmp_path: Path) -> None:
    f = ReplicaStateFile(tmp_path / "g.raftstate")
    for term in (1, 2, 3):
        f.save(ReplicaState(term=term, vote=2, voters=(1, 2, 3)))
    f.close()
    loaded = ReplicaStateFile(tmp_path / "g.raftstate").load(MEMBERS)
    assert (loaded.term, loaded.vote) == (3, 2)


def test_a_torn_save_falls_back_to_the_previous_state(tmp_path: Path) -> None:
    path = tmp_path / "g.raftstate"
    f = ReplicaStateFile(path)
    f.save(ReplicaState(term=4, vote=1, voters=(1, 2, 3)))   # slot 1
    f.save(ReplicaState(term=5, vote=3, voters=(1, 2, 3)))   # slot 0
    f.close()
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF  # damage the newer slot's body
    path.write_bytes(bytes(data))
    loaded = ReplicaStateFile(path).load(MEMBERS)
    assert (loaded.term, loaded.vote) == (4, 1)


def test_both_slots_damaged_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "g.raftstate"
    path.write_bytes(b"\x01" * (2 * SLOT_BYTES))
    with pytest.raises(ReplicaStateCorruptError, match="no valid Raft state"):
        ReplicaStateFile(path).load(MEMBERS)


def test_entries_round_trip_through_the_partition_log(tmp_path: Path) -> None:
    plog = PartitionLog.open(tmp_path / "t-0", LogConfig(), "t", 0)
    data = rec.build_batch([(1000, None, b"x", []), (1001, None, b"y", [])])
    entries = [
        Entry(0, 0, 1, EntryKind.NOOP),
        Entry(1, 2, 1, EntryKind.DATA, data),
        Entry(3, 3, 2, EntryKind.CONFIG, Membership.of([1, 2]).encode()),
    ]
    plog.append_replicated(entries_to_batches(entries, 5000), 5000)
    storage = PartitionLogStorage(plog, ReplicaState())
    back = storage.entries(0, 1 << 20)
    assert [(e.base_offset, e.last_offset, e.term, e.kind) for e in back] == [
        (e.base_offset, e.last_offset, e.term, e.kind) for e in entries]
    assert Membership.decode(back[2].payload) == Membership.of([1, 2])
    assert (storage.term_at(2), storage.term_at(3), storage.term_at(-1), storage.term_at(4)) == (1, 2, 0, None)
    plog.close()
