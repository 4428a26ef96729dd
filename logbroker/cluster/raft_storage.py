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
    value = entry.payload if entry.kind is EntryKind.CONFIG else None
    return rec.build_control_batch(entry.base_offset, entry.term, timestamp_ms, key, value)


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


class ReplicaStateCorruptError(RuntimeError):
    """Neither slot of a Raft state file holds a valid record."""


class ReplicaStateFile:
    """Term, vote and friends in two fixed slots, written in place: one fdatasync per save, no rename.

    Layout: two slots of SLOT_BYTES at offsets 0 and SLOT_BYTES, each `seq u64 | length u32 | crc32c u32 |
    JSON`. A save writes the older slot with the next sequence number; load takes the valid slot with the
    higher one. A write torn by a crash fails its CRC and the other slot (the previous state) wins, which
    is safe: nothing that depended on the torn save was sent, as the save had not returned.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()  # the flush thread and a closing broker may both save
        self._fd: int | None = None
        self._seq = 0

    def load(self, default_membership: Membership) -> ReplicaState:
        if not self.path.exists():
            return ReplicaState(voters=tuple(sorted(default_membership.voters)),
                                learners=tuple(sorted(default_membership.learners)))
        data = self.path.read_bytes()
        best: tuple[int, dict] | None = None  # type: ignore[type-arg]
        for slot in (0, 1):
            record = self._parse_slot(data[slot * SLOT_BYTES:(slot + 1) * SLOT_BYTES])
            if record is not None and (best is None or record[0] > best[0]):
                best = record
        if best is None:
            raise ReplicaStateCorruptError(
                f"{self.path}: no valid Raft state in either slot; restore the file or remove this replica's "
                "data so it rejoins empty from the leader")
        self._seq, doc = best
        doc["voters"] = tuple(doc["voters"])
        doc["learners"] = tuple(doc["learners"])
        return ReplicaState(**doc)

    @staticmethod
    def _parse_slot(slot: bytes) -> tuple[int, dict] | None:  # type: ignore[type-arg]
        if len(slot) < _SLOT_HEADER.size:
            return None
        seq, length, crc = _SLOT_HEADER.unpack_from(slot)
        body = slot[_SLOT_HEADER.size:_SLOT_HEADER.size + length]
        if seq == 0 or len(body) != length or rec.crc32c(body) != crc:
            return None
        return seq, json.loads(body)

    def save(self, state: ReplicaState) -> None:
        body = json.dumps(asdict(state)).encode()
        if len(body) > SLOT_BYTES - _SLOT_HEADER.size:
            raise ValueError(f"{self.path}: Raft state of {len(body)} bytes does not fit a slot")
        with self._lock:
            fd = self._open()
            self._seq += 1
            record = _SLOT_HEADER.pack(self._seq, len(body), rec.crc32c(body)) + body
            os.pwrite(fd, record, (self._seq % 2) * SLOT_BYTES)
            os.fdatasync(fd)

    def _open(self) -> int:
        if self._fd is None:
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if created:  # the file's existence must survive a crash too
                os.ftruncate(self._fd, 2 * SLOT_BYTES)
                os.fsync(self._fd)
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


SLOT_BYTES = 512
_SLOT_HEADER = struct.Struct(">QII")


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
