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

import bisect
import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from logbroker.groups.delay_index import NOTHING, DelayIndex, DelayScan
from logbroker.groups.key_order import KeyOrder

# key_scan(first, last) -> (offset, key) of every data record in first..last, in log order
KeyScan = Callable[[int, int], Iterable[tuple[int, bytes | None]]]

AVAILABLE = "a"
ACQUIRED = "q"
ACKED = "k"
ARCHIVED = "x"
DEAD_LETTER_PENDING = "d"  # archived, its copy to the dead-letter topic not yet confirmed
DELIVER_AT_HEADER = "lb.deliver.at.ms"  # a record header a producer sets (send(..., deliver_at_ms=...))

DEFAULT_LOCK_MS = 30_000
DEFAULT_DELIVERY_LIMIT = 5
DEFAULT_BACKOFF_MS = 1_000
DEFAULT_BACKOFF_MAX_MS = 60_000
MAX_WINDOW_RECORDS = 50_000  # records past start a group may have read and not finished (runs keep it cheap)
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
    ordering: str = "none"  # or "key": records with one key are never in flight at once (key_order.py)

    def backoff_after(self, delivery_count: int) -> int:
        """How long a released or expired record waits before it is available again (BullMQ's policy)."""
        if self.backoff == "fixed":
            return self.backoff_ms
        return min(self.backoff_max_ms, self.backoff_ms * (2 ** max(0, delivery_count - 1)))


@dataclass(slots=True, frozen=True)
class RecordState:
    state: str
    count: int
    member: str = ""
    deadline_ms: int = 0  # acquired: lock deadline; available: not before; archived: the reason's time
    reason: str = ""
    dlq_seq: int = -1  # dead-letter pending: its place in the order dead-letter copies are written


