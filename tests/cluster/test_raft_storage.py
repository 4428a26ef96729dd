"""The Raft state file and the partition log as a Raft log."""

from __future__ import annotations

import gc
import json
import logging
import random
import struct
import tempfile
from dataclasses import asdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from logbroker_client import records as rec

from logbroker.cluster.raft_storage import (
    SLOT_BYTES,
    PartitionLogStorage,
    RecentEntries,
    ReplicaState,
    ReplicaStateCorruptError,
    ReplicaStateFile,
    entries_to_batches,
)
from logbroker.raft.membership import Membership
from logbroker.raft.types import Entry, EntryKind
from logbroker.storage.config import LogConfig
from logbroker.storage.log import PartitionLog
from tests.raft.runtime_sim.disk import SimDisk

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


def test_a_save_whose_fsync_failed_is_not_loaded_after_a_kill_and_the_next_save_keeps_the_good_slot() -> None:
    """Linux drops a write whose fsync failed from the disk but keeps showing it to reads: a process killed
    then must not come back in a term it never made durable (a power cut later would take it away)."""
    disk = SimDisk(random.Random(3), clock_ns=lambda: 0)
    path = Path("/sim/g.raftstate")
    disk.mkdir(path.parent)
    f = ReplicaStateFile(path, fs=disk)
    f.save(ReplicaState(term=4, vote=1, voters=(1, 2, 3)))
    disk.fsync_error_rate = 1.0
    with pytest.raises(OSError):
        f.save(ReplicaState(term=5, vote=3, voters=(1, 2, 3)))
    disk.kill()  # kill -9: the page cache stays
    disk.fsync_error_rate = 0.0
    restarted = ReplicaStateFile(path, fs=disk)
    loaded = restarted.load(MEMBERS)
    assert (loaded.term, loaded.vote) == (4, 1)
    restarted.save(ReplicaState(term=6, vote=2, voters=(1, 2, 3)))  # into the voided slot, not over term 4
    disk.power_cut()
    assert (ReplicaStateFile(path, fs=disk).load(MEMBERS).term) == 6
    data = disk.read_bytes(path)
    terms = sorted(json.loads(data[start + 20:start + 20 + struct.unpack_from(">I", data, start + 16)[0]])["term"]
                   for start in (0, SLOT_BYTES))
    assert terms == [4, 6]


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


def saved_states(path: Path, count: int) -> list[ReplicaState]:
    """count saves of distinct states; bodies differ in length, so slots keep stale bytes past their end."""
    states = [ReplicaState(term=i, vote=None if i % 3 == 0 else i % 3, commit_offset=10 * i - 1, voters=(1, 2, 3))
              for i in range(1, count + 1)]
    f = ReplicaStateFile(path)
    for state in states:
        f.save(state)
    f.close()
    return states


