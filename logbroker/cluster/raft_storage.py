"""The partition log as the Raft log, and the small state file that goes with it.

Entries map to batches one to one: a DATA entry is the producer's batch (stamped with its offsets and
the leader's term as partitionLeaderEpoch when persisted), a NOOP entry is a control batch, and a
CONFIG entry is a control batch whose one record carries the encoded membership. Consumers never see
control batches as records, so Raft's own entries stay invisible to them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import struct
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple, Protocol

from logbroker_client import records as rec

from logbroker.raft.membership import Membership
from logbroker.raft.types import NO_TERM, Entry, EntryKind, HardState
from logbroker.storage.files import OS_FILES, FileSystem
from logbroker.storage.log import PartitionLog

# Control record keys: version i16, type i16. Kafka uses types 0 (abort) and 1 (commit).
CONTROL_KEY_NOOP = struct.pack(">hh", 0, 100)
CONTROL_KEY_CONFIG = struct.pack(">hh", 0, 101)
_CONTROL_KINDS = {CONTROL_KEY_NOOP: EntryKind.NOOP, CONTROL_KEY_CONFIG: EntryKind.CONFIG}

logger = logging.getLogger("logbroker.raft_storage")


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
    kind = _CONTROL_KINDS.get(record.key or b"")
    if kind is None:
        # A control batch of a state machine (share-group state): opaque to Raft, shipped whole like data.
        payload = bytes(data[pos:pos + header.batch_length + rec.LOG_OVERHEAD])
        return Entry(header.base_offset, last, header.leader_epoch, EntryKind.DATA, payload)
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
    # Where the log starts once the reset or prefix cut this state describes is done; -1: never cut. Saved
    # before the log is changed, so a crash in between is finished at the next open, never half done.
    log_start_offset: int = -1
    catching_up: bool = False  # RaftNode.wait_to_catch_up: a replica that lost its state and has not caught up

    @property
    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.commit_offset, self.catching_up)

    @property
    def membership(self) -> Membership:
        return Membership.of(self.voters, self.learners)


class StateFile(Protocol):
    """What a Replica needs of where its Raft state is kept: ReplicaStateFile (a file of its own) or
    state_log.GroupStateFile (its records in the broker's one state log)."""

    last_saved: ReplicaState | None

    def load(self, default_membership: Membership) -> ReplicaState: ...

    def save(self, state: ReplicaState) -> None: ...

    def close(self) -> None: ...


class ReplicaStateCorruptError(RuntimeError):
    """Neither slot of a Raft state file holds a valid record."""


class ReplicaStateFile:
    """Term, vote and friends in two fixed slots, written in place: one fdatasync per save, no rename.

    Layout: two slots of SLOT_BYTES at offsets 0 and SLOT_BYTES, each
        magic "LBR2" | crc32c u32 | seq u64 | length u32 | JSON body of length bytes | stale bytes
    The CRC covers seq, length and body: a damaged byte anywhere in them fails the slot, so damage can
    neither make a slot look newer than it is nor cut its body short. A save writes the older slot with
    the next seq and fdatasyncs; load takes the valid slot with the higher seq. A save torn by a crash
    fails its check and the other slot (the previous state) wins, which is safe: nothing that depended on
    the torn save was sent, as the save had not returned. Load logs a WARNING for every failed slot.

    The first layout was `seq u64 | length u32 | crc32c u32 | JSON`, its CRC over the body alone, so a
    damaged seq in the older slot could win and bring back an old term and vote. Its slots begin with the
    high half of a u64 seq, zero in any real file, which the magic can never be. Such a file is still
    read, with the old rule, which cannot be made safe after the fact, so load rewrites both of its slots
    in this layout at once: the old rule decides once, at the first start after an upgrade, and never
    again. A valid slot in this layout beats one in the old layout, because it was written after that one
    was read.
    """

    def __init__(self, path: Path, fs: FileSystem = OS_FILES) -> None:
        self.path = path
        self.fs = fs
        self._lock = threading.Lock()  # the flush thread and a closing broker may both save
        self._fd: int | None = None
        self._seq = 0
        self.last_saved: ReplicaState | None = None  # what the file holds, so an unchanged state is not saved again

    def load(self, default_membership: Membership) -> ReplicaState:
        state = self._load(default_membership)
        self.last_saved = replace(state)
        return state

    def _load(self, default_membership: Membership) -> ReplicaState:
        fresh = ReplicaState(voters=tuple(sorted(default_membership.voters)),
                             learners=tuple(sorted(default_membership.learners)))
        if not self.fs.exists(self.path):
            return fresh
        slots, problems = _read_slots(self.fs.read_bytes(self.path))
        best = max((slot for slot in slots if slot is not None), key=lambda s: (s.layout, s.seq), default=None)
        if best is None:
            return self._first_save_torn(fresh, problems)
        for index, problem in problems.items():
            logger.warning(
                "%s: Raft state slot %d is damaged (%s); using slot %d instead (save %d: term %d, vote %s). If "
                "the damaged slot held the newest save, a crash tore it before it returned, so nothing sent "
                "depended on it", self.path, index, problem, 1 - index, best.seq, best.state.term, best.state.vote)
        self._seq = best.seq
        if best.layout == _OLD_LAYOUT:
            self._rewrite_in_new_layout(best.state)
        return best.state

    def _first_save_torn(self, fresh: ReplicaState, problems: dict[int, str]) -> ReplicaState:
        """No valid slot. Save 1 goes to slot 1 and save 2 to slot 0, so an unwritten slot 0 means no save
        ever completed: the state is the fresh one. Anything else is damage this file cannot undo."""
        if 0 in problems:
            raise ReplicaStateCorruptError(
                f"{self.path}: no valid Raft state in either slot ({_describe(problems)}); restore the file or "
                "remove this replica's data so it rejoins empty from the leader")
        if problems:
            logger.warning("%s: Raft state slot 1 is damaged (%s) and slot 0 was never written: the first save "
                           "was torn by a crash, so the replica starts from its initial state", self.path, problems[1])
        return fresh

    def _rewrite_in_new_layout(self, state: ReplicaState) -> None:
        # Two saves fill both slots; a crash in between leaves one new slot, which beats the old one.
        self.save(state)
        self.save(state)
        logger.info("%s: Raft state rewritten in the current slot layout (CRC over seq and length)", self.path)

    def save(self, state: ReplicaState) -> None:
        body = json.dumps(asdict(state)).encode()
        if len(body) > SLOT_BYTES - _HEADER_BYTES:
            raise ValueError(f"{self.path}: Raft state of {len(body)} bytes does not fit a slot")
        with self._lock:
            fd = self._open()
            self._seq += 1
            slot = _encode_slot(self._seq, body)
            slot_at = (self._seq % 2) * SLOT_BYTES
            self.fs.pwrite(fd, slot, slot_at)
            try:
                self.fs.fdatasync(fd)
            except OSError:
                self._void_unsynced_slot(fd, slot, slot_at)
                raise
            self.last_saved = replace(state)

    def _void_unsynced_slot(self, fd: int, slot: bytes, slot_at: int) -> None:
        """The fdatasync after writing a slot failed: Linux may have dropped the write from the disk while
        reads still show it, so a process killed now would load that state after a restart, speak in its term,
        and lose it to a power cut later. Break the slot's CRC in the page cache (no fsync: the disk is
        failing) so a load takes the other slot, the last state known durable; the next save rewrites this
        slot, never the good one."""
        self._seq -= 1
        crc_at = slot_at + len(SLOT_MAGIC)
        broken_crc = bytes(b ^ 0xFF for b in slot[len(SLOT_MAGIC):len(SLOT_MAGIC) + _CRC.size])
        try:
            self.fs.pwrite(fd, broken_crc, crc_at)
        except OSError as exc:
            logger.warning("%s: could not void a Raft state slot whose fsync failed (%s); a restart before the next "
                        "save may read a state that is not on the disk", self.path, exc)

    def _open(self) -> int:
        if self._fd is None:
            fs = self.fs
            created = not fs.exists(self.path)
            self._fd = fs.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if created:  # the file's existence must survive a crash too
                try:
                    fs.ftruncate(self._fd, 2 * SLOT_BYTES)
                    fs.fsync(self._fd)
                    fs.fsync_dir(self.path.parent)
                except OSError:
                    # Gone again, so the next save creates it anew and fsyncs its directory then; kept, it would
                    # exist in the page cache only and no later save would make its name durable.
                    fs.close(self._fd)
                    self._fd = None
                    with contextlib.suppress(OSError):
                        fs.unlink(self.path)
                    raise
        return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                self.fs.close(self._fd)
                self._fd = None


SLOT_BYTES = 512
SLOT_MAGIC = b"LBR2"
_CRC = struct.Struct(">I")
_SEQ_AND_LENGTH = struct.Struct(">QI")
_HEADER_BYTES = len(SLOT_MAGIC) + _CRC.size + _SEQ_AND_LENGTH.size  # 20
_OLD_HEADER = struct.Struct(">QII")  # the first layout: seq, length, crc32c of the body
_OLD_LAYOUT, _NEW_LAYOUT = 1, 2


class _Slot(NamedTuple):
    seq: int
    state: ReplicaState
    layout: int


class _DamagedSlotError(Exception):
    """A slot that was written but fails its check: a torn save, or damage on disk."""


def _encode_slot(seq: int, body: bytes) -> bytes:
    covered = _SEQ_AND_LENGTH.pack(seq, len(body)) + body
    return SLOT_MAGIC + _CRC.pack(rec.crc32c(covered)) + covered


def _read_slots(data: bytes) -> tuple[list[_Slot | None], dict[int, str]]:
    """Both slots (None where never written or damaged), and why each damaged one failed."""
    slots: list[_Slot | None] = []
    problems: dict[int, str] = {}
    for index in (0, 1):
        try:
            slots.append(_parse_slot(data[index * SLOT_BYTES:(index + 1) * SLOT_BYTES]))
        except _DamagedSlotError as exc:
            slots.append(None)
            problems[index] = str(exc)
    return slots, problems


def _parse_slot(raw: bytes) -> _Slot | None:
    """The slot's record; None for a slot never written (all zeros); _DamagedSlotError for anything else."""
    if not raw.strip(b"\0"):
        return None
    if len(raw) < _HEADER_BYTES:
        raise _DamagedSlotError(f"only {len(raw)} bytes: the file is cut short")
    if raw.startswith(SLOT_MAGIC):
        return _parse_new_slot(raw)
    if raw.startswith(b"\0\0\0\0"):
        return _parse_old_slot(raw)
    raise _DamagedSlotError(f"unknown slot header {raw[:4].hex()}")


def _parse_new_slot(raw: bytes) -> _Slot:
    covered_start = len(SLOT_MAGIC) + _CRC.size
    (crc,) = _CRC.unpack_from(raw, len(SLOT_MAGIC))
    seq, length = _SEQ_AND_LENGTH.unpack_from(raw, covered_start)
    if length > SLOT_BYTES - _HEADER_BYTES:
        raise _DamagedSlotError(f"length {length} does not fit the slot")  # and the CRC would fail too
    covered = raw[covered_start:_HEADER_BYTES + length]
    if len(covered) != _SEQ_AND_LENGTH.size + length or rec.crc32c(covered) != crc:
        raise _DamagedSlotError("CRC mismatch over seq, length and body")
    return _Slot(seq, _decode_state(covered[_SEQ_AND_LENGTH.size:]), _NEW_LAYOUT)


def _parse_old_slot(raw: bytes) -> _Slot:
    seq, length, crc = _OLD_HEADER.unpack_from(raw)
    body = raw[_OLD_HEADER.size:_OLD_HEADER.size + length]
    if seq == 0 or len(body) != length or rec.crc32c(body) != crc:
        raise _DamagedSlotError("CRC mismatch over the body (first slot layout)")
    return _Slot(seq, _decode_state(body), _OLD_LAYOUT)


def _decode_state(body: bytes) -> ReplicaState:
    try:
        doc = json.loads(body)
        doc["voters"] = tuple(doc["voters"])
        doc["learners"] = tuple(doc["learners"])
        return ReplicaState(**doc)
    except (ValueError, KeyError, TypeError) as exc:  # a valid CRC over bytes this code never wrote
        raise _DamagedSlotError(f"body is not a Raft state: {exc}") from None


def _describe(problems: dict[int, str]) -> str:
    return "; ".join(f"slot {index}: {problem}" for index, problem in problems.items())


DEFAULT_RAFT_ENTRY_CACHE_BYTES = 16 << 20
# What one cached entry costs beyond its payload: the Entry, the bytes object's header, a dict slot and
# a queue slot. Counting it keeps a flood of tiny entries within the budget too.
CACHED_ENTRY_OVERHEAD_BYTES = 256


# A cached entry: (last offset, term, kind's index in _KINDS, payload). Ints and bytes only, so the cyclic garbage
# collector stops tracking it after its first pass. Cached as Entry objects, the tens of thousands a broker keeps
# (16 MiB of lone records) were most of what the collector's full passes scanned: 15 ms pauses of the event loop
# every few seconds under a steady load of small writes (65 ms with the startup objects not yet frozen).
CachedEntry = tuple[int, int, int, bytes]
_KINDS: tuple[EntryKind, ...] = tuple(EntryKind)
_KIND_INDEX: dict[EntryKind, int] = {kind: index for index, kind in enumerate(_KINDS)}


class RecentEntries:
    """Entries just appended by the leaders of a broker, within one byte budget; the oldest go first.

    Replication mostly asks a leader for what it appended moments ago, and the cache saves reading and
    parsing it back. The budget is the broker's, not each partition's, so memory stays bounded by this
    setting however many partitions are written and however large their batches: a miss costs only a read
    from the log (the page cache, as a rule).
    """

    def __init__(self, max_bytes: int = DEFAULT_RAFT_ENTRY_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.size_bytes = 0
        # (the partition's index id, base offset, cached entry), oldest first; an entry its partition forgot stays
        # counted here until it ages out, so size_bytes never under-counts what is held. Ints and an untracked
        # tuple: the queue holds nothing the garbage collector must follow.
        self._order: deque[tuple[int, int, CachedEntry]] = deque()
        self._indexes: dict[int, dict[int, CachedEntry]] = {}  # index id -> a partition's base offset -> entry
        self._index_ids = itertools.count()

    def new_index(self) -> tuple[int, dict[int, CachedEntry]]:
        """A partition's own index of its cached entries (base offset -> entry), and the id it is known by here."""
        return next(self._index_ids), {}

    @staticmethod
    def cost_bytes(entry: Entry) -> int:
        return len(entry.payload) + CACHED_ENTRY_OVERHEAD_BYTES

    def add(self, index_id: int, index: dict[int, CachedEntry], entry: Entry) -> None:
        cost = self.cost_bytes(entry)
        if cost > self.max_bytes:
            return
        cached = (entry.last_offset, entry.term, _KIND_INDEX[entry.kind], entry.payload)
        index[entry.base_offset] = cached
        self._indexes[index_id] = index  # again after its last entry aged out (_evict_oldest)
        self._order.append((index_id, entry.base_offset, cached))
        self.size_bytes += cost
        while self.size_bytes > self.max_bytes:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        index_id, base_offset, cached = self._order.popleft()
        self.size_bytes -= len(cached[3]) + CACHED_ENTRY_OVERHEAD_BYTES
        index = self._indexes.get(index_id)
        if index is None:
            return
        if index.get(base_offset) is cached:  # not a newer entry at that offset after a truncation
            del index[base_offset]
        if not index:
            del self._indexes[index_id]  # a closed partition's index is not kept for ever


def cached_entry(base_offset: int, cached: CachedEntry) -> Entry:
    return Entry(base_offset, cached[0], cached[1], _KINDS[cached[2]], cached[3])


class PartitionLogStorage:
    """logbroker.raft's LogStorage Protocol over a PartitionLog, with the newest entries kept in memory."""

    def __init__(self, plog: PartitionLog, state: ReplicaState, cache: RecentEntries | None = None) -> None:
        self.plog = plog
        self.state = state
        self._cache = cache if cache is not None else RecentEntries()
        # base offset -> cached entry; the cache evicts from it
        self._recent_id, self._recent = self._cache.new_index()

    def remember(self, entries: Sequence[Entry]) -> None:
        for entry in entries:
            self._cache.add(self._recent_id, self._recent, entry)

    def forget_from(self, offset: int) -> None:
        """After a truncation or reset: entries at or past offset are gone from the log."""
        recent = self._recent  # edited in place: the cache holds a reference to this very dict
        for base in [base for base, cached in recent.items() if cached[0] >= offset]:
            del recent[base]

    @property
    def first_offset(self) -> int:
        return self.plog.log_start_offset

    @property
    def last_offset(self) -> int:
        return self.plog.log_end_offset - 1

    def term_at(self, offset: int) -> int | None:
        start = self.plog.log_start_offset
        if offset == start - 1:
            if self.state.log_start_offset not in (-1, start):
                return None  # the saved term belongs to another log start: unknown, so never matched
            return self.state.start_prev_term
        if start <= offset < self.plog.log_end_offset:
            return self.plog.epoch_at(offset)
        return None

    def entries(self, from_offset: int, max_bytes: int) -> Sequence[Entry]:
        if from_offset >= self.plog.log_end_offset:
            return []
        recent = self._recent
        cached = recent.get(from_offset)
        if cached is not None:
            entry = cached_entry(from_offset, cached)
            out = [entry]
            size = entry.size_bytes
            while (cached := recent.get(entry.last_offset + 1)) is not None:
                entry = cached_entry(entry.last_offset + 1, cached)
                if size + entry.size_bytes > max_bytes:
                    break
                out.append(entry)
                size += entry.size_bytes
            return out
        data = self.plog.read(from_offset, max(max_bytes, 1))
        return [batch_to_entry(data, pos, header) for pos, header in rec.iter_batch_headers(data)]


def check_outgoing(name: str, entries: Sequence[Entry]) -> None:
    """Raise DamagedLogError for a DATA entry whose batch fails its CRC (checked in C, once per batch): a
    damaged batch must not be sent on, for its followers would refuse it forever."""
    for entry in entries:
        if entry.kind is EntryKind.DATA:
            try:
                rec.validate_batch(entry.payload)
            except rec.CorruptBatchError as exc:
                raise DamagedLogError(name, entry.base_offset, str(exc)) from None


class DamagedLogError(Exception):
    """A batch read back from this replica's log fails its check: the log from there is lost here."""

    def __init__(self, name: str, offset: int, why: str) -> None:
        super().__init__(f"{name}: the batch at offset {offset} is damaged on disk ({why}); this replica's log "
                         "is cut there and the rest fetched again from the other replicas")
        self.offset = offset