DONE_STATES = (ACKED, ARCHIVED)
FINISHED_STATES = (ACKED, ARCHIVED, DEAD_LETTER_PENDING)  # never delivered again: a key's next record may go


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
    """Record states are kept as runs: offsets ``_firsts[i]`` to ``_lasts[i]`` all have ``_states[i]``. Runs are
    ordered, disjoint, and equal neighbours are merged, so a fetch of 5,000 records and its acknowledgement
    are one run each: the work per fetch does not grow with the records in it. Offsets with no run are done
    (below start), control batches, parked in the delay index, or not read yet (at or past cursor)."""

    group_id: str
    start: int
    cursor: int
    dead_lettered: int = 0
    dlq_next_seq: int = 0  # the sequence number the next dead letter gets (see _to_dead_letters)
    # Records read past while not yet due (see delay_index.py): the window moves on past them (a day-long
    # delay must not hold back everything behind it); when due, a record comes back into play below start.
    delays: DelayIndex = field(default_factory=DelayIndex)
    keys: KeyOrder = field(default_factory=KeyOrder)  # the leader's, in key-ordered mode only
    _firsts: list[int] = field(default_factory=list)
    _lasts: list[int] = field(default_factory=list)
    _states: list[RecordState] = field(default_factory=list)
    # Indexes over the runs, rebuilt from them, not persisted; an entry may be stale and is checked when used.
    _ready: list[tuple[int, int]] = field(default_factory=list)  # heap of (first, last) available now
    _waiting: list[tuple[int, int, int]] = field(default_factory=list)  # heap of (available at, first, last)
    _locks: list[tuple[int, int, int]] = field(default_factory=list)  # heap of (lock deadline, first, last)

    # =========================================================================== replay
    def replay(self, delta: dict[str, Any], parked_pairs: list[tuple[int, int]] | None = None) -> None:
        """Apply a delta written by ``acquire``, ``acknowledge``, ``expire`` or ``snapshot``. The leader that
        made the delta passes the (due, offset) pairs it parked, for its delay cache."""
        if delta.get("full"):
            for index in (self._firsts, self._lasts, self._states, self._ready, self._waiting, self._locks):
                index.clear()
            self.dead_lettered = delta.get("dlq", 0)
            self.dlq_next_seq = delta.get("dlq_seq", 0)
            self.start = self.cursor = delta["start"]
            self.delays.load_restated(delta.get("delays", {}))
            self.keys.clear()
        for row in delta.get("park", ()):
            if len(row) == 2:  # written before the delay index kept spans: one record and its due time
                self.delays.park(row[0], row[0], row[1] - 1, 1)
            else:
                self.delays.park(row[0], row[1], row[2], row[3], parked_pairs)
        if "unpark" in delta:
            self.delays.delivered(delta["unpark"], tuple(delta.get("dw", NOTHING)))  # type: ignore[arg-type]
        self._apply_rows(delta.get("set", ()))
        self.dead_lettered += delta.get("dlq_done", 0)
        self.cursor = max(self.cursor, delta.get("cursor", self.cursor))
        self._advance(delta.get("start", self.start))

    def _apply_rows(self, rows: Iterable[list[Any]]) -> None:
        for row in rows:
            first, last, state, count, member, deadline_ms, reason = row[:7]
            dlq_seq = row[7] if len(row) > 7 else -1
            self.dlq_next_seq = max(self.dlq_next_seq, dlq_seq + 1)
            if self.keys.loaded and state in FINISHED_STATES:
                for offset in self.keys.finished(first, last):  # the next record of each key may go now
                    heapq.heappush(self._ready, (offset, offset))
            if state in DONE_STATES and first < self.start:
                # Only records that came out of the delay index are in play below start; once done, they go.
                self._replace(first, min(last, self.start - 1), None)
                if last < self.start:
                    continue
                first = self.start
            self._replace(first, last, RecordState(state, count, member, deadline_ms, reason, dlq_seq))
            if state == ACQUIRED:
                heapq.heappush(self._locks, (deadline_ms, first, last))
            elif state == AVAILABLE:
                heapq.heappush(self._waiting, (deadline_ms, first, last))

    def _replace(self, first: int, last: int, record: RecordState | None) -> None:
        """Give offsets first..last the state ``record`` (None: no state of their own)."""
        low = bisect.bisect_left(self._lasts, first)  # the first run ending at or after first
        high = bisect.bisect_right(self._firsts, last)  # runs low..high-1 overlap first..last
        firsts: list[int] = []
        lasts: list[int] = []
        states: list[RecordState] = []
        if low < high and self._firsts[low] < first:  # the part of a run before first keeps its state
            firsts.append(self._firsts[low])
            lasts.append(first - 1)
            states.append(self._states[low])
        if record is not None:
            firsts.append(first)
            lasts.append(last)
            states.append(record)
        if low < high and self._lasts[high - 1] > last:  # ... and the part after last
            firsts.append(last + 1)
            lasts.append(self._lasts[high - 1])
            states.append(self._states[high - 1])
        self._firsts[low:high] = firsts
        self._lasts[low:high] = lasts
        self._states[low:high] = states
        self._merge_around(max(0, low - 1), low + len(firsts))

    def _merge_around(self, begin: int, end: int) -> None:
        index = min(end, len(self._firsts) - 1)
        while index > begin:
            if self._lasts[index - 1] + 1 == self._firsts[index] and self._states[index - 1] == self._states[index]:
                self._lasts[index - 1] = self._lasts[index]
                del self._firsts[index], self._lasts[index], self._states[index]
            index -= 1

    def _overlapping(self, first: int, last: int) -> list[tuple[int, int, RecordState]]:
        """The runs over first..last, clipped to it."""
        out = []
        index = bisect.bisect_left(self._lasts, first)
        while index < len(self._firsts) and self._firsts[index] <= last:
            out.append((max(first, self._firsts[index]), min(last, self._lasts[index]), self._states[index]))
            index += 1
        return out

    def _advance(self, start: int) -> None:
        """Move start to ``start`` (a snapshot's) and then past every finished record."""
        if start > self.start:
            self.start = start
            self._replace(-1, start - 1, None)  # nothing below start is kept once start moves past it
        self.cursor = max(self.cursor, self.start)
        low = index = bisect.bisect_left(self._lasts, self.start)
        while self.start < self.cursor:
            if index == len(self._firsts):
                self.start = self.cursor
            elif self._firsts[index] > self.start:
                # Offsets with no state of their own: control batches (every data record read into the window
                # has a state) or records in the delay index; either way done as far as the window goes.
                self.start = min(self._firsts[index], self.cursor)
            elif self._states[index].state in DONE_STATES:
                self.start = self._lasts[index] + 1
                index += 1
            else:
                break
        del self._firsts[low:index], self._lasts[low:index], self._states[low:index]

    # ========================================================================== acquire
    def acquire(self, member_id: str, now_ms: int, new_ranges: Sequence[tuple[int, int, bool]], max_records: int,
                config: ShareConfig, deliver_at: dict[int, int] | None = None,
                scan: DelayScan | None = None, keys: dict[int, bytes | None] | None = None,
                key_scan: KeyScan | None = None) -> tuple[list[Acquired], dict[str, Any]]:
        """Give member_id up to max_records: due delayed records and redeliveries first, then records never
        delivered. new_ranges are the log's next batches from ``cursor``: (first, last, is_data); control
        batches are done at once; deliver_at gives the delivery time of new records that carry one, and
        those not yet due go to the delay index. scan reads delivery times back from the log when the delay
        index must reload. In key-ordered mode, keys gives the new records' keys and key_scan reads the
        window's keys from the log when this leader first needs them. Returns the acquired ranges and the
        delta to write."""
        key_ordered = self._prepare_key_order(config, key_scan)
        self._refresh(now_ms)
        deadline_ms = now_ms + config.lock_ms
        due = self.delays.pop_due(now_ms, max_records, scan)
        taken: list[tuple[int, int, int]] = [(offset, offset, 1) for _, offset in due]  # (first, last, count)
        budget = self._take_ready(member_id, now_ms, deadline_ms, max_records - len(due), taken)
        parked: list[tuple[int, int]] = []
        waiting: list[tuple[int, int, int]] = []  # key-ordered: new records whose key has an earlier one unfinished
        cursor = self.cursor
        for first, last, is_data in new_ranges:
            if first != cursor or budget <= 0 or cursor - self.start >= MAX_WINDOW_RECORDS:
                break
            end = last if not is_data else min(last, first + budget - 1)
            if is_data and key_ordered:
                budget -= self._take_new_in_key_order(first, end, now_ms, deliver_at, keys or {}, taken, parked,
                                                      waiting)
            elif is_data:  # a control batch (a no-op, share state) has nothing to deliver, nothing to write
                budget -= _take_new(first, end, now_ms, deliver_at, taken, parked)
            cursor = end + 1
        rows = [[a, b, ACQUIRED, count, member_id, deadline_ms, ""] for a, b, count in taken]
        rows += [[a, b, AVAILABLE, 0, "", 0, ""] for a, b, _ in waiting]
        delta: dict[str, Any] = {"g": self.group_id, "cursor": cursor, "start": self.start, "set": _coalesce(rows)}
        if parked:
            delta["park"] = [[parked[0][1], parked[-1][1], now_ms, len(parked)]]
        if due:
            delta["unpark"] = [offset for _, offset in due]
            delta["dw"] = list(due[-1])
        self.replay(delta, parked)
        return _acquired(taken, deadline_ms), delta

    def _prepare_key_order(self, config: ShareConfig, key_scan: KeyScan | None) -> bool:
        if config.ordering != "key":
            if self.keys.loaded:
                self.keys.clear()  # stale once the mode is off: rebuilt if it comes back on
            return False
        if not self.keys.loaded:
            for offset, key in key_scan(self.start, self.cursor - 1) if key_scan and self.cursor > self.start else ():
                record = self.state_of(offset)
                if record is not None and record.state not in FINISHED_STATES:
                    self.keys.add(offset, key)
            self.keys.loaded = True
        return True

    def _take_new_in_key_order(self, first: int, last: int, now_ms: int, deliver_at: dict[int, int] | None,
                               keys: dict[int, bytes | None], taken: list[tuple[int, int, int]],
                               parked: list[tuple[int, int]], waiting: list[tuple[int, int, int]]) -> int:
        """_take_new, one record at a time: a record whose key has an earlier record unfinished waits."""
        count = 0
        for offset in range(first, last + 1):
            due_ms = deliver_at.get(offset, 0) if deliver_at else 0
            if due_ms > now_ms:
                parked.append((due_ms, offset))
            elif self.keys.add(offset, keys.get(offset)):
                taken.append((offset, offset, 1))
                count += 1
            else:
                waiting.append((offset, offset, 0))
        return count

    def _take_ready(self, member_id: str, now_ms: int, deadline_ms: int, budget: int,
                    taken: list[tuple[int, int, int]]) -> int:
        """Redeliveries (released or expired records whose backoff has passed), up to budget; returns what
        is left of it. Each is applied at once: the ready heap may name a run twice."""
        while self._ready and budget > 0:
            first, last = heapq.heappop(self._ready)
            for a, b, record in self._overlapping(first, last):
                if record.state != AVAILABLE or record.deadline_ms > now_ms:
                    continue
                if self.keys.loaded:
                    budget = self._take_ready_in_key_order(a, b, record, member_id, deadline_ms, budget, taken)
                    if budget == 0:
                        heapq.heappush(self._ready, (a, last))  # what is left, looked at again next time
                        break
                    continue
                end = min(b, a + budget - 1)
                taken.append((a, end, record.count + 1))
                self._apply_rows([[a, end, ACQUIRED, record.count + 1, member_id, deadline_ms, ""]])
                budget -= end - a + 1
                if budget == 0:
                    if end < last:
                        heapq.heappush(self._ready, (end + 1, last))
                    break
        return budget

    def _take_ready_in_key_order(self, first: int, last: int, record: RecordState, member_id: str,
                                 deadline_ms: int, budget: int, taken: list[tuple[int, int, int]]) -> int:
        for offset in range(first, last + 1):
            if budget == 0:
                break
            if self.keys.is_blocked(offset):
                continue  # its turn comes when the earlier record of its key finishes (pushed back then)
            taken.append((offset, offset, record.count + 1))
            self._apply_rows([[offset, offset, ACQUIRED, record.count + 1, member_id, deadline_ms, ""]])
            budget -= 1
        return budget

    # ====================================================================== acknowledge
    def acknowledge(self, member_id: str, first: int, last: int, kind: str, now_ms: int, config: ShareConfig,
                    delay_ms: int = 0, reason: str = "") -> dict[str, Any]:
        """Apply one acknowledgement range (kind: accept, release, reject, renew), all or nothing."""
        if last < first or last - first >= MAX_WINDOW_RECORDS:
            raise InvalidRecordState(f"offsets {first}..{last} are not a valid range")
        if not 0 <= delay_ms <= MAX_DELAY_MS:
            raise InvalidRecordState(f"a release delay of {delay_ms} ms is outside 0..{MAX_DELAY_MS}")
        pieces = self._overlapping(first, last)
        expected = first
        for a, b, record in pieces:
            _check_held(expected if a > expected else a, None if a > expected else record, member_id, now_ms)
            expected = b + 1
        if expected <= last:
            _check_held(expected, None, member_id, now_ms)
        changes: list[list[Any]] = []
        for a, b, record in pieces:
            changes.extend(self._acked(a, b, record, kind, now_ms, config, delay_ms, reason))
        delta = {"g": self.group_id, "set": _coalesce(changes)}
        self.replay(delta)
        return delta

    def _acked(self, first: int, last: int, record: RecordState, kind: str, now_ms: int, config: ShareConfig,
               delay_ms: int, reason: str) -> list[list[Any]]:
        if kind == "accept":
            return [[first, last, ACKED, record.count, "", 0, ""]]
        if kind == "renew":
            return [[first, last, ACQUIRED, record.count, record.member, now_ms + config.lock_ms, ""]]
        if kind == "reject":
            return [self._to_dead_letters(offset, record.count, "", now_ms, reason or "rejected")
                    for offset in range(first, last + 1)]
        return self._give_back(first, last, record, now_ms, config, delay_ms, "released")

    def _give_back(self, first: int, last: int, record: RecordState, now_ms: int, config: ShareConfig,
                   delay_ms: int, why: str) -> list[list[Any]]:
        # The last holder stays named, so a late ack of theirs is told their lock expired.
        if record.count >= config.delivery_limit:
            reason = f"delivery limit {config.delivery_limit} reached ({why} after delivery {record.count})"
            return [self._to_dead_letters(offset, record.count, record.member, now_ms, reason)
                    for offset in range(first, last + 1)]
        wait_ms = delay_ms or config.backoff_after(record.count)
        return [[first, last, AVAILABLE, record.count, record.member, now_ms + wait_ms, ""]]

    def _to_dead_letters(self, offset: int, count: int, member: str, now_ms: int, reason: str) -> list[Any]:
        """Archive for the dead letters, with the next dead-letter sequence number: copies are written in
        this order, so the dead-letter partition's duplicate check recognises a copy retried after failover."""
        seq = self.dlq_next_seq
        self.dlq_next_seq += 1
        return [offset, offset, DEAD_LETTER_PENDING, count, member, now_ms, reason, seq]

    # ============================================================================= time
    def expire(self, now_ms: int, config: ShareConfig) -> dict[str, Any] | None:
        """Locks past their deadline: the record comes back after its backoff (or to the dead letters)."""
        changes: list[list[Any]] = []
        while self._locks and self._locks[0][0] <= now_ms:
            _, first, last = heapq.heappop(self._locks)
            for a, b, record in self._overlapping(first, last):
                if record.state == ACQUIRED and record.deadline_ms <= now_ms:
                    rows = self._give_back(a, b, record, now_ms, config, 0, "lock expired")
                    self._apply_rows(rows)  # at once: another stale heap entry may cover these offsets too
                    changes.extend(rows)
        if not changes:
            return None
        delta = {"g": self.group_id, "set": _coalesce(changes)}
        self._advance(self.start)
        return delta

    def _refresh(self, now_ms: int) -> None:
        """Records whose backoff has passed join the ready heap."""
        while self._waiting and self._waiting[0][0] <= now_ms:
            _, first, last = heapq.heappop(self._waiting)
            for a, b, record in self._overlapping(first, last):
                if record.state == AVAILABLE and record.deadline_ms <= now_ms:
                    heapq.heappush(self._ready, (a, b))

    # ====================================================================== dead letters
    def pending_dead_letters(self) -> list[tuple[int, RecordState]]:
        """Records waiting for their dead-letter copy, in the order their copies must be written."""
        pending = [(offset, record) for first, last, record in self._runs() if record.state == DEAD_LETTER_PENDING
                   for offset in range(first, last + 1)]
        return sorted(pending, key=lambda item: item[1].dlq_seq)

    def dead_lettered_delta(self, offsets: Iterable[int]) -> dict[str, Any]:
        """The dead-letter copies of these records are written: archive them."""
        changes = []
        for offset in offsets:
            record = self.state_of(offset)
            assert record is not None and record.state == DEAD_LETTER_PENDING, (offset, record)
            changes.append([offset, offset, ARCHIVED, record.count, "", record.deadline_ms, record.reason])
        delta = {"g": self.group_id, "set": _coalesce(changes), "dlq_done": len(changes)}
        self.replay(delta)
        return delta

    # ========================================================================= describe
    def state_of(self, offset: int) -> RecordState | None:
        index = bisect.bisect_right(self._firsts, offset) - 1
        if index >= 0 and self._lasts[index] >= offset:
            return self._states[index]
        return None

    @property
    def records(self) -> dict[int, RecordState]:
        """Every record with a state of its own, one by one (for tests and tools: it costs a dict per record)."""
        return {offset: record for first, last, record in self._runs() for offset in range(first, last + 1)}

    def _runs(self) -> Iterator[tuple[int, int, RecordState]]:
        return zip(self._firsts, self._lasts, self._states, strict=True)

    def next_due_ms(self) -> int | None:
        """When the next parked record or backed-off redelivery may become available (None: none waiting)."""
        times = [t for t in (self.delays.next_due_ms(), self._waiting[0][0] if self._waiting else None)
                 if t is not None]
        return min(times) if times else None

    def oldest_ready_offset(self, now_ms: int) -> int | None:
        """The lowest offset that is available now (released or expired, its backoff passed)."""
        for first, _, record in self._runs():
            if record.state == AVAILABLE and record.deadline_ms <= now_ms:
                return first
        return None

    def describe(self, now_ms: int, log_end: int) -> dict[str, Any]:
        in_flight: dict[str, int] = {}
        delayed = ready = 0
        for first, last, record in self._runs():
            size = last - first + 1
            if record.state == ACQUIRED:
                in_flight[record.member] = in_flight.get(record.member, 0) + size
            elif record.state == AVAILABLE:
                if record.deadline_ms > now_ms:
                    delayed += size
                else:
                    ready += size
        due = self.delays.due_count(now_ms)
        delayed += self.delays.parked_count() - due
        ready += due
        return {"start_offset": self.start, "available": ready + max(0, log_end - self.cursor),
                "in_flight": sum(in_flight.values()), "delayed": delayed, "dead_lettered": self.dead_lettered,
                "in_flight_by_member": in_flight}

    def snapshot(self) -> dict[str, Any]:
        """A delta that restates the whole state (written now and then, so the log before it may go)."""
        return {"g": self.group_id, "full": True, "start": self.start, "cursor": self.cursor,
                "set": [[a, b, r.state, r.count, r.member, r.deadline_ms, r.reason, r.dlq_seq]
                        for a, b, r in self._runs()],
                "dlq": self.dead_lettered, "dlq_seq": self.dlq_next_seq, "delays": self.delays.restate()}


