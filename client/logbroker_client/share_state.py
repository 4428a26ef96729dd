"""What a share consumer knows, without any I/O: shared by ShareConsumer and AsyncShareConsumer.

A share group's members take records from the same partitions; each partition's leader hands a record to one
member at a time, locked until a deadline. This module keeps the member's side of that bargain:

- held records: acquired by this member and not finished with (ack, release, reject), each with its delivery
  count and lock deadline (the broker's wall clock, ms). renew() keeps a record held and moves its deadline.
  A record whose deadline passes is dropped: the broker may give it to another member by then.
- pending acknowledgements per partition, not sent yet. They travel with the next ShareFetch to the partition's
  leader (or ShareAcknowledge when flushed), contiguous offsets of the same kind coalesced into one range. An
  acknowledgement a failed request carried goes back to pending, for the next leader.
- max_in_flight (RabbitMQ's prefetch): held records, finished ones whose acknowledgement is not sent yet, and
  what the fetches in flight may still acquire never add up to more.
- which partitions to fetch and in which order: one request per leader, the priority lanes ordered by
  lanes.LaneScheduler, the partitions of a lane rotated so that each is first in turn (a leader fills a
  request's budget in the order the partitions are named).
- the answers: acquired ranges cut out of whole batches (control batches skipped, other records of a batch
  ignored), ack results (failures kept until commit() / flush_acks() reports them), partition errors.

The I/O layers (share.py, aio_share.py) resolve leaders, send what plan_fetches() and plan_acks() build, and
hand the answers back. ack()/release()/reject()/renew() may be called from any thread; the rest from one.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from logbroker_client import records as rec
from logbroker_client.errors import (
    AcknowledgementError,
    CorruptBatchError,
    InvalidRecordStateError,
    LogbrokerError,
    NotLeaderError,
    error_for,
)
from logbroker_client.fetch_state import decode_batch
from logbroker_client.lanes import LaneScheduler, lane_weight
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.records import Record
from logbroker_client.types import TopicPartition

log = logging.getLogger("logbroker_client.share")

ACK_NAMES: dict[int, str] = {pb.ACCEPT: "ack", pb.RELEASE: "release", pb.REJECT: "reject", pb.RENEW: "renew"}
MAX_RELEASE_DELAY_MS = 7 * 24 * 3_600_000  # the broker's bound on a release delay
CLOSE_RELEASE_DELAY_MS = 1  # close() gives records back at once (a delay of 0 means the group's retry backoff)
MAX_REMEMBERED_EXPIRED = 10_000  # expired locks remembered, so that a late ack() says why it is refused
MAX_REASON_CHARS = 1_000
QUICK_LOOK_MS = 250  # while other leaders have records, one that had none is looked at (no wait) this often


@dataclass(frozen=True, slots=True)
class Ack:
    """One record's acknowledgement: its kind (pb.AckType), a release's delay, a reject's reason."""

    kind: int
    delay_ms: int = 0
    reason: str = ""

    @property
    def final(self) -> bool:
        """Everything but renew ends this member's hold on the record."""
        return self.kind != pb.RENEW

    @property
    def name(self) -> str:
        return ACK_NAMES[self.kind]


ACCEPT = Ack(pb.ACCEPT)
RENEW = Ack(pb.RENEW)


def release_ack(delay_ms: int) -> Ack:
    if isinstance(delay_ms, bool) or not isinstance(delay_ms, int):
        raise TypeError(f"release(delay_ms=...) takes whole milliseconds, got {delay_ms!r}")
    if not 0 <= delay_ms <= MAX_RELEASE_DELAY_MS:
        raise ValueError(f"release delay must be 0 (the group's retry backoff) to {MAX_RELEASE_DELAY_MS} ms "
                         f"(7 days), got {delay_ms} ms")
    return Ack(pb.RELEASE, delay_ms)


def reject_ack(reason: str) -> Ack:
    return Ack(pb.REJECT, 0, str(reason)[:MAX_REASON_CHARS])