def flip(path: Path, position: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= mask
    path.write_bytes(bytes(data))


def written_bytes(state: ReplicaState) -> int:
    """How much of its slot a save of state writes: the 20-byte header and the JSON body."""
    return 20 + len(json.dumps(asdict(state)).encode())


@settings(max_examples=300, deadline=None)
@given(count=st.integers(2, 6), position=st.integers(0, 2 * SLOT_BYTES - 1), mask=st.integers(1, 255))
def test_one_damaged_byte_never_brings_back_an_older_or_unsaved_state(count: int, position: int, mask: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.raftstate"
        states = saved_states(path, count)
        flip(path, position, mask)
        newest_slot = count % 2  # save n goes to slot n % 2
        hit_newest = newest_slot * SLOT_BYTES <= position < newest_slot * SLOT_BYTES + written_bytes(states[-1])
        loaded = ReplicaStateFile(path).load(MEMBERS)
        assert loaded == (states[-2] if hit_newest else states[-1])


def test_a_damaged_sequence_number_in_the_older_slot_does_not_win(tmp_path: Path) -> None:
    path = tmp_path / "g.raftstate"
    states = saved_states(path, 4)  # save 4 in slot 0, save 3 in slot 1
    flip(path, SLOT_BYTES + 8, 0x80)  # slot 1's seq jumps by 2**63
    assert ReplicaStateFile(path).load(MEMBERS) == states[-1]


def test_a_damaged_slot_is_logged_with_the_file_the_slot_and_what_was_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "g.raftstate"
    saved_states(path, 3)  # save 3 (term 3) in slot 1, save 2 (term 2, vote 2) in slot 0
    flip(path, SLOT_BYTES + 30)
    with caplog.at_level(logging.WARNING, logger="logbroker.raft_storage"):
        loaded = ReplicaStateFile(path).load(MEMBERS)
    assert (loaded.term, loaded.vote) == (2, 2)
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert str(path) in message and "slot 1 is damaged (CRC mismatch" in message
    assert "using slot 0 instead (save 2: term 2, vote 2)" in message


def test_a_torn_first_save_means_a_fresh_replica(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "g.raftstate"
    saved_states(path, 1)  # slot 1 only; slot 0 was never written
    flip(path, SLOT_BYTES + 25)
    with caplog.at_level(logging.WARNING, logger="logbroker.raft_storage"):
        loaded = ReplicaStateFile(path).load(MEMBERS)
    assert (loaded.term, loaded.vote, loaded.voters) == (0, None, (1, 2, 3))
    assert "the first save was torn" in caplog.text


def test_a_file_in_the_first_layout_is_read_once_and_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "g.raftstate"
    old, new = ReplicaState(term=6, vote=1, voters=(1, 2, 3)), ReplicaState(term=7, vote=3, voters=(1, 2, 3))
    data = bytearray(2 * SLOT_BYTES)
    for seq, state in ((8, old), (9, new)):  # first layout: seq u64 | length u32 | crc32c(body) u32 | body
        body = json.dumps(asdict(state)).encode()
        slot = struct.pack(">QII", seq, len(body), rec.crc32c(body)) + body
        data[(seq % 2) * SLOT_BYTES:(seq % 2) * SLOT_BYTES + len(slot)] = slot
    path.write_bytes(bytes(data))
    f = ReplicaStateFile(path)
    assert f.load(MEMBERS) == new
    f.close()
    rewritten = path.read_bytes()
    assert rewritten[:4] == rewritten[SLOT_BYTES:SLOT_BYTES + 4] == b"LBR2"
    flip(path, 12, 0x80)  # either slot's seq damaged now loses, whichever it is
    assert ReplicaStateFile(path).load(MEMBERS) == new


def crc_covered(entry: Entry) -> tuple[int, bytes]:
    """An entry's offset and the part of its batch that stamping the offset and epoch leaves alone."""
    return entry.base_offset, entry.payload[rec.CRC_POSITION:]


def data_entries(first_offset: int, count: int, value_bytes: int, term: int = 1) -> list[Entry]:
    return [Entry(offset, offset, term, EntryKind.DATA, rec.build_batch([(1000, None, b"v" * value_bytes, [])]))
            for offset in range(first_offset, first_offset + count)]


def test_the_recent_entry_cache_holds_a_byte_budget_shared_by_every_partition(tmp_path: Path) -> None:
    entries = data_entries(0, 40, value_bytes=10_000)
    budget = 10 * RecentEntries.cost_bytes(entries[0])
    cache = RecentEntries(budget)
    storages = []
    for partition in range(2):
        plog = PartitionLog.open(tmp_path / f"t-{partition}", LogConfig(), "t", partition)
        plog.append_replicated(entries_to_batches(entries, 5000), 5000)
        storages.append(PartitionLogStorage(plog, ReplicaState(), cache))
    for storage in storages:
        storage.remember(entries)
        assert cache.size_bytes <= budget
    for storage in storages:  # evicted or cached, every entry still reads back whole, from the log if need be
        back = storage.entries(0, 1 << 30)
        assert [crc_covered(e) for e in back] == [crc_covered(e) for e in entries]
        storage.plog.close()


def test_an_entry_larger_than_the_whole_cache_is_not_cached(tmp_path: Path) -> None:
    cache = RecentEntries(max_bytes=1000)
    plog = PartitionLog.open(tmp_path / "t-0", LogConfig(), "t", 0)
    storage = PartitionLogStorage(plog, ReplicaState(), cache)
    storage.remember(data_entries(0, 1, value_bytes=5000))
    assert cache.size_bytes == 0
    plog.close()


def test_a_truncation_drops_the_cut_entries_from_the_cache(tmp_path: Path) -> None:
    old = data_entries(0, 4, value_bytes=100, term=1)
    new = data_entries(2, 1, value_bytes=200, term=2)
    cache = RecentEntries()
    plog = PartitionLog.open(tmp_path / "t-0", LogConfig(), "t", 0)
    plog.append_replicated(entries_to_batches(old, 5000), 5000)
    storage = PartitionLogStorage(plog, ReplicaState(), cache)
    storage.remember(old)
    plog.truncate_to(2)
    storage.forget_from(2)
    plog.append_replicated(entries_to_batches(new, 5000), 5000)
    storage.remember(new)
    assert [(e.base_offset, e.term) for e in storage.entries(0, 1 << 20)] == [(0, 1), (1, 1), (2, 2)]
    plog.close()


def test_cached_entries_are_nothing_the_cyclic_garbage_collector_has_to_scan(tmp_path: Path) -> None:
    """A busy broker caches tens of thousands of small entries; as objects the collector tracks, they were what its
    full passes spent their time on (pauses of the event loop). Cached, they hold ints and bytes only."""
    entries = data_entries(0, 200, value_bytes=100)
    cache = RecentEntries()
    plog = PartitionLog.open(tmp_path / "t-0", LogConfig(), "t", 0)
    plog.append_replicated(entries_to_batches(entries, 5000), 5000)
    storage = PartitionLogStorage(plog, ReplicaState(), cache)
    storage.remember(entries)
    # A broker started in this process (an earlier test's) calls gc.freeze() once it has loaded, which moves every
    # object then alive, these entries too if it runs meanwhile, where no collection untracks them: let it see them.
    gc.unfreeze()
    gc.collect()
    held = [*storage._recent.values(), *cache._order]
    assert len(held) == 2 * len(entries)
    assert not any(gc.is_tracked(item) for item in held)
    assert [crc_covered(e) for e in storage.entries(0, 1 << 30)] == [crc_covered(e) for e in entries]
    plog.close()