def _check_held(offset: int, record: RecordState | None, member_id: str, now_ms: int) -> None:
    if record is not None and record.member == member_id and record.state in (AVAILABLE, DEAD_LETTER_PENDING):
        raise InvalidRecordState(f"the lock on offset {offset} expired; the record may have gone to "
                                 "another member: do not act on it")
    if record is None or record.state != ACQUIRED or record.member != member_id:
        raise InvalidRecordState(f"offset {offset} is not held by member {member_id} (never acquired by "
                                 "it, or already acknowledged)")
    if record.deadline_ms <= now_ms:
        raise InvalidRecordState(f"the lock on offset {offset} expired; the record may have gone to "
                                 "another member: do not act on it")


def _take_new(first: int, last: int, now_ms: int, deliver_at: dict[int, int] | None,
              taken: list[tuple[int, int, int]], parked: list[tuple[int, int]]) -> int:
    """Records first..last, read for the first time: taken, or parked if their delivery time is ahead.
    Returns how many were taken."""
    if not deliver_at or not any(first <= offset <= last for offset in deliver_at):
        taken.append((first, last, 1))
        return last - first + 1
    count = 0
    run_first = first
    for offset in range(first, last + 1):
        due_ms = deliver_at.get(offset, 0)
        if due_ms > now_ms:
            parked.append((due_ms, offset))
            if run_first < offset:
                taken.append((run_first, offset - 1, 1))
                count += offset - run_first
            run_first = offset + 1
    if run_first <= last:
        taken.append((run_first, last, 1))
        count += last - run_first + 1
    return count


def _coalesce(changes: list[list[Any]]) -> list[list[Any]]:
    """Merge adjacent changes with equal fields into ranges (a delta of 500 single acks is one row)."""
    out: list[list[Any]] = []
    for change in sorted(changes, key=lambda c: c[0]):
        if out and out[-1][1] + 1 == change[0] and out[-1][2:] == change[2:]:
            out[-1][1] = change[1]
        else:
            out.append(list(change))
    return out


def _acquired(taken: list[tuple[int, int, int]], deadline_ms: int) -> list[Acquired]:
    out: list[Acquired] = []
    for first, last, count in sorted(taken):
        if out and out[-1].last_offset + 1 == first and out[-1].delivery_count == count:
            out[-1] = Acquired(out[-1].first_offset, last, count, deadline_ms)
        else:
            out.append(Acquired(first, last, count, deadline_ms))
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
    "share.ordering": _ConfigKey("ordering", choices=("none", "key")),
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