class AckFailure(NamedTuple):
    """An acknowledgement the broker refused (or could not be delivered): which records, which kind, why."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    kind: str  # "ack", "release", "reject" or "renew"
    error: LogbrokerError

    def __str__(self) -> str:
        offsets = str(self.first_offset) if self.first_offset == self.last_offset else \
            f"{self.first_offset}..{self.last_offset}"
        return f"{self.kind} of {self.topic}-{self.partition} offset {offsets}: {self.error}"


class ShareRecord:
    """A record acquired by a share consumer: the usual fields, its delivery count (1 on the first delivery) and
    its lock deadline (ms since the epoch, the broker's clock). Finish it with ack(), release() or reject();
    renew() extends the lock of a long job. Each call only queues the acknowledgement: it travels with the
    consumer's next fetch, or at once with flush_acks() / commit()."""

    __slots__ = ("topic", "partition", "offset", "timestamp", "key", "value", "headers", "delivery_count",
                 "lock_deadline_ms", "_session")

    def __init__(self, record: Record, delivery_count: int, lock_deadline_ms: int, session: ShareSession) -> None:
        self.topic = record.topic
        self.partition = record.partition
        self.offset = record.offset
        self.timestamp = record.timestamp
        self.key = record.key
        self.value = record.value
        self.headers = record.headers
        self.delivery_count = delivery_count
        self.lock_deadline_ms = lock_deadline_ms
        self._session = session

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def header(self, name: str) -> bytes | None:
        """The value of the last header with this name, or None."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found

    def ack(self) -> None:
        """Done: the record is never delivered again."""
        self._session.acknowledge(self, ACCEPT)

    def release(self, delay_ms: int = 0) -> None:
        """Give it back, to be delivered again (to any member) after delay_ms, or with 0 after the group's retry
        backoff (share.retry.backoff*). Each delivery counts towards share.delivery.count.limit."""
        self._session.acknowledge(self, release_ack(delay_ms))

    def reject(self, reason: str = "") -> None:
        """Poison: the broker sends it to the group's dead-letter topic, with the reason in its headers."""
        self._session.acknowledge(self, reject_ack(reason))

    def renew(self) -> None:
        """Still working on it: the lock is extended by the group's lock duration (share.record.lock.duration.ms)."""
        self._session.acknowledge(self, RENEW)

    def __repr__(self) -> str:
        return (f"ShareRecord(topic={self.topic!r}, partition={self.partition}, offset={self.offset}, "
                f"delivery_count={self.delivery_count}, key={self.key!r}, value={self.value!r})")


@dataclass
class PartitionShare:
    """This member's side of one partition: the records it holds and the acknowledgements not sent yet."""

    tp: TopicPartition
    level: int = 0  # priority lane
    subscribed: bool = True
    held: dict[int, ShareRecord] = field(default_factory=dict)
    pending: dict[int, Ack] = field(default_factory=dict)
    lock_duration_ms: int = 0  # as the last acquisition showed it: a renewed lock lasts about as long

    def unsent_final(self) -> int:
        return sum(1 for ack in self.pending.values() if ack.final)


class SharePlan:
    """A request to build and send: ShareFetch when max_records > 0, else ShareAcknowledge (acks only).
    `handle` is the I/O layer's own (a gRPC future, an asyncio task)."""

    __slots__ = ("address", "partitions", "acks", "max_records", "quick", "handle")

    def __init__(self, address: str, partitions: list[TopicPartition], acks: dict[TopicPartition, dict[int, Ack]],
                 max_records: int) -> None:
        self.address = address
        self.partitions = partitions
        self.acks = acks
        self.max_records = max_records
        self.quick = False  # a look at a leader that had nothing, while others have records: do not wait there
        self.handle: Any = None

    @property
    def is_fetch(self) -> bool:
        return self.max_records > 0

    def partition_messages(self) -> list[pb.SharePartitionFetch]:
        return [pb.SharePartitionFetch(topic=tp.topic, partition=tp.partition, acks=ack_ranges(self.acks.get(tp, {})))
                for tp in self.partitions]

    def fetch_request(self, group_id: str, member_id: str, max_wait_ms: int, client_id: str) -> pb.ShareFetchRequest:
        return pb.ShareFetchRequest(group_id=group_id, member_id=member_id, partitions=self.partition_messages(),
                                    max_wait_ms=0 if self.quick else max_wait_ms, max_records=self.max_records,
                                    client_id=client_id)

    def acknowledge_request(self, group_id: str, member_id: str) -> pb.ShareAcknowledgeRequest:
        return pb.ShareAcknowledgeRequest(group_id=group_id, member_id=member_id, partitions=self.partition_messages())


def weighted_shares(room: int, weights: Mapping[str, int]) -> dict[str, int]:
    """room split in proportion to the weights; what rounding leaves goes to the heaviest first."""
    total = sum(weights.values())
    if room <= 0 or total <= 0:
        return {}
    shares = {key: room * weight // total for key, weight in weights.items()}
    leftover = room - sum(shares.values())
    for key in sorted(weights, key=lambda k: -weights[k])[:leftover]:
        shares[key] += 1
    return shares


def ack_ranges(acks: Mapping[int, Ack]) -> list[pb.AckRange]:
    """Contiguous offsets with the same acknowledgement, one range each, in offset order."""
    ranges: list[pb.AckRange] = []
    first = last = -1
    current: Ack | None = None
    for offset in sorted(acks):
        ack = acks[offset]
        if current is not None and offset == last + 1 and ack == current:
            last = offset
            continue
        if current is not None:
            ranges.append(_range(first, last, current))
        first = last = offset
        current = ack
    if current is not None:
        ranges.append(_range(first, last, current))
    return ranges


def _range(first: int, last: int, ack: Ack) -> pb.AckRange:
    return pb.AckRange(first_offset=first, last_offset=last, type=pb.AckType.Name(ack.kind), delay_ms=ack.delay_ms,
                       reason=ack.reason)


class Answer(NamedTuple):
    """What the I/O layer does after an answer was taken in."""

    find_leader: set[str]  # topics whose leadership moved: refresh their metadata
    errors: list[LogbrokerError]  # partition errors waiting will not cure: poll() raises the first


def check_max_in_flight(records: int) -> int:
    if isinstance(records, bool) or not isinstance(records, int) or records < 1:
        raise ValueError(f"max_in_flight must be a whole number of records, at least 1, got {records!r}")
    return records


class ShareSession:
    def __init__(self, group_id: str, member_id: str, max_in_flight: int) -> None:
        self.group_id = group_id
        self.member_id = member_id
        self.max_in_flight = check_max_in_flight(max_in_flight)
        self.partitions: dict[TopicPartition, PartitionShare] = {}
        self.lanes: list[tuple[str, int]] = []  # (topic, priority level) subscribed
        self.buffer: deque[ShareRecord] = deque()  # acquired, not yet handed out by poll()
        self.in_flight: list[SharePlan] = []
        self.failures: list[AckFailure] = []  # since the last take_failures()
        self.closed = False
        self._expired: OrderedDict[tuple[TopicPartition, int], int] = OrderedDict()  # -> the deadline that passed
        self._deadlines: list[tuple[int, int, TopicPartition, list[int]]] = []  # heap: (deadline, n, tp, offsets)
        self._counter = itertools.count()
        self._scheduler = LaneScheduler()
        self._turns: dict[int, int] = {}  # level -> how often it led: its partitions take turns at the front
        self._found_nothing: set[str] = set()  # leaders whose last fetch acquired nothing
        self._looked_ms: dict[str, float] = {}  # leader -> when a quick look last went there
        self._lock = threading.RLock()  # acknowledge() may come from worker threads

    # ----------------------------------------------------------------------------- subscription

    def subscribe(self, lanes: Sequence[tuple[str, int]]) -> None:
        """Fetch these (topic, level) lanes from now on; partitions of topics dropped are no longer fetched
        (records held from them can still be finished), and their buffered records are released."""
        if not lanes:
            raise ValueError("subscribe to at least one topic")
        with self._lock:
            self.lanes = list(dict.fromkeys(lanes))
            levels = dict(self.lanes)
            for tp, part in self.partitions.items():
                part.subscribed = tp.topic in levels
                part.level = levels.get(tp.topic, part.level)
            self._drop_buffered(lambda record: not self.partitions[record.topic_partition].subscribed)

    def subscribed_topics(self) -> list[str]:
        return [topic for topic, _ in self.lanes]

    def set_partition_count(self, topic: str, count: int) -> None:
        """The topic's partitions as metadata lists them (new ones are fetched from now on)."""
        level = dict(self.lanes).get(topic)
        if level is None:
            return
        with self._lock:
            for index in range(count):
                tp = TopicPartition(topic, index)
                if tp not in self.partitions:
                    self.partitions[tp] = PartitionShare(tp, level)

    def fetchable(self) -> list[TopicPartition]:
        return [tp for tp, part in self.partitions.items() if part.subscribed]

    # ---------------------------------------------------------------------------- acknowledging

    def acknowledge(self, record: ShareRecord, ack: Ack) -> None:
        with self._lock:
            if self.closed:
                raise LogbrokerError(f"cannot {ack.name} {_where(record)}: its consumer is closed (close() released "
                                     "every record it held)")
            part = self.partitions.get(record.topic_partition)
            held = part.held.get(record.offset) if part is not None else None
            if held is not record or part is None:
                raise self._not_held(record, held, ack)
            if ack.final:
                del part.held[record.offset]
            part.pending[record.offset] = ack

    def _not_held(self, record: ShareRecord, held: ShareRecord | None, ack: Ack) -> InvalidRecordStateError:
        where = _where(record)
        if record._session is not self:
            why = "it was fetched by another consumer; acknowledge records through the consumer that polled them"
        elif held is not None:
            why = (f"it was delivered to this consumer again (delivery {held.delivery_count}) after its lock on "
                   "this copy expired; acknowledge the newer copy")
        elif (record.topic_partition, record.offset) in self._expired:
            why = ("its lock expired, so the broker may have given it to another consumer: do not act on it. "
                   "Renew the locks of long jobs (renew()) or raise share.record.lock.duration.ms")
        else:
            why = "this consumer already finished with it (ack, release or reject)"
        return InvalidRecordStateError(f"cannot {ack.name} {where}: {why}", record.topic, record.partition)

    # ------------------------------------------------------------------------------ accounting

    def unfinished(self) -> int:
        """Records held, plus finished ones whose acknowledgement has not been sent: the broker counts both."""
        with self._lock:
            return sum(len(part.held) + part.unsent_final() for part in self.partitions.values())

    def reserved(self) -> int:
        return sum(plan.max_records for plan in self.in_flight)

    def has_pending_acks(self) -> bool:
        return any(part.pending for part in self.partitions.values())

    # ------------------------------------------------------------------------------------ locks

    def expire_locks(self, now_ms: int) -> int:
        """Drop held records whose lock deadline has passed (the broker may have given them to someone else);
        returns how many."""
        dropped = 0
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now_ms:
                _, _, tp, offsets = heapq.heappop(self._deadlines)
                part = self.partitions.get(tp)
                if part is not None:
                    dropped += sum(self._expire(part, offset, now_ms) for offset in offsets)
        return dropped

    def _expire(self, part: PartitionShare, offset: int, now_ms: int) -> int:
        record = part.held.get(offset)
        if record is None or record.lock_deadline_ms > now_ms:
            return 0  # finished, or renewed since
        del part.held[offset]
        part.pending.pop(offset, None)  # a renew not sent yet: too late
        self._expired[(part.tp, offset)] = record.lock_deadline_ms
        while len(self._expired) > MAX_REMEMBERED_EXPIRED:
            self._expired.popitem(last=False)
        return 1

    def _track_deadline(self, tp: TopicPartition, offsets: list[int], deadline_ms: int) -> None:
        if offsets:
            heapq.heappush(self._deadlines, (deadline_ms, next(self._counter), tp, offsets))

    # ---------------------------------------------------------------------------------- records

    def take(self, limit: int | None = None) -> list[ShareRecord]:
        """Buffered records still held (a lock may have expired while they waited), up to limit."""
        out: list[ShareRecord] = []
        with self._lock:
            while self.buffer and (limit is None or len(out) < limit):
                record = self.buffer.popleft()
                part = self.partitions.get(record.topic_partition)
                if part is not None and part.held.get(record.offset) is record:
                    out.append(record)
        return out

    def _drop_buffered(self, drop: Callable[[ShareRecord], bool]) -> None:
        """Buffered records the application will never see go back to the queue at once."""
        kept: deque[ShareRecord] = deque()
        for record in self.buffer:
            if not drop(record):
                kept.append(record)
                continue
            part = self.partitions[record.topic_partition]
            if part.held.get(record.offset) is record:
                del part.held[record.offset]
                part.pending[record.offset] = Ack(pb.RELEASE, CLOSE_RELEASE_DELAY_MS)
        self.buffer = kept

    # --------------------------------------------------------------------------------- planning

    def _lanes_by_level(self) -> dict[int, list[TopicPartition]]:
        by_level: dict[int, list[TopicPartition]] = {}
        for tp, part in self.partitions.items():
            if part.subscribed:
                by_level.setdefault(part.level, []).append(tp)
        return by_level

    def fetch_order(self) -> list[TopicPartition]:
        """Subscribed partitions in the order the next fetch names them: lanes by the scheduler, and within a
        lane rotated by one each time the lane leads (fetch_made() moves both on)."""
        by_level = self._lanes_by_level()
        if not by_level:
            return []
        order: list[TopicPartition] = []
        for level in self._scheduler.order(by_level):
            tps = sorted(by_level[level])
            shift = self._turns.get(level, 0) % len(tps)
            order += tps[shift:] + tps[:shift]
        return order

    def fetch_made(self) -> None:
        by_level = self._lanes_by_level()
        if by_level:
            lead = self._scheduler.advance(by_level)
            self._turns[lead] = self._turns.get(lead, 0) + 1

    def plan_fetches(self, leaders: Mapping[TopicPartition, str], now_ms: float = 0.0) -> list[SharePlan]:
        """Requests for every leader without a fetch in flight: a ShareFetch carrying the acknowledgements of its
        partitions when max_in_flight leaves room, else a ShareAcknowledge when there are acknowledgements; and
        a ShareAcknowledge for the acknowledgements of partitions no longer subscribed. now_ms: any clock."""
        with self._lock:
            busy = {plan.address for plan in self.in_flight if plan.is_fetch}
            by_leader: dict[str, list[TopicPartition]] = {}
            for tp in self.fetch_order():
                address = leaders.get(tp)
                if address is not None and address not in busy:
                    by_leader.setdefault(address, []).append(tp)
            looks = self._quick_looks(by_leader, busy)
            resting = {address for address in looks if now_ms - self._looked_ms.get(address, -1e18) < QUICK_LOOK_MS}
            budgets = self._split_budget({a: tps for a, tps in by_leader.items() if a not in resting}, by_leader)
            plans = [self._plan(address, tps, budgets.get(address, 0)) for address, tps in by_leader.items()]
            strays = {tp: leaders[tp] for tp, part in self.partitions.items()
                      if part.pending and not part.subscribed and tp in leaders}
            plans += self._ack_plans(strays)
            plans = [plan for plan in plans if plan.is_fetch or plan.acks]
            for plan in plans:
                if plan.is_fetch and plan.address in looks:
                    plan.quick = True
                    self._looked_ms[plan.address] = now_ms
            if any(plan.is_fetch for plan in plans):
                self.fetch_made()
            self.in_flight += plans
            return plans

    def _quick_looks(self, by_leader: Mapping[str, list[TopicPartition]], busy: set[str]) -> set[str]:
        """While some leader has records, a fetch to one that had none only looks (max_wait 0, at most every
        QUICK_LOOK_MS), so the room it takes comes back at once; when none has records, every fetch waits for
        records at the broker."""
        if not (set(by_leader) | busy) - self._found_nothing:
            return set()
        return {address for address in by_leader if address in self._found_nothing}

    def _split_budget(self, by_leader: Mapping[str, list[TopicPartition]],
                      asking: Mapping[str, list[TopicPartition]]) -> dict[str, int]:
        """max_in_flight's room (acknowledgements sent in the requests about to go, to `asking`, free their records
        first), shared among the leaders to fetch from, named in fetch order (which rotates): one record's worth
        each while room lasts, so none is starved however small the room; the rest by the weight of the lanes
        they lead, to the leaders whose last fetch found records (all of them when none did), so that long waits
        at leaders with nothing to give hold little room."""
        asked = {tp for tps in asking.values() for tp in tps}
        waiting_acks = sum(part.unsent_final() for tp, part in self.partitions.items() if tp not in asked)
        held = sum(len(part.held) for part in self.partitions.values())
        room = self.max_in_flight - held - waiting_acks - self.reserved()
        if room <= 0:
            return {}
        budgets = {address: 1 for address in list(by_leader)[:room]}
        weights = {address: sum(lane_weight(self.partitions[tp].level) for tp in tps)
                   for address, tps in by_leader.items()}
        finding = {address: weight for address, weight in weights.items() if address not in self._found_nothing}
        for address, share in weighted_shares(room - len(budgets), finding or weights).items():
            budgets[address] = budgets.get(address, 0) + share
        return budgets

    def _plan(self, address: str, tps: list[TopicPartition], budget: int) -> SharePlan:
        acks = {}
        for tp in tps:
            part = self.partitions[tp]
            if part.pending:
                acks[tp], part.pending = part.pending, {}
        if budget <= 0:
            tps = [tp for tp in tps if tp in acks]
        return SharePlan(address, tps, acks, max(0, budget))

    def plan_acks(self, leaders: Mapping[TopicPartition, str]) -> list[SharePlan]:
        """ShareAcknowledge requests carrying every pending acknowledgement (flush_acks, close)."""
        with self._lock:
            plans = self._ack_plans({tp: leaders[tp] for tp, part in self.partitions.items()
                                     if part.pending and tp in leaders})
            self.in_flight += plans
            return plans

    def _ack_plans(self, leaders: Mapping[TopicPartition, str]) -> list[SharePlan]:
        by_leader: dict[str, list[TopicPartition]] = {}
        for tp, address in leaders.items():
            by_leader.setdefault(address, []).append(tp)
        return [self._plan(address, tps, 0) for address, tps in by_leader.items()]

    def with_pending_acks(self) -> list[TopicPartition]:
        return [tp for tp, part in self.partitions.items() if part.pending]

    # ---------------------------------------------------------------------------------- answers

    def absorb(self, plan: SharePlan, answers: Iterable[pb.SharePartitionData], now_ms: int) -> Answer:
        """Take in a ShareFetch or ShareAcknowledge answer: acquired records, acknowledgement results, errors."""
        with self._lock:
            self._end(plan)
            outcome = Answer(set(), [])
            fresh: list[ShareRecord] = []
            unanswered = dict(plan.acks)
            for data in answers:
                tp = TopicPartition(data.topic, data.partition)
                part = self.partitions.get(tp)
                if part is None:
                    continue
                sent = unanswered.pop(tp, {})
                if data.error_code:
                    self._requeue(part, sent)
                    self._on_partition_error(tp, data, outcome)
                    continue
                self._take_ack_results(part, sent, data.ack_results, now_ms)
                if data.acquired:
                    fresh += self._take_acquired(part, data, now_ms)
            for tp, sent in unanswered.items():  # not in the answer: not applied, send them again
                self._requeue(self.partitions[tp], sent)
            if plan.is_fetch:
                self._note_found(plan.address, bool(fresh))
            self._buffer(fresh)
            return outcome

    def _note_found(self, address: str, found: bool) -> None:
        if found:
            self._found_nothing.discard(address)
        else:
            self._found_nothing.add(address)

    def _buffer(self, fresh: list[ShareRecord]) -> None:
        """Waiting records, the most urgent lane first (a stable sort: each partition's keep their log order)."""
        self.buffer.extend(fresh)
        if len({level for _, level in self.lanes}) > 1:
            self.buffer = deque(sorted(self.buffer, key=lambda record: -self.partitions[record.topic_partition].level))

    def failed(self, plan: SharePlan) -> None:
        """The request got no answer: its acknowledgements go to the next request (to the next leader)."""
        with self._lock:
            self._end(plan)
            for tp, sent in plan.acks.items():
                self._requeue(self.partitions[tp], sent)

    def _end(self, plan: SharePlan) -> None:
        if plan in self.in_flight:
            self.in_flight.remove(plan)

    def _requeue(self, part: PartitionShare, sent: Mapping[int, Ack]) -> None:
        for offset, ack in sent.items():
            if offset in part.pending:
                continue  # a newer acknowledgement of it was made meanwhile
            if ack.final or offset in part.held:
                part.pending[offset] = ack

    def _on_partition_error(self, tp: TopicPartition, data: pb.SharePartitionData, outcome: Answer) -> None:
        error = error_for(data.error_code, data.error_message, tp.topic, tp.partition)
        if isinstance(error, NotLeaderError) or error.retriable:
            outcome.find_leader.add(tp.topic)
        else:
            outcome.errors.append(error)

    def _take_ack_results(self, part: PartitionShare, sent: Mapping[int, Ack], results: Iterable[pb.AckResult],
                          now_ms: int) -> None:
        for result in results:
            ack = sent.get(result.first_offset, ACCEPT)
            offsets = range(result.first_offset, result.last_offset + 1)
            if result.error_code:
                error = error_for(result.error_code, result.error_message, part.tp.topic, part.tp.partition)
                self._record_failure(part, result.first_offset, result.last_offset, ack, error)
                if ack.kind == pb.RENEW:
                    for offset in offsets:  # the broker says this member does not hold it
                        part.held.pop(offset, None)
            elif ack.kind == pb.RENEW:
                self._renewed(part, offsets, now_ms)

    def _record_failure(self, part: PartitionShare, first: int, last: int, ack: Ack, error: LogbrokerError) -> None:
        failure = AckFailure(part.tp.topic, part.tp.partition, first, last, ack.name, error)
        log.warning("share group %s: %s", self.group_id, failure)
        self.failures.append(failure)

    def _renewed(self, part: PartitionShare, offsets: range, now_ms: int) -> None:
        deadline_ms = now_ms + part.lock_duration_ms
        renewed = []
        for offset in offsets:
            record = part.held.get(offset)
            if record is not None:
                record.lock_deadline_ms = deadline_ms
                renewed.append(offset)
        self._track_deadline(part.tp, renewed, deadline_ms)

    def _take_acquired(self, part: PartitionShare, data: pb.SharePartitionData, now_ms: int) -> list[ShareRecord]:
        ranges = sorted(data.acquired, key=lambda r: r.first_offset)
        part.lock_duration_ms = max(0, max(r.lock_deadline_ms for r in ranges) - now_ms)
        decoded = self._decode_acquired(part.tp, data.records, ranges)
        out = []
        for acquired in ranges:
            offsets = []
            for offset in range(acquired.first_offset, acquired.last_offset + 1):
                found = decoded.get(offset)
                if found is None:
                    continue
                record = ShareRecord(found, acquired.delivery_count, acquired.lock_deadline_ms, self)
                part.held[offset] = record
                offsets.append(offset)
                out.append(record)
            self._track_deadline(part.tp, offsets, acquired.lock_deadline_ms)
        self._release_missing(part, ranges, decoded)
        return out

    def _decode_acquired(self, tp: TopicPartition, data: bytes, ranges: Sequence[pb.AcquiredRange]
                         ) -> dict[int, Record]:
        """offset -> record of every acquired record the answer's batches hold."""
        firsts = [r.first_offset for r in ranges]
        lasts = [r.last_offset for r in ranges]
        out: dict[int, Record] = {}
        for pos, header in rec.iter_batch_headers(data):
            last = header.base_offset + header.last_offset_delta
            index = bisect.bisect_left(lasts, header.base_offset)
            if header.attributes & rec.CONTROL_FLAG or index == len(ranges) or firsts[index] > last:
                continue  # a control batch, or no record of it is this member's
            records: list[Record] = []
            try:
                decode_batch(tp, data, pos, header, max(header.base_offset, firsts[index]), records, True)
            except CorruptBatchError as exc:
                log.warning("share group %s: %s; its records go back to the queue", self.group_id, exc)
                continue
            for record in records:
                at = bisect.bisect_right(firsts, record.offset) - 1
                if at >= 0 and record.offset <= lasts[at]:
                    out[record.offset] = record
        return out

    def _release_missing(self, part: PartitionShare, ranges: Sequence[pb.AcquiredRange],
                         decoded: Mapping[int, Record]) -> None:
        """Acquired records the answer did not carry (or that could not be read) go back to the queue at once,
        rather than sitting locked until their deadline."""
        missing = [offset for r in ranges for offset in range(r.first_offset, r.last_offset + 1)
                   if offset not in decoded]
        for offset in missing:
            part.pending[offset] = Ack(pb.RELEASE, CLOSE_RELEASE_DELAY_MS)
        if missing:
            log.warning("share group %s: %s: %d acquired record(s) were not in the answer's batches; released",
                        self.group_id, f"{part.tp.topic}-{part.tp.partition}", len(missing))

    # ------------------------------------------------------------------------------ failures

    def take_failures(self) -> list[AckFailure]:
        with self._lock:
            failures, self.failures = self.failures, []
            return failures

    def unsendable(self, tps: Iterable[TopicPartition], error: LogbrokerError) -> None:
        """Acknowledgements that could not be delivered before giving up: reported as failures."""
        with self._lock:
            for tp in tps:
                part = self.partitions[tp]
                for ack_range in ack_ranges(part.pending):
                    ack = Ack(ack_range.type, ack_range.delay_ms, ack_range.reason)
                    self._record_failure(part, ack_range.first_offset, ack_range.last_offset, ack, error)
                part.pending = {}

    # -------------------------------------------------------------------------------- closing

    def release_everything(self) -> int:
        """close(): every held record (handed out or still buffered) goes back to the queue at once; returns
        how many. Acknowledgements made before stay as they were."""
        with self._lock:
            count = 0
            for part in self.partitions.values():
                for offset in part.held:
                    part.pending[offset] = Ack(pb.RELEASE, CLOSE_RELEASE_DELAY_MS)
                count += len(part.held)
                part.held.clear()
            self.buffer.clear()
            self.closed = True
            return count


def _where(record: ShareRecord) -> str:
    return f"{record.topic}-{record.partition} offset {record.offset}"


def failures_error(failures: Sequence[AckFailure]) -> AcknowledgementError:
    first = failures[0]
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    return AcknowledgementError(f"{len(failures)} acknowledgement(s) failed: {first}{more}", failures)
