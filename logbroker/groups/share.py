"""Share groups: the state of one share group on one partition (KIP-932's share-partition), a pure machine.

Any number of members take records from the same partition. For each record past the group's start
offset the state is one of:

    available  ready to be delivered (a released record waits until its backoff has passed)
    acquired   delivered to one member, locked until a deadline; that member may ack, release, reject, renew
    acked      done: never delivered again
    archived   given up (delivery limit reached, or rejected): handed to the dead-letter topic

and a delivery count, raised at each acquisition. Offsets below ``start`` are all done; offsets at or past
``cursor`` have never been read from the log (available, delivered 0 times). Only records with a state of
their own are kept, so memory follows the in-flight window (bounded by MAX_WINDOW_RECORDS), not the log.

Changes are returned as a delta (a small JSON document) that the runtime writes to the partition's own
log before using them, and every replica replays deltas in log order (``replay``): the leader holds the
same state as any replica that could replace it. A record acquired when the leader fails is therefore
still locked on the new leader, and comes back when its lock would have expired.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

AVAILABLE = "a"
ACQUIRED = "q"
ACKED = "k"
ARCHIVED = "x"
DEAD_LETTER_PENDING = "d"  # archived, its copy to the dead-letter topic not yet confirmed
PARKED = "p"  # sent with a delivery time still ahead: out of the window, in the delay index until due
DELIVER_AT_HEADER = "lb.deliver.at.ms"  # a record header a producer sets (send(..., deliver_at_ms=...))

DEFAULT_LOCK_MS = 30_000
DEFAULT_DELIVERY_LIMIT = 5
DEFAULT_BACKOFF_MS = 1_000
DEFAULT_BACKOFF_MAX_MS = 60_000
MAX_WINDOW_RECORDS = 20_000  # records past start the group may have read from the log and not finished
MAX_LOCK_MS = 12 * 3_600_000
MAX_DELAY_MS = 7 * 24 * 3_600_000


@dataclass(frozen=True)
class ShareConfig:
    lock_ms: int = DEFAULT_LOCK_MS
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    backoff: str = "exponential"  # or "fixed"
    backoff_ms: int = DEFAULT_BACKOFF_MS
    backoff_max_ms: int = DEFAULT_BACKOFF_MAX_MS
    start_at: str = "earliest"  # where a new group starts: a queue's jobs sent before the first worker count
    dlq_topic: str = ""  # "" means "<topic>.dlq"

    def backoff_after(self, delivery_count: int) -> int:
        """How long a released or expired record waits before it is available again (BullMQ's policy)."""
        if self.backoff == "fixed":
            return self.backoff_ms
        return min(self.backoff_max_ms, self.backoff_ms * (2 ** max(0, delivery_count - 1)))


@dataclass(slots=True)
class RecordState:
    state: str
    count: int
    member: str = ""
    deadline_ms: int = 0  # acquired: lock deadline; available: not before; archived: the reason's time
    reason: str = ""
    dlq_seq: int = -1  # dead-letter pending: its place in the order dead-letter copies are written


@dataclass(frozen=True)
class Acquired:
    first_offset: int
    last_offset: int
    delivery_count: int
    lock_deadline_ms: int


class InvalidRecordState(Exception):
    """An acknowledgement for records the member does not hold (never acquired, or its lock expired)."""


@dataclass
class SharePartition:
    group_id: str
    start: int
    cursor: int
    records: dict[int, RecordState] = field(default_factory=dict)
    dead_lettered: int = 0
    dlq_next_seq: int = 0  # the sequence number the next dead letter gets (see _to_dead_letters)
    # The delay index: offset -> delivery time of records read past while not yet due. The window moves
    # on past them (a day-long delay must not hold back everything behind it); when due, a record comes
    # back into play below start.
    parked: dict[int, int] = field(default_factory=dict)
    _parked_heap: list[tuple[int, int]] = field(default_factory=list)  # (due, offset)
    # Indexes, rebuilt from ``records``: not persisted.
    _ready: list[int] = field(default_factory=list)  # heap of offsets available now (released, expired)
    _waiting: list[tuple[int, int]] = field(default_factory=list)  # heap of (available at, offset)
    _locks: list[tuple[int, int]] = field(default_factory=list)  # heap of (lock deadline, offset)

    # =========================================================================== replay
    def replay(self, delta: dict[str, Any]) -> None:
        """Apply a delta written by ``acquire``, ``acknowledge``, ``expire`` or ``snapshot``."""
        if delta.get("full"):
            self.records.clear()
            self.parked.clear()
            for index in (self._ready, self._waiting, self._locks, self._parked_heap):
                index.clear()
            self.dead_lettered = delta.get("dlq", 0)
            self.dlq_next_seq = delta.get("dlq_seq", 0)
            self.start = self.cursor = delta["start"]
        for offset, due_ms in delta.get("park", ()):
            self.parked[offset] = due_ms
            heapq.heappush(self._parked_heap, (due_ms, offset))
        for offset in delta.get("unpark", ()):
            self.parked.pop(offset, None)
        for row in delta.get("set", ()):
            first, last, state, count, member, deadline_ms, reason = row[:7]
            dlq_seq = row[7] if len(row) > 7 else -1
            self.dlq_next_seq = max(self.dlq_next_seq, dlq_seq + 1)
            for offset in range(first, last + 1):
                self._set(offset, RecordState(state, count, member, deadline_ms, reason, dlq_seq))
        self.dead_lettered += delta.get("dlq_done", 0)
        self.cursor = max(self.cursor, delta.get("cursor", self.cursor))
        self._advance(delta.get("start", self.start))

    def _set(self, offset: int, record: RecordState) -> None:
        if offset < self.start and record.state in (ACKED, ARCHIVED):
            # Only a record that came out of the delay index is in play below start; once done, it goes.
            self.records.pop(offset, None)
            return
        self.records[offset] = record
        if record.state == ACQUIRED:
            heapq.heappush(self._locks, (record.deadline_ms, offset))
        elif record.state == AVAILABLE:
            heapq.heappush(self._waiting, (record.deadline_ms, offset))

    def _advance(self, start: int) -> None:
        """Move start to ``start`` (a snapshot's) and then past every finished record."""
        if start > self.start:
            self.start = start
            for offset in [o for o in self.records if o < start]:
                del self.records[offset]
        self.cursor = max(self.cursor, self.start)
        while self.start < self.cursor:
            record = self.records.get(self.start)
            # No state of its own: a control batch's offset (every data record read into the window has one)
            # or a record in the delay index; either way done as far as the window is concerned.
            if record is not None and record.state not in (ACKED, ARCHIVED):
                break
            self.records.pop(self.start, None)
            self.start += 1

    # ========================================================================== acquire
    def acquire(self, member_id: str, now_ms: int, new_ranges: Sequence[tuple[int, int, bool]], max_records: int,
                config: ShareConfig, deliver_at: dict[int, int] | None = None) -> tuple[list[Acquired], dict[str, Any]]:
        """Give member_id up to max_records: due delayed records and redeliveries first, then records never
        delivered. new_ranges are the log's next batches from ``cursor``: (first, last, is_data); control
        batches are done at once; deliver_at gives the delivery time of new records that carry one, and
        those not yet due go to the delay index. Returns the acquired ranges and the delta to write."""
        self._refresh(now_ms)
        deadline_ms = now_ms + config.lock_ms
        changes: list[list[Any]] = []
        taken: list[tuple[int, int]] = []  # (offset, delivery count)
        unparked: list[int] = []
        parked: list[list[int]] = []
        while self._parked_heap and self._parked_heap[0][0] <= now_ms and len(taken) < max_records:
            _, offset = heapq.heappop(self._parked_heap)
            if offset in self.parked:
                unparked.append(offset)
                taken.append((offset, 1))
        while self._ready and len(taken) < max_records:
            offset = heapq.heappop(self._ready)
            record = self.records.get(offset)
            if record is None or record.state != AVAILABLE or record.deadline_ms > now_ms:
                continue
            taken.append((offset, record.count + 1))
        cursor = self.cursor
        for first, last, is_data in new_ranges:
            if first != cursor or len(taken) >= max_records or cursor - self.start >= MAX_WINDOW_RECORDS:
                break
            if not is_data:
                cursor = last + 1  # a control batch (a no-op, share state): nothing to deliver, nothing to write
                continue
            end = min(last, first + max_records - len(taken) - 1)
            for offset in range(first, end + 1):
                due_ms = deliver_at.get(offset, 0) if deliver_at else 0
                if due_ms > now_ms:
                    parked.append([offset, due_ms])
                else:
                    taken.append((offset, 1))
            cursor = end + 1
        for offset, count in taken:
            changes.append([offset, offset, ACQUIRED, count, member_id, deadline_ms, ""])
        delta: dict[str, Any] = {"g": self.group_id, "set": _coalesce(changes), "cursor": cursor, "start": self.start}
        if parked:
            delta["park"] = parked
        if unparked:
            delta["unpark"] = unparked
        self.replay(delta)
        return _ranges(taken, deadline_ms), delta

    # ====================================================================== acknowledge
    def acknowledge(self, member_id: str, first: int, last: int, kind: str, now_ms: int, config: ShareConfig,
                    delay_ms: int = 0, reason: str = "") -> dict[str, Any]:
        """Apply one acknowledgement range (kind: accept, release, reject, renew), all or nothing."""
        if last < first or last - first >= MAX_WINDOW_RECORDS:
            raise InvalidRecordState(f"offsets {first}..{last} are not a valid range")
        if not 0 <= delay_ms <= MAX_DELAY_MS:
            raise InvalidRecordState(f"a release delay of {delay_ms} ms is outside 0..{MAX_DELAY_MS}")
        for offset in range(first, last + 1):
            record = self.records.get(offset)
            if record is not None and record.member == member_id and record.state in (AVAILABLE, DEAD_LETTER_PENDING):
                raise InvalidRecordState(f"the lock on offset {offset} expired; the record may have gone to "
                                         "another member: do not act on it")
            if record is None or record.state != ACQUIRED or record.member != member_id:
                raise InvalidRecordState(f"offset {offset} is not held by member {member_id} (never acquired by "
                                         "it, or already acknowledged)")
            if record.deadline_ms <= now_ms:
                raise InvalidRecordState(f"the lock on offset {offset} expired; the record may have gone to "
                                         "another member: do not act on it")
        changes = [self._acked(offset, kind, now_ms, config, delay_ms, reason) for offset in range(first, last + 1)]
        delta = {"g": self.group_id, "set": _coalesce(changes)}
        self.replay(delta)
        return delta

    def _acked(self, offset: int, kind: str, now_ms: int, config: ShareConfig, delay_ms: int,
               reason: str) -> list[Any]:
        record = self.records[offset]
        if kind == "accept":
            return [offset, offset, ACKED, record.count, "", 0, ""]
        if kind == "renew":
            return [offset, offset, ACQUIRED, record.count, record.member, now_ms + config.lock_ms, ""]
        if kind == "reject":
            return self._to_dead_letters(offset, record.count, "", now_ms, reason or "rejected")
        return self._give_back(offset, record, now_ms, config, delay_ms, "released")

    def _give_back(self, offset: int, record: RecordState, now_ms: int, config: ShareConfig, delay_ms: int,
                   why: str) -> list[Any]:
        # The last holder stays named, so a late ack of theirs is told their lock expired.
        if record.count >= config.delivery_limit:
            return self._to_dead_letters(offset, record.count, record.member, now_ms,
                                         f"delivery limit {config.delivery_limit} reached ({why} after delivery "
                                         f"{record.count})")
        wait_ms = delay_ms or config.backoff_after(record.count)
        return [offset, offset, AVAILABLE, record.count, record.member, now_ms + wait_ms, ""]

    def _to_dead_letters(self, offset: int, count: int, member: str, now_ms: int, reason: str) -> list[Any]:
        """Archive for the dead letters, with the next dead-letter sequence number: copies are written in
        this order, so the dead-letter partition's duplicate check recognises a copy retried after failover."""
        seq = self.dlq_next_seq
        self.dlq_next_seq += 1
        return [offset, offset, DEAD_LETTER_PENDING, count, member, now_ms, reason, seq]

    # ============================================================================= time
    def expire(self, now_ms: int, config: ShareConfig) -> dict[str, Any] | None:
        """Locks past their deadline: the record comes back after its backoff (or to the dead letters)."""
        changes = []
        while self._locks and self._locks[0][0] <= now_ms:
            _, offset = heapq.heappop(self._locks)
            record = self.records.get(offset)
            if record is None or record.state != ACQUIRED or record.deadline_ms > now_ms:
                continue
            changes.append(self._give_back(offset, record, now_ms, config, 0, "lock expired"))
        if not changes:
            return None
        delta = {"g": self.group_id, "set": _coalesce(changes)}
        self.replay(delta)
        return delta

    def _refresh(self, now_ms: int) -> None:
        """Records whose backoff has passed join the ready heap."""
        while self._waiting and self._waiting[0][0] <= now_ms:
            _, offset = heapq.heappop(self._waiting)
            record = self.records.get(offset)
            if record is not None and record.state == AVAILABLE and record.deadline_ms <= now_ms:
                heapq.heappush(self._ready, offset)

    # ====================================================================== dead letters
    def pending_dead_letters(self) -> list[tuple[int, RecordState]]:
        """Records waiting for their dead-letter copy, in the order their copies must be written."""
        pending = [(o, r) for o, r in self.records.items() if r.state == DEAD_LETTER_PENDING]
        return sorted(pending, key=lambda item: item[1].dlq_seq)

    def dead_lettered_delta(self, offsets: Iterable[int]) -> dict[str, Any]:
        """The dead-letter copies of these records are written: archive them."""
        changes = []
        for offset in offsets:
            record = self.records[offset]
            changes.append([offset, offset, ARCHIVED, record.count, "", record.deadline_ms, record.reason])
        delta = {"g": self.group_id, "set": _coalesce(changes), "dlq_done": len(changes)}
        self.replay(delta)
        return delta

    # ========================================================================= describe
    def describe(self, now_ms: int, log_end: int) -> dict[str, Any]:
        in_flight: dict[str, int] = {}
        delayed = ready = 0
        for record in self.records.values():
            if record.state == ACQUIRED:
                in_flight[record.member] = in_flight.get(record.member, 0) + 1
            elif record.state == AVAILABLE:
                if record.deadline_ms > now_ms:
                    delayed += 1
                else:
                    ready += 1
        delayed += sum(1 for due_ms in self.parked.values() if due_ms > now_ms)
        ready += sum(1 for due_ms in self.parked.values() if due_ms <= now_ms)
        return {"start_offset": self.start, "available": ready + max(0, log_end - self.cursor),
                "in_flight": sum(in_flight.values()), "delayed": delayed, "dead_lettered": self.dead_lettered,
                "in_flight_by_member": in_flight}

    def snapshot(self) -> dict[str, Any]:
        """A delta that restates the whole state (written now and then, so the log before it may go)."""
        changes = [[o, o, r.state, r.count, r.member, r.deadline_ms, r.reason, r.dlq_seq]
                   for o, r in sorted(self.records.items())]
        return {"g": self.group_id, "full": True, "start": self.start, "cursor": self.cursor,
                "set": _coalesce(changes), "dlq": self.dead_lettered, "dlq_seq": self.dlq_next_seq,
                "park": [[offset, due_ms] for offset, due_ms in sorted(self.parked.items())]}


def _coalesce(changes: list[list[Any]]) -> list[list[Any]]:
    """Merge adjacent single-offset changes with equal fields into ranges (a delta of 500 acks is one row)."""
    out: list[list[Any]] = []
    for change in sorted(changes, key=lambda c: c[0]):
        if out and out[-1][1] + 1 == change[0] and out[-1][2:] == change[2:]:
            out[-1][1] = change[1]
        else:
            out.append(list(change))
    return out


def _ranges(taken: list[tuple[int, int]], deadline_ms: int) -> list[Acquired]:
    out: list[Acquired] = []
    for offset, count in sorted(taken):
        if out and out[-1].last_offset + 1 == offset and out[-1].delivery_count == count:
            out[-1] = Acquired(out[-1].first_offset, offset, count, deadline_ms)
        else:
            out.append(Acquired(offset, offset, count, deadline_ms))
    return out


# Group configs (set with `lb group config`, kept by the controller): Kafka's names where KIP-932 has them.
@dataclass(frozen=True)
class _ConfigKey:
    field_name: str
    low: int = 0
    high: int = 0
    choices: tuple[str, ...] = ()
    free_text: bool = False


CONFIG_KEYS = {
    "share.record.lock.duration.ms": _ConfigKey("lock_ms", 1_000, MAX_LOCK_MS),
    "share.delivery.count.limit": _ConfigKey("delivery_limit", 1, 100),
    "share.retry.backoff": _ConfigKey("backoff", choices=("fixed", "exponential")),
    "share.retry.backoff.ms": _ConfigKey("backoff_ms", 0, MAX_DELAY_MS),
    "share.retry.backoff.max.ms": _ConfigKey("backoff_max_ms", 0, MAX_DELAY_MS),
    "share.auto.offset.reset": _ConfigKey("start_at", choices=("earliest", "latest")),
    "share.dlq.topic": _ConfigKey("dlq_topic", free_text=True),
}


class InvalidShareConfig(ValueError):
    pass


def share_config_from(configs: dict[str, str]) -> ShareConfig:
    """A ShareConfig from group configs (unknown keys or bad values raise InvalidShareConfig)."""
    values: dict[str, Any] = {}
    for key, text in configs.items():
        spec = CONFIG_KEYS.get(key)
        if spec is None:
            raise InvalidShareConfig(f"unknown group config {key!r}; known: {', '.join(sorted(CONFIG_KEYS))}")
        if spec.free_text:
            values[spec.field_name] = text
        elif spec.choices:
            if text not in spec.choices:
                raise InvalidShareConfig(f"{key} must be one of {', '.join(spec.choices)}, got {text!r}")
            values[spec.field_name] = text
        else:
            try:
                number = int(text)
            except ValueError:
                raise InvalidShareConfig(f"{key} must be an integer, got {text!r}") from None
            if not spec.low <= number <= spec.high:
                raise InvalidShareConfig(f"{key} must be between {spec.low} and {spec.high}, got {number}")
            values[spec.field_name] = number
    return ShareConfig(**values)


def share_config_mapping(config: ShareConfig) -> dict[str, str]:
    return {key: str(getattr(config, spec.field_name)) for key, spec in CONFIG_KEYS.items()}
