"""Share-group state on a data partition's replicas: written to the partition's own log, replayed by all.

Why the partition's own log: the state (which records are locked, acknowledged, how often delivered)
changes with the data and is used where the data is, on the partition's leader. Writing it as control
batches into the same Raft log orders it with the data, fences it with the same leadership (only the leader
can append), and gives every replica the state as it commits, so a new leader serves at once: no cross-
partition writes, no second coordinator. Consumers never see control batches.

Each control batch holds one JSON list of deltas (share.py). A leader applies its deltas when it
proposes them and answers once they are committed; followers replay them as they commit; a replica that
loses leadership, or whose log is reset, rebuilds from its log. To rebuild without reading the whole log,
every group's state is restated in full (a snapshot delta) now and then; the partition directory keeps the
offset of the oldest snapshot still needed (``share.checkpoint``), rebuilds scan from there, and
retention never deletes at or past it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from logbroker_client import records as rec

from logbroker.groups.share import (
    DELIVER_AT_HEADER,
    Acquired,
    InvalidRecordState,
    RecordState,
    ShareConfig,
    SharePartition,
)
from logbroker.raft.types import Entry, EntryKind

log = logging.getLogger("logbroker.share")

SHARE_CONTROL_KEY = struct.pack(">hh", 0, 102)
CHECKPOINT_FILE = "share.checkpoint"
T = TypeVar("T")
SNAPSHOT_EVERY_DELTAS = 1_000  # a group's state is restated after this many deltas...
SNAPSHOT_EVERY_MS = 60_000  # ...or this long after its last restatement, if it changed since
SCAN_READ_BYTES = 4 << 20
COMMIT_TIMEOUT_S = 15.0
MAX_DEAD_LETTERS_PER_ROUND = 500
DESCRIBE_SCAN_BYTES = 8 << 20


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class ShareReplica(Protocol):
    name: str
    high_watermark: int

    @property
    def is_leader(self) -> bool: ...

    def propose(self, payloads: Sequence[tuple[bytes, int]]) -> list[Entry]: ...

    def wait_committed(self, last_offset: int) -> asyncio.Future[None]: ...

    def read_committed(self, offset: int, max_bytes: int) -> bytes: ...

    def log_start(self) -> int: ...


DeadLetterSink = Callable[[str, int, list[tuple[int, RecordState, rec.Record]]], Awaitable[None]]


class ShareError(Exception):
    code = "INVALID_REQUEST"


class NotShareLeader(ShareError):
    code = "NOT_LEADER"


@dataclass
class AckOutcome:
    first_offset: int
    last_offset: int
    error: str = ""  # empty: applied


@dataclass
class FetchOutcome:
    records: bytes = b""
    acquired: list[Acquired] = field(default_factory=list)
    acks: list[AckOutcome] = field(default_factory=list)


def is_share_batch(payload: bytes | memoryview) -> bool:
    header = rec.read_header(payload)
    if not header.attributes & rec.CONTROL_FLAG:
        return False
    record = rec.decode_records(payload, 0, header)[0]
    return record.key == SHARE_CONTROL_KEY


def delivery_times(data: bytes) -> dict[int, int]:
    """offset -> delivery time of the records that carry one (the DELIVER_AT_HEADER header). Only batches
    that may hold the header are decoded: a plain batch is searched for its name at C speed first."""
    marker = DELIVER_AT_HEADER.encode()
    out: dict[int, int] = {}
    for pos, header in rec.iter_batch_headers(data):
        if header.is_control:
            continue
        compressed = header.attributes & rec.COMPRESSION_MASK != rec.COMPRESSION_NONE
        if not compressed and data.find(marker, pos, pos + header.size) < 0:
            continue
        for record in rec.decode_records(data, pos, header):
            for key, value in record.headers:
                if key == DELIVER_AT_HEADER and value:
                    with contextlib.suppress(ValueError):  # not a time: delivered at once
                        out[record.offset] = int(value)
    return out


def record_keys(data: bytes) -> dict[int, bytes | None]:
    """offset -> key of every data record in these batches (key-ordered share groups need them)."""
    return {record.offset: record.key for pos, header in rec.iter_batch_headers(data) if not header.is_control
            for record in rec.decode_records(data, pos, header)}


def share_batch(deltas: Sequence[dict[str, Any]], timestamp_ms: int) -> bytes:
    return rec.build_control_batch(0, -1, timestamp_ms, SHARE_CONTROL_KEY,
                                   json.dumps(list(deltas), separators=(",", ":")).encode())


class ShareStateMachine:
    """Every share group's state on one partition, on one replica (attached with Replica.attach)."""

    def __init__(self, replica: ShareReplica, directory: Path, topic: str, partition: int,
                 config_of: Callable[[str], ShareConfig]) -> None:
        self.replica = replica
        self.directory = directory
        self.topic, self.partition = topic, partition
        self.config_of = config_of
        self.groups: dict[str, SharePartition] = {}
        # Told when the partition gets its first share group, so the broker's periodic tick visits only
        # partitions that have one (thousands of partitions without any cost nothing per tick).
        self.on_group_added: Callable[[], None] | None = None
        self._snapshot_offsets: dict[str, int] = {}
        self._deltas_since_snapshot: dict[str, int] = {}
        self._snapshot_at_ms: dict[str, int] = {}
        self.applied_offset = -1
        self._leader = False
        self._checkpoint_written = -1
        if (directory / CHECKPOINT_FILE).exists():
            self._rebuild()

    # ====================================================================== state machine
    def apply(self, entries: Sequence[Entry]) -> None:
        for entry in entries:
            if entry.last_offset <= self.applied_offset:
                continue  # the leader applied its own deltas when it proposed them
            self.applied_offset = entry.last_offset
            if entry.kind is EntryKind.DATA and entry.payload and is_share_batch(entry.payload):
                self._replay_batch(entry.payload, entry.base_offset)

    def on_leader_change(self, is_leader: bool, term: int) -> None:
        was_leader, self._leader = self._leader, is_leader
        if was_leader and not is_leader and self.applied_offset >= self.replica.high_watermark:
            self._rebuild()  # it applied deltas that may never commit

    def on_log_reset(self, start_offset: int) -> None:
        self._rebuild()

    def _replay_batch(self, payload: bytes | memoryview, offset: int) -> None:
        header = rec.read_header(payload)
        record = rec.decode_records(payload, 0, header)[0]
        for delta in json.loads(record.value or b"[]"):
            self._replay(delta, offset)

    def _replay(self, delta: dict[str, Any], offset: int) -> None:
        group_id = delta["g"]
        state = self.groups.get(group_id)
        if state is None:
            start = delta.get("start", 0)
            state = self._add_group(group_id, start)
        state.replay(delta)
        self._count_delta(delta, offset)
        self._note_checkpoint()

    def _count_delta(self, delta: dict[str, Any], offset: int) -> None:
        """Where the group's last restatement is (retention keeps it) and how many deltas came since."""
        group_id = delta["g"]
        if delta.get("full"):
            self._snapshot_offsets[group_id] = offset
            self._deltas_since_snapshot[group_id] = 0
            self._snapshot_at_ms[group_id] = now_ms()
        else:
            self._deltas_since_snapshot[group_id] = self._deltas_since_snapshot.get(group_id, 0) + 1
            self._snapshot_offsets.setdefault(group_id, offset)
            self._snapshot_at_ms.setdefault(group_id, now_ms())

    def _rebuild(self) -> None:
        self.groups.clear()
        self._snapshot_offsets.clear()
        self._deltas_since_snapshot.clear()
        offset = max(self.replica.log_start(), self._read_checkpoint())
        end = self.replica.high_watermark
        while offset < end:
            data = self.replica.read_committed(offset, SCAN_READ_BYTES)
            if not data:
                break
            for pos, header in rec.iter_batch_headers(data):
                batch = data[pos:pos + header.size]
                if header.attributes & rec.CONTROL_FLAG and is_share_batch(batch):
                    self._replay_batch(batch, header.base_offset)
                offset = header.base_offset + header.last_offset_delta + 1
        self.applied_offset = max(self.applied_offset, end - 1) if self._leader else end - 1

    # ======================================================================== checkpoint
    def retain_from(self) -> int | None:
        """Retention must keep every offset from here: the oldest snapshot a rebuild needs, and the oldest
        record still parked in a delay index (its delivery time, and the record itself, are only in the log)."""
        needed = list(self._snapshot_offsets.values())
        needed += [first for state in self.groups.values() if (first := state.delays.first_offset()) is not None]
        return min(needed) if needed else None

    def _note_checkpoint(self) -> None:
        oldest = min(self._snapshot_offsets.values()) if self._snapshot_offsets else None
        if oldest is None or oldest == self._checkpoint_written:
            return
        first = self._checkpoint_written < 0
        path = self.directory / CHECKPOINT_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(str(oldest))
        if first:  # its existence is what tells a restart to rebuild: make it durable once
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        self._checkpoint_written = oldest

    def _read_checkpoint(self) -> int:
        try:
            return int((self.directory / CHECKPOINT_FILE).read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    # =========================================================================== serving
    def _require_leader(self) -> None:
        if not self.replica.is_leader:
            raise NotShareLeader(f"{self.replica.name}: this broker does not lead the partition now")

    def group(self, group_id: str, config: ShareConfig) -> SharePartition:
        state = self.groups.get(group_id)
        if state is None:
            start = self.replica.log_start() if config.start_at == "earliest" else self.replica.high_watermark
            state = self._add_group(group_id, start)
        return state

    def _add_group(self, group_id: str, start: int) -> SharePartition:
        state = self.groups[group_id] = SharePartition(group_id, start, start)
        if self.on_group_added is not None:
            self.on_group_added()
        return state

    async def fetch(self, group_id: str, member_id: str, acks: Sequence[Any], max_records: int) -> FetchOutcome:
        """Apply acks, then acquire up to max_records for the member; answer once both are committed."""
        self._require_leader()
        config = self.config_of(group_id)
        state = self.group(group_id, config)
        now = now_ms()
        outcome = FetchOutcome()
        deltas = self._acknowledge(state, member_id, acks, now, config, outcome)
        if max_records > 0:
            new_ranges, batches = self._read_new(state)
            keys = record_keys(batches) if batches and config.ordering == "key" else None
            acquired, delta = state.acquire(member_id, now, new_ranges, max_records, config,
                                            delivery_times(batches) if batches else None, self._delivery_times,
                                            keys, self._keys_between)
            # Passing control batches (its own share-state writes among them) changes nothing worth writing:
            # a new leader passes them again. Writing it would make an idle consumer grow the log forever.
            if delta["set"] or "park" in delta or "unpark" in delta:
                deltas.append(delta)
            outcome.acquired = acquired
            outcome.records = self._batches_for(acquired, batches)
        await self._write(deltas)
        return outcome

    async def acknowledge(self, group_id: str, member_id: str, acks: Sequence[Any]) -> list[AckOutcome]:
        self._require_leader()
        config = self.config_of(group_id)
        outcome = FetchOutcome()
        deltas = self._acknowledge(self.group(group_id, config), member_id, acks, now_ms(), config, outcome)
        await self._write(deltas)
        return outcome.acks

    @staticmethod
    def _acknowledge(state: SharePartition, member_id: str, acks: Sequence[Any], now: int, config: ShareConfig,
                     outcome: FetchOutcome) -> list[dict[str, Any]]:
        deltas = []
        for ack in acks:
            try:
                deltas.append(state.acknowledge(member_id, ack.first_offset, ack.last_offset, ack.kind, now, config,
                                                ack.delay_ms, ack.reason))
                outcome.acks.append(AckOutcome(ack.first_offset, ack.last_offset))
            except InvalidRecordState as exc:
                outcome.acks.append(AckOutcome(ack.first_offset, ack.last_offset, str(exc)))
        return deltas

    def _read_new(self, state: SharePartition) -> tuple[list[tuple[int, int, bool]], bytes]:
        """The batches from the group's cursor up to the high watermark: (first, last, is data) each."""
        if state.cursor >= self.replica.high_watermark:
            return [], b""
        data = self.replica.read_committed(state.cursor, 1 << 20)
        ranges = []
        for _, header in rec.iter_batch_headers(data):
            first = max(header.base_offset, state.cursor)
            ranges.append((first, header.base_offset + header.last_offset_delta, not header.is_control))
        return ranges, data

    def _delivery_times(self, first: int, last: int) -> list[tuple[int, int]]:
        """(offset, delivery time) of the records first..last that carry one: the delay index reads parked
        records' times back from the log rather than holding them all in memory."""
        return self._scan_log(first, last, delivery_times)

    def _keys_between(self, first: int, last: int) -> list[tuple[int, bytes | None]]:
        """(offset, key) of the data records first..last, in log order: a new leader's key-ordered window."""
        return self._scan_log(first, last, record_keys)

    def _scan_log(self, first: int, last: int, extract: Callable[[bytes], dict[int, T]]) -> list[tuple[int, T]]:
        out: list[tuple[int, T]] = []
        offset = first
        while offset <= last:
            data = self.replica.read_committed(offset, SCAN_READ_BYTES)
            if not data:
                break
            out.extend((o, value) for o, value in extract(data).items() if first <= o <= last)
            for _, header in rec.iter_batch_headers(data):
                offset = header.base_offset + header.last_offset_delta + 1
        return out

    def _batches_for(self, acquired: list[Acquired], fresh: bytes) -> bytes:
        """Whole batches holding every acquired record: the fresh read, plus reads for redeliveries."""
        if not acquired:
            return b""
        covered: list[tuple[int, int]] = [(h.base_offset, h.base_offset + h.last_offset_delta)
                                          for _, h in rec.iter_batch_headers(fresh)] if fresh else []
        parts = [fresh] if fresh else []
        for item in acquired:
            offset = item.first_offset
            while offset <= item.last_offset:
                span = next(((a, b) for a, b in covered if a <= offset <= b), None)
                if span is None:
                    data = self.replica.read_committed(offset, 1)
                    header = next(iter(rec.iter_batch_headers(data)))[1] if data else None
                    if header is None:
                        break
                    span = (header.base_offset, header.base_offset + header.last_offset_delta)
                    covered.append(span)
                    parts.append(data[:header.size])
                offset = span[1] + 1
        return b"".join(parts)

    async def _write(self, deltas: Sequence[dict[str, Any]]) -> None:
        if not deltas:
            return
        entries = self.replica.propose([(share_batch(deltas, now_ms()), 1)])
        entry = entries[-1]
        self.applied_offset = max(self.applied_offset, entry.last_offset)
        for delta in deltas:  # bookkeeping only: the states were changed when the deltas were made
            self._count_delta(delta, entry.base_offset)
        self._note_checkpoint()
        await asyncio.wait_for(self.replica.wait_committed(entry.last_offset), COMMIT_TIMEOUT_S)

    # ======================================================================= maintenance
    async def tick(self, dead_letter: DeadLetterSink) -> None:
        """On the leader: expire locks, hand archived records to the dead letters, restate old state."""
        if not self.replica.is_leader or not self.groups:
            return
        now = now_ms()
        deltas = []
        for group_id, state in self.groups.items():
            expired = state.expire(now, self.config_of(group_id))
            if expired is not None:
                deltas.append(expired)
        await self._write(deltas)
        for group_id, state in list(self.groups.items()):
            pending = state.pending_dead_letters()[:MAX_DEAD_LETTERS_PER_ROUND]
            if pending:
                await dead_letter(group_id, self.partition, self._with_records(pending))
                await self._write([state.dead_lettered_delta([offset for offset, _ in pending])])
        await self._write([state.snapshot() for group_id, state in self.groups.items() if self._stale(group_id, now)])

    def _stale(self, group_id: str, now: int) -> bool:
        changes = self._deltas_since_snapshot.get(group_id, 0)
        return changes >= SNAPSHOT_EVERY_DELTAS or (
            changes > 0 and now - self._snapshot_at_ms.get(group_id, now) >= SNAPSHOT_EVERY_MS)

    def _with_records(self, pending: list[tuple[int, RecordState]]) -> list[tuple[int, RecordState, rec.Record]]:
        out = []
        for offset, state in pending:
            data = self.replica.read_committed(offset, 1)
            for pos, header in rec.iter_batch_headers(data):
                for record in rec.decode_records(data, pos, header):
                    if record.offset == offset:
                        out.append((offset, state, record))
                break
        return out

    def next_due_ms(self, group_id: str) -> int | None:
        """When a delayed or backed-off record of the group may next become available here (a long-polling
        fetch wakes then, so a due record goes out on time)."""
        state = self.groups.get(group_id)
        return state.next_due_ms() if state is not None else None

    def describe(self, group_id: str) -> dict[str, Any] | None:
        """The queue as its users watch it: depth (available records, the unread log included), in flight,
        delayed, dead-lettered, and the age of the oldest available record."""
        state = self.groups.get(group_id)
        if state is None:
            return None
        now = now_ms()
        described = state.describe(now, state.cursor)
        unread, first_unread_ms = self._unread_records(state.cursor)
        described["available"] += unread
        ready = state.oldest_ready_offset(now)
        oldest_ms = self._timestamp_of(ready) if ready is not None else first_unread_ms
        described["oldest_available_age_ms"] = max(0, now - oldest_ms) if oldest_ms is not None else 0
        return described

    def _unread_records(self, cursor: int) -> tuple[int, int | None]:
        """Data records from cursor to the high watermark (headers of at most DESCRIBE_SCAN_BYTES are read;
        past that the offsets are counted as records), and the first one's timestamp."""
        end = self.replica.high_watermark
        if cursor >= end:
            return 0, None
        data = self.replica.read_committed(cursor, DESCRIBE_SCAN_BYTES)
        count, scanned_to, first_ms = 0, cursor, None
        for _, header in rec.iter_batch_headers(data):
            scanned_to = header.base_offset + header.last_offset_delta + 1
            if not header.is_control:
                count += scanned_to - max(header.base_offset, cursor)
                first_ms = header.base_timestamp if first_ms is None else first_ms
        return count + max(0, end - scanned_to), first_ms

    def _timestamp_of(self, offset: int) -> int | None:
        data = self.replica.read_committed(offset, 1)
        for _, header in rec.iter_batch_headers(data):
            return int(header.base_timestamp)
        return None
