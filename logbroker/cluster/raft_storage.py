"""The partition log as the Raft log, and the small state file that goes with it.

Entries map to batches one to one: a DATA entry is the producer's batch (stamped with its offsets and
the leader's term as partitionLeaderEpoch when persisted), a NOOP entry is a control batch, and a
CONFIG entry is a control batch whose one record carries the encoded membership. Consumers never see
control batches as records, so Raft's own entries stay invisible to them.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from logbroker_client import records as rec

from logbroker.raft.membership import Membership
from logbroker.raft.types import NO_TERM, Entry, EntryKind, HardState
from logbroker.storage.log import PartitionLog

# Control record keys: version i16, type i16. Kafka uses types 0 (abort) and 1 (commit).
CONTROL_KEY_NOOP = struct.pack(">hh", 0, 100)
CONTROL_KEY_CONFIG = struct.pack(">hh", 0, 101)
_CONTROL_KINDS = {CONTROL_KEY_NOOP: EntryKind.NOOP, CONTROL_KEY_CONFIG: EntryKind.CONFIG}


def entries_to_batches(entries: Sequence[Entry], timestamp_ms: int) -> bytearray:
    """The bytes to append for entries: their batches with offsets and epoch stamped, copied once."""
    out = bytearray()
    for entry in entries:
        pos = len(out)
        if entry.kind is EntryKind.DATA:
            out += entry.payload
            rec.stamp_batch(out, entry.base_offset, entry.term, pos)
        else:
            out += control_batch(entry, timestamp_ms)
    return out


def control_batch(entry: Entry, timestamp_ms: int) -> bytes:
    key = CONTROL_KEY_NOOP if entry.kind is EntryKind.NOOP else CONTROL_KEY_CONFIG
    builder = rec.BatchBuilder()
    builder.append(timestamp_ms, key, entry.payload if entry.kind is EntryKind.CONFIG else None)
    return builder.build(entry.base_offset, entry.term, attributes_extra=rec.CONTROL_FLAG)


def batch_to_entry(data: bytes | memoryview, pos: int, header: rec.BatchHeader) -> Entry:
    last = header.base_offset + header.last_offset_delta
    if not header.attributes & rec.CONTROL_FLAG:
        payload = bytes(data[pos:pos + header.batch_length + rec.LOG_OVERHEAD])
        return Entry(header.base_offset, last, header.leader_epoch, EntryKind.DATA, payload)
    record = rec.decode_records(data, pos, header)[0]
    kind = _CONTROL_KINDS.get(record.key or b"", EntryKind.NOOP)
    payload = (record.value or b"") if kind is EntryKind.CONFIG else b""
    return Entry(header.base_offset, last, header.leader_epoch, kind, payload)


@dataclass
class ReplicaState:
    """Persisted beside the log: Raft's term and vote, and what the log's start cannot say itself."""

    term: int = NO_TERM
    vote: int | None = None
    commit_offset: int = -1
    start_prev_term: int = NO_TERM  # term of the entry just before the log start (after a reset)
    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()

    @property
    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.commit_offset)

    @property
    def membership(self) -> Membership:
        return Membership.of(self.voters, self.learners)


class ReplicaStateFile:
    """Atomically replaced JSON (write, fsync, rename, fsync dir): a crash leaves old or new, never half."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()  # the flush thread and a closing broker may both save

    def load(self, default_membership: Membership) -> ReplicaState:
        if not self.path.exists():
            return ReplicaState(voters=tuple(sorted(default_membership.voters)),
                                learners=tuple(sorted(default_membership.learners)))
        doc = json.loads(self.path.read_text())
        doc["voters"] = tuple(doc["voters"])
        doc["learners"] = tuple(doc["learners"])
        return ReplicaState(**doc)

    def save(self, state: ReplicaState) -> None:
        with self._lock:
            self._save(state)

    def _save(self, state: ReplicaState) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


RECENT_ENTRIES = 128  # entries just appended, kept so that commit and replication need not read them back


class PartitionLogStorage:
    """logbroker.raft's LogStorage Protocol over a PartitionLog, with the newest entries kept in memory."""

    def __init__(self, plog: PartitionLog, state: ReplicaState) -> None:
        self.plog = plog
        self.state = state
        self._recent: dict[int, Entry] = {}  # base offset -> entry, oldest first

    def remember(self, entries: Sequence[Entry]) -> None:
        recent = self._recent
        for entry in entries:
            recent[entry.base_offset] = entry
        while len(recent) > RECENT_ENTRIES:
            del recent[next(iter(recent))]

    def forget_from(self, offset: int) -> None:
        """After a truncation or reset: entries at or past offset are gone from the log."""
        self._recent = {base: e for base, e in self._recent.items() if e.last_offset < offset}

    @property
    def first_offset(self) -> int:
        return self.plog.log_start_offset

    @property
    def last_offset(self) -> int:
        return self.plog.log_end_offset - 1

    def term_at(self, offset: int) -> int | None:
        start = self.plog.log_start_offset
        if offset == start - 1:
            return self.state.start_prev_term
        if start <= offset < self.plog.log_end_offset:
            return self.plog.epoch_at(offset)
        return None

    def entries(self, from_offset: int, max_bytes: int) -> Sequence[Entry]:
        if from_offset >= self.plog.log_end_offset:
            return []
        entry = self._recent.get(from_offset)
        if entry is not None:
            out = [entry]
            size = entry.size_bytes
            while (entry := self._recent.get(entry.last_offset + 1)) is not None:
                if size + entry.size_bytes > max_bytes:
                    break
                out.append(entry)
                size += entry.size_bytes
            return out
        data = self.plog.read(from_offset, max(max_bytes, 1))
        return [batch_to_entry(data, pos, header) for pos, header in rec.iter_batch_headers(data)]
