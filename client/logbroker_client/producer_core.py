"""What a producer decides, without any I/O: shared by Producer (a sender thread) and AsyncProducer (asyncio).

The accumulator appends each record to its partition's open batch, seals a batch when the next record
would overfill it (batch_size) or when linger_ms has passed, and counts the bytes buffered against
buffer_memory. Sealed batches wait in a queue per partition. The sender drains by broker, as Kafka's and
aiokafka's do: take_sendable() hands out one entry per ready partition, the I/O layer groups them by leader
(requests_by_leader) into one Produce request per broker carrying every ready partition.

With idempotence (acks 1 or all), a batch takes its producer epoch and sequence when first handed out, and
up to max_in_flight_requests_per_connection (5) batches of a partition are in flight at once, counted batch
by batch whether they travel in one entry or in several; the broker refuses a batch whose sequence does not
follow the last one stored (OUT_OF_ORDER_SEQUENCE_NUMBER) and answers a retry of one of the last 5 with its
first offset. So:
- a partition's ready batches that have never been sent travel together in one entry (consecutive
  sequences, checked in order by the broker, proposed together), as many as the partition's window of 5
  leaves room for: the broker's window of 5 batches per producer and partition (producer_state.py) then
  still holds every batch a retry may carry, however the batches were grouped into requests;
- while the window is full, a partition's open batch is not sealed at linger_ms but keeps taking records
  up to batch_size (Kafka's accumulator does the same): batches grow when the pipeline is the bottleneck;
- a batch that comes back to be retried (leader change, lost connection, an earlier batch missing) goes
  back into its queue in sequence order, and a retried batch is sent alone, only once nothing of its
  partition is in flight: retries reach the new leader one by one, in sequence order, nothing reordered.
  An entry of several batches refused as too large is retried the same way, batch by batch, so only the
  batch at fault fails;
- a batch that fails for good leaves a hole in the sequences; the partition then waits for its in-flight
  batches, starts a new epoch at sequence 0 and rebuilds the batches still queued (Kafka bumps the epoch
  the same way). A batch that timed out may have been stored, and its retry under the new epoch is not
  recognised: only there can a record be stored twice, as in Kafka.
Without idempotence (or with acks=0, where no answer tells of a hole) one request per partition is in
flight, so a partition's batches still land in order. A batch's bytes are built once, when first sent, and
a retry resends them unchanged.

For each answer (or failure to get one) the core says what happens next (a Verdict): retry after a
backoff with fresh metadata, or complete the batches (with their offsets, or the typed error they fail
with, counted for flush()). The I/O layers only choose a leader, send, wait and wake up.
"""

from __future__ import annotations

import abc
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from logbroker_client import records as rec
from logbroker_client.errors import (
    DeliveryFailedError,
    LogbrokerError,
    OutOfOrderSequenceError,
    RecordTooLargeError,
    RequestTimedOutError,
    error_for,
)
from logbroker_client.lanes import check_priority, lane_topic
from logbroker_client.partitioner import RoundRobinPartitioner, StickyPartitioner, choose_partition
from logbroker_client.proto import logbroker_pb2 as pb

log = logging.getLogger("logbroker_client.producer")

DEFAULT_LINGER_MS = 5
DEFAULT_BATCH_SIZE = 1 << 20
DEFAULT_MAX_REQUEST_BYTES = 16 << 20
DEFAULT_BUFFER_MEMORY = 64 << 20
DEFAULT_DELIVERY_TIMEOUT_MS = 120_000
DEFAULT_MAX_BLOCK_MS = 60_000
RETRY_BACKOFF_MS = 100
# Batches of one partition in flight at once with idempotence (Kafka's max.in.flight.requests.per.connection),
# however many entries they travel in: the broker's window (BATCHES_PER_PRODUCER = 5 in
# logbroker/cluster/producer_state.py) holds them all, so any of them retried is recognised.
DEFAULT_MAX_IN_FLIGHT = 5
DEFAULT_METADATA_MAX_AGE_MS = 300_000  # Kafka's metadata.max.age.ms: partition counts are asked again then
MAX_PRODUCER_EPOCH = 0x7FFF  # an int16 on the wire
RECORD_OVERHEAD_BYTES = 21  # length, attributes, timestamp and offset deltas, key and value lengths
ACKS = {"all": -1, "-1": -1, -1: -1, "1": 1, 1: 1, "0": 0, 0: 0}
PARTITIONERS = ("sticky", "round_robin")
IDLE_WAIT_S = 0.05  # the longest a sender sleeps with nothing due
_time_ns = time.time_ns  # read per record: a module global, not an attribute lookup

DELIVER_AT_HEADER = "lb.deliver.at.ms"  # the broker holds such a record back from share consumers until then
LEADERLESS_CODES = (pb.ErrorCode.NOT_LEADER, pb.ErrorCode.NOT_ENOUGH_REPLICAS)

Headers = Sequence[tuple[str, bytes | None]]
Slot = tuple[str, int]


# ------------------------------------------------------------------------------------------ checks

def whole_ms(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} takes whole milliseconds (an int), got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value} ms; to deliver at once leave it out")
    return value


def delivery_headers(headers: Headers | None, deliver_at_ms: int | None, delay_ms: int | None) -> Headers | None:
    """headers plus the delivery time (lb.deliver.at.ms, ms since the epoch) when one is asked for: share
    consumers do not get the record before it; plain consumers and consumer groups read the log as written."""
    if deliver_at_ms is None and delay_ms is None:
        return headers
    if deliver_at_ms is not None and delay_ms is not None:
        raise ValueError("give deliver_at_ms (a time) or delay_ms (from now), not both")
    if delay_ms is not None:
        deliver_at_ms = time.time_ns() // 1_000_000 + whole_ms("delay_ms", delay_ms)
    else:
        whole_ms("deliver_at_ms", deliver_at_ms)  # type: ignore[arg-type]
    if any(key == DELIVER_AT_HEADER for key, _ in headers or ()):
        raise ValueError(f"the headers already carry {DELIVER_AT_HEADER}; give the delivery time once")
    return [*(headers or ()), (DELIVER_AT_HEADER, str(deliver_at_ms).encode())]


def priority_lane(topic: str, priority: int | None) -> str:
    """The topic of the priority lane a record goes to (lanes.py): the topic itself for priority 0 or None."""
    return topic if priority is None else lane_topic(topic, check_priority(priority))


def check_producer_options(acks: str | int, compression: str, partitioner: str = "sticky") -> None:
    """The settings every producer shares, checked the same way (sync and asyncio)."""
    if acks not in ACKS:
        raise ValueError(f"acks must be 'all', 1 or 0, got {acks!r}")
    if compression not in rec.COMPRESSION_CODECS:
        raise ValueError(f"compression must be one of {sorted(rec.COMPRESSION_CODECS)}, got {compression!r}")
    if partitioner not in PARTITIONERS:
        raise ValueError(f"partitioner must be 'sticky' or 'round_robin', got {partitioner!r}")


def check_record_size(topic: str, partition: int, key: bytes | None, value: bytes | None, limit: int) -> int:
    """Key and value bytes of a record; a record over the request limit is refused before it is queued."""
    payload_bytes = (len(value) if value else 0) + (len(key) if key else 0)
    if payload_bytes > limit:
        raise RecordTooLargeError(
            f"record of {payload_bytes} bytes exceeds max_request_bytes={limit}; nothing was sent", topic, partition)
    return payload_bytes


def record_size_bound(payload_bytes: int, headers: Headers | None) -> int:
    """An upper bound on the encoded record: a batch never grows past batch_size by taking it, so an oversized
    record travels alone and is refused alone."""
    if not headers:
        return RECORD_OVERHEAD_BYTES + payload_bytes
    return RECORD_OVERHEAD_BYTES + payload_bytes + sum(len(k) + len(v or b"") + 10 for k, v in headers)


def explain_record_too_large(error: LogbrokerError | None, topic: str, partition: int,
                             batches: Sequence[tuple[int, int]]) -> LogbrokerError | None:
    """The broker refuses a batch over the topic's max.message.bytes and suggests smaller batches. For a batch
    of one record that cannot help: say that the record itself is too large, and which topic config to raise.
    batches: (record count, bytes as sent) of each batch in the refused request."""
    if not isinstance(error, RecordTooLargeError):
        return error
    text = str(error)
    size = re.search(r"batch of (\d+) bytes", text)
    limit = re.search(r"max\.message\.bytes=(\d+)", text)
    if size is not None:
        refused = [(count, nbytes) for count, nbytes in batches if nbytes == int(size.group(1))]
    else:
        refused = list(batches) if len(batches) == 1 else []
    if not refused or refused[0][0] != 1:
        return error
    setting = f"max.message.bytes={limit.group(1)}" if limit else "max.message.bytes"
    return RecordTooLargeError(
        f"{topic}-{partition}: a single record of {refused[0][1]} bytes (with its batch header) is larger than the "
        f"topic's {setting}; a record cannot be split, so send a smaller one or raise the topic config "
        f"max.message.bytes of {topic!r} (set at creation with `lb topic create {topic} --config "
        "max.message.bytes=BYTES`)", topic, partition)


class FailureTally:
    """Records that failed since the last flush(), by error message (both producers keep one)."""

    def __init__(self) -> None:
        self.records = 0
        self.by_error: dict[str, int] = {}

    def add(self, count: int, error: BaseException) -> None:
        self.records += count
        message = " ".join(str(error).split()) or type(error).__name__
        self.by_error[message] = self.by_error.get(message, 0) + count

    def summary(self) -> str:
        worst, count = max(self.by_error.items(), key=lambda item: item[1])
        others = f"; {len(self.by_error) - 1} other error(s) too" if len(self.by_error) > 1 else ""
        return f"{self.records} record(s) failed since the last flush; {count} with: {worst}{others}"

    def report(self, raise_on_failure: bool) -> int:
        """flush()'s answer: the count of failed records, or DeliveryFailedError when asked to raise."""
        if self.records and raise_on_failure:
            raise DeliveryFailedError(self.summary(), self.records, dict(self.by_error))
        return self.records


# ------------------------------------------------------------------------------------------ batches

class CoreBatch(abc.ABC):
    """Records for one partition, sent and acknowledged together. The I/O layers subclass it with the way a
    waiter learns the outcome (complete())."""

    __slots__ = ("topic", "partition", "builder", "created", "data", "attempts", "ordinal", "epoch", "sequence")

    def __init__(self, topic: str, partition: int, compression: int, created: float) -> None:
        self.topic = topic
        self.partition = partition
        self.builder = rec.BatchBuilder(compression)
        self.created = created
        self.data: bytes | None = None  # built (with its sequence) when first sent, then resent unchanged
        self.attempts = 0
        self.ordinal = -1  # its place in the partition's send order, once handed out (-1: never yet)
        self.epoch = -1  # producer epoch and base sequence it was handed out with (idempotence)
        self.sequence = -1

    @property
    def assigned(self) -> bool:
        return self.ordinal >= 0

    @abc.abstractmethod
    def complete(self, base_offset: int, error: BaseException | None) -> None:
        """Tell the batch's waiters: acknowledged at base_offset, or failed with error."""


class Verdict:
    """What to do with the batches of one answered (or failed) request.

    retry: they are back in their queue, in sequence order, and go again (after the backoff); refresh the
    topic's metadata first when refresh_metadata says so. leaderless: the broker that answered could not name
    a leader, so ask the others first.
    completions: (batch, base offset or -1, error or None) to complete, then release() the batches."""

    __slots__ = ("retry", "leaderless", "error", "completions", "refresh_metadata")

    def __init__(self, retry: bool, leaderless: bool, error: LogbrokerError | None,
                 completions: list[tuple[CoreBatch, int, LogbrokerError | None]],
                 refresh_metadata: bool | None = None) -> None:
        self.retry = retry
        self.leaderless = leaderless
        self.error = error
        self.completions = completions
        # A retry after a leader problem asks for fresh metadata; one after OUT_OF_ORDER does not need to.
        self.refresh_metadata = retry if refresh_metadata is None else refresh_metadata

    @property
    def finished(self) -> list[CoreBatch]:
        return [batch for batch, _, _ in self.completions]


def complete_all(completions: Sequence[tuple[CoreBatch, int, LogbrokerError | None]]) -> None:
    for batch, base_offset, error in completions:
        batch.complete(base_offset, error)


# ------------------------------------------------------------------------------------------ the core

class ProducerCore:
    """The accumulator, the send queues and the retry rules of one producer. Not thread-safe: the
    synchronous Producer calls it under its lock, the AsyncProducer from its event loop only.

    new_batch(topic, partition, compression, created) makes a batch; new_future(batch, index, timestamp_ms)
    the caller's handle on one record; wake() is called (once per batch, never per record) when the sender
    has something new to look at: a batch to start the linger clock of, or one sealed."""

    def __init__(
        self,
        *,
        new_batch: Callable[[str, int, int, float], CoreBatch],
        new_future: Callable[[Any, int, int], Any],
        wake: Callable[[], None],
        acks: str | int = "all",
        linger_ms: float = DEFAULT_LINGER_MS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        compression: str = "none",
        partitioner: str = "sticky",
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        buffer_memory: int = DEFAULT_BUFFER_MEMORY,
        delivery_timeout_ms: int = DEFAULT_DELIVERY_TIMEOUT_MS,
        max_block_ms: int = DEFAULT_MAX_BLOCK_MS,
        enable_idempotence: bool = True,
        max_in_flight_requests_per_connection: int = DEFAULT_MAX_IN_FLIGHT,
        producer_id: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_producer_options(acks, compression, partitioner)
        self.new_batch = new_batch
        self.new_future = new_future
        self.wake = wake
        self.clock = clock
        self.acks = ACKS[acks]
        # Idempotence: a random 62-bit producer id (no broker round trip to allocate one, chosen by the caller),
        # and per partition an epoch and a sequence, let the leader recognise a retried batch and refuse one
        # that arrives before an earlier one. acks=0 gets no answer that could tell of a refusal: no sequences.
        self.idempotent = enable_idempotence and self.acks != 0
        if not 1 <= max_in_flight_requests_per_connection <= DEFAULT_MAX_IN_FLIGHT:
            raise ValueError(f"max_in_flight_requests_per_connection must be 1..{DEFAULT_MAX_IN_FLIGHT} (the "
                             f"brokers recognise retries of the last {DEFAULT_MAX_IN_FLIGHT} batches), got "
                             f"{max_in_flight_requests_per_connection}")
        # Without sequences the broker cannot refuse a batch that overtook a failed one: one at a time.
        self.max_in_flight = max_in_flight_requests_per_connection if self.idempotent else 1
        self.producer_id = producer_id
        self.sequences: dict[Slot, int] = {}
        self.epochs: dict[Slot, int] = {}
        self.ordinals: dict[Slot, int] = {}
        self.resetting: set[Slot] = set()  # a batch failed for good: new epoch once nothing is in flight
        self.confirmed: set[Slot] = set()  # partitions with a batch of the current epoch stored (see _window_room)
        self.linger_s = linger_ms / 1000
        self.batch_size = batch_size
        self.compression = rec.COMPRESSION_CODECS[compression]
        self.max_request_bytes = max_request_bytes
        self.buffer_memory = buffer_memory
        self.delivery_timeout_s = delivery_timeout_ms / 1000
        self.max_block_s = max_block_ms / 1000
        self.partitioner = StickyPartitioner() if partitioner == "sticky" else RoundRobinPartitioner()
        self.partition_counts: dict[str, int] = {}  # filled by the I/O layer from metadata
        self.counts_asked_s: dict[str, float] = {}  # when each count was asked for (time.monotonic)
        self.open: dict[Slot, CoreBatch] = {}
        self.ready: dict[Slot, deque[CoreBatch]] = {}
        self.in_flight: dict[Slot, list[CoreBatch]] = {}  # handed out and unanswered, in send order
        self.retry_at: dict[Slot, float] = {}  # backoff: no resend of a partition before then
        self.buffered_bytes = 0
        self.unfinished = 0  # batches not yet completed and released
        self.failures = FailureTally()  # since the last flush()
        self.closed = False  # no more retries: what fails now fails for good

    # ------------------------------------------------------------------------------ caller side

    def append(self, topic: str, value: Any, key: Any, headers: Headers | None, partition: int | None,
               timestamp_ms: int | None, count: int) -> Any:
        """Add one record to its partition's open batch (the hot path: per record, no allocation a batch could
        share, and as few Python calls as the checks allow: a keyless record without headers, the common
        case, makes five). count is the topic's partition count. Returns new_future(batch, index,
        timestamp_ms)."""
        if value.__class__ is str:
            value = value.encode()
        if key is None and partition is None:
            partition = self.partitioner.partition(topic, count)
            payload_bytes = len(value) if value else 0
        else:
            if key.__class__ is str:
                key = key.encode()
            partition = choose_partition(topic, key, partition, count, self.partitioner)
            payload_bytes = (len(value) if value else 0) + (len(key) if key else 0)
        if timestamp_ms is None:
            timestamp_ms = _time_ns() // 1_000_000
        if payload_bytes > self.max_request_bytes:
            check_record_size(topic, partition, key, value, self.max_request_bytes)  # raises, naming the limit
        slot = (topic, partition)
        batch = self.open.get(slot)
        if batch is None:
            batch = self._open_batch(slot, None)
        elif batch.builder.size_bytes + (record_size_bound(payload_bytes, headers) if headers
                                         else RECORD_OVERHEAD_BYTES + payload_bytes) > self.batch_size:
            batch = self._open_batch(slot, batch)
        builder = batch.builder
        before = builder.size_bytes
        index = builder.append(timestamp_ms, key, value, headers or ())
        after = builder.size_bytes
        self.buffered_bytes += after - before
        if after >= self.batch_size:
            self.seal(slot, batch)
            self.wake()
        return self.new_future(batch, index, timestamp_ms)

    def _open_batch(self, slot: Slot, full: CoreBatch | None) -> CoreBatch:
        """A new open batch for the partition; the open one (full: the next record would overfill it) is sealed
        first."""
        if full is not None:
            self.seal(slot, full)
            self.wake()
        batch = self.open[slot] = self.new_batch(slot[0], slot[1], self.compression, self.clock())
        self.unfinished += 1
        self.buffered_bytes += batch.builder.size_bytes  # its header: release() frees the whole size
        self.wake()  # once per batch: the sender must start this batch's linger clock
        return batch

    def set_partition_count(self, topic: str, count: int, now_s: float) -> None:
        """The topic's partition count, as a broker or the cached metadata gave it at now_s (time.monotonic)."""
        self.partition_counts[topic] = count
        self.counts_asked_s[topic] = now_s

    def forget_old_partition_counts(self, max_age_s: float, now_s: float) -> None:
        """The sender, once a turn: forget counts asked for more than max_age_s ago (metadata_max_age_ms), so
        the next send() to the topic asks a broker again (partitions may have been added). send() itself then
        needs no clock: a count it finds is fresh enough."""
        for topic, asked_s in self.counts_asked_s.items():
            if now_s - asked_s > max_age_s:
                self.partition_counts.pop(topic, None)

    def buffer_full(self) -> bool:
        return self.buffered_bytes >= self.buffer_memory

    def buffer_full_error(self) -> RequestTimedOutError:
        """What send() raises when the buffer stayed full for max_block_ms."""
        return RequestTimedOutError(
            f"producer buffer full ({self.buffered_bytes} bytes) for {self.max_block_s:g}s; "
            "the brokers are not keeping up or are unreachable")

    def seal(self, slot: Slot, batch: CoreBatch) -> None:
        """Move an open batch to the partition's send queue."""
        del self.open[slot]
        self.ready.setdefault(slot, deque()).append(batch)
        self.partitioner.on_batch_sealed(slot[0], slot[1], self.partition_counts.get(slot[0], 1))

    def seal_all(self) -> None:
        """flush(): every open batch goes now, lingering or not."""
        for slot, batch in list(self.open.items()):
            self.seal(slot, batch)

    def take_failures(self) -> FailureTally:
        failures, self.failures = self.failures, FailureTally()
        return failures

    # ------------------------------------------------------------------------------ sender side

    def has_work(self) -> bool:
        """Anything open or queued (in-flight requests aside): the sender keeps running while there is."""
        return bool(self.open) or any(self.ready.values())

    def seal_lingering(self) -> float:
        """Seal batches older than linger_ms whose partition could send them now; return how long the sender
        may sleep before something is due. A lingering batch whose partition's window is full (or backing off)
        stays open and keeps taking records: an answer wakes the sender, which seals it then."""
        now = self.clock()
        next_due = IDLE_WAIT_S
        for slot, batch in list(self.open.items()):
            due = batch.created + self.linger_s - now
            if due > 0:
                next_due = min(next_due, due)
            elif self._could_send(slot, now):
                self.seal(slot, batch)
        for retry_at in self.retry_at.values():
            if retry_at > now:
                next_due = min(next_due, retry_at - now)
        return next_due

    def _could_send(self, slot: Slot, now: float) -> bool:
        """Would one more sealed batch of the partition go at once (room in its window, no backoff)?"""
        room = self._window_room(slot, self.in_flight.get(slot, []))
        queue = self.ready.get(slot)
        if queue:
            room -= len(queue)
        return room > 0 and self.retry_at.get(slot, 0.0) <= now

    def _window_room(self, slot: Slot, flying: list[CoreBatch]) -> int:
        """How many more new batches of the partition may go. The window runs from the oldest batch still
        unanswered, not over the count in flight: gRPC answers requests in any order, so while one batch's
        answer is slow, later ones can be stored and answered; if they kept going, the slow batch's retry
        would fall behind the broker's window of its last 5 batches and could not be recognised (the broker
        can only say it was stored, not where). Kafka's in-order answers per connection give it this rule."""
        if self.idempotent and slot not in self.confirmed:
            # A broker accepts a producer it does not know at any sequence (Kafka 3.x's rule), so a later batch
            # overtaking the first one would be stored first, and the first one then taken for "stored long
            # ago": until one batch of the epoch is stored, one goes at a time.
            return 1 - len(flying)
        if not flying:
            return self.max_in_flight
        return self.max_in_flight - (self.ordinals.get(slot, 0) - flying[0].ordinal)

    def take_sendable(self) -> list[tuple[Slot, list[CoreBatch]]]:
        """The entries that may go now, at most one per partition, in sequence order: the partition's batches
        never sent yet, together, up to max_in_flight batches of the partition in flight and within
        max_request_bytes (the first always goes); or a retried batch alone, once nothing of its partition is
        in flight. None during a backoff. Each batch gets its epoch and sequence here, under the caller's
        lock."""
        now = self.clock()
        taken: list[tuple[Slot, list[CoreBatch]]] = []
        for slot, queue in self.ready.items():
            if not queue or self.retry_at.get(slot, 0.0) > now:
                continue
            flying = self.in_flight.setdefault(slot, [])
            if slot in self.resetting:
                if flying:
                    continue
                self._start_new_epoch(slot, queue)
            if queue[0].assigned:  # a retry
                if not flying:
                    batch = queue.popleft()
                    flying.append(batch)
                    taken.append((slot, [batch]))
                continue
            entry = self._take_new(slot, queue, flying)
            if entry:
                taken.append((slot, entry))
        return taken

    def _take_new(self, slot: Slot, queue: deque[CoreBatch], flying: list[CoreBatch]) -> list[CoreBatch]:
        """Batches never sent yet from the head of the queue, numbered in order, as one entry."""
        entry: list[CoreBatch] = []
        size = 0
        room = self._window_room(slot, flying)
        while queue and len(entry) < room and not queue[0].assigned:
            next_size = queue[0].builder.size_bytes
            if entry and size + next_size > self.max_request_bytes:
                break
            batch = queue.popleft()
            self._assign(slot, batch)
            flying.append(batch)
            entry.append(batch)
            size += next_size
        return entry

    def _assign(self, slot: Slot, batch: CoreBatch) -> None:
        ordinal = self.ordinals.get(slot, 0)
        self.ordinals[slot] = ordinal + 1
        batch.ordinal = ordinal
        if self.idempotent:
            batch.epoch = self.epochs.get(slot, 0)
            batch.sequence = self.sequences.get(slot, 0)
            self.sequences[slot] = (batch.sequence + batch.builder.count) & 0x7FFFFFFF

    def _start_new_epoch(self, slot: Slot, queue: deque[CoreBatch]) -> None:
        """After a batch failed for good: the next epoch, from sequence 0; queued retries are numbered again
        (none of them was stored, or at most one that timed out: see the module's docstring)."""
        self.resetting.discard(slot)
        self.confirmed.discard(slot)
        epoch = (self.epochs.get(slot, 0) + 1) % (MAX_PRODUCER_EPOCH + 1)
        self.epochs[slot] = epoch
        self.sequences[slot] = 0
        log.info("%s-%d: a batch failed for good; producer %d continues with epoch %d from sequence 0",
                 slot[0], slot[1], self.producer_id, epoch)
        renumbered = []
        while queue and queue[0].assigned:
            batch = queue.popleft()
            batch.data = None
            batch.ordinal = -1
            renumbered.append(batch)
        queue.extendleft(reversed(renumbered))

    def request_records(self, slot: Slot, batches: Sequence[CoreBatch]) -> bytes:
        """The records field for the batches: each built once with the sequence it was handed out with,
        resent as built. Safe outside the lock: a batch handed out is touched by its sender alone."""
        for batch in batches:
            if batch.data is None:
                batch.data = self.build(slot, batch)
            batch.attempts += 1
        datas = [b.data for b in batches if b.data is not None]
        return datas[0] if len(datas) == 1 else b"".join(datas)  # one batch: no extra copy

    def build(self, slot: Slot, batch: CoreBatch) -> bytes:
        """Seal the bytes once; a retry resends them unchanged, sequence included, so the broker can dedupe."""
        if not self.idempotent:
            return batch.builder.build()
        return batch.builder.build(producer_id=self.producer_id, producer_epoch=batch.epoch,
                                   base_sequence=batch.sequence)

    def on_answer(self, slot: Slot, batches: list[CoreBatch], result: pb.PartitionProduceResult | None,
                  error: LogbrokerError | None) -> Verdict:
        """The partition's answer (result) or the failure to get one (error): requeue, or say how each batch
        completes. The caller completes them (outside any lock: callbacks run user code), then release()s."""
        self._land(slot, batches)
        leaderless = False
        if result is not None and result.error_code:
            error = error_for(result.error_code, result.error_message, *slot)
            # That broker cannot say who leads (it may be cut off from its peers): ask the others first.
            leaderless = result.error_code in LEADERLESS_CODES and not result.leader.leader_address
        if isinstance(error, RecordTooLargeError) and len(batches) > 1 and self.may_retry(batches):
            return self._split_refused(slot, batches, error)
        error = explain_record_too_large(error, *slot, [(b.builder.count, len(b.data or b"")) for b in batches])
        if isinstance(error, OutOfOrderSequenceError) and self.may_retry(batches):
            return self._out_of_order(slot, batches, error)
        if error is not None and error.retriable and self.may_retry(batches):
            log.info("%s-%d: %s; retrying in %d ms", slot[0], slot[1], error, RETRY_BACKOFF_MS)
            self._requeue(slot, batches)
            self.retry_at[slot] = max(self.retry_at.get(slot, 0.0), self.clock() + RETRY_BACKOFF_MS / 1000)
            return Verdict(True, leaderless, error, [])
        if error is not None:
            failed = sum(b.builder.count for b in batches)
            log.warning("%s-%d: %d record(s) failed: %s", slot[0], slot[1], failed, error)
            self.failures.add(failed, error)
            if self.idempotent:
                self.resetting.add(slot)  # their sequences will never be stored: a hole the broker refuses
            return Verdict(False, leaderless, error, [(b, -1, error) for b in batches])
        assert result is not None
        self.confirmed.add(slot)
        if len(result.batch_base_offsets) == len(batches):
            return Verdict(False, False, None, list(zip(batches, result.batch_base_offsets, [None] * len(batches),
                                                        strict=True)))
        # Brokers without per-batch offsets: a request's batches are stored contiguously from base_offset.
        completions: list[tuple[CoreBatch, int, LogbrokerError | None]] = []
        next_offset = result.base_offset if self.acks != 0 else -1
        for batch in batches:
            completions.append((batch, next_offset, None))
            if next_offset >= 0:
                next_offset += batch.builder.count
        return Verdict(False, False, None, completions)

    def _out_of_order(self, slot: Slot, batches: list[CoreBatch], error: LogbrokerError) -> Verdict:
        """The broker has not stored the batch before this one. If that batch is still unanswered or queued,
        this one overtook it: resend after it. If not, the broker lost it (or never will store it): start a
        new epoch once nothing is in flight."""
        first = min(b.ordinal for b in batches)
        earlier_pending = any(b.ordinal < first for b in self.in_flight.get(slot, ())) or any(
            b.assigned and b.ordinal < first for b in self.ready.get(slot, ()))
        if not earlier_pending and self.idempotent:
            log.info("%s-%d: %s; nothing earlier is pending, so a new epoch starts", slot[0], slot[1], error)
            self.resetting.add(slot)
        self._requeue(slot, batches)
        return Verdict(True, False, error, [], refresh_metadata=False)

    def _split_refused(self, slot: Slot, batches: list[CoreBatch], error: LogbrokerError) -> Verdict:
        """An entry of several batches was refused as too large, and nothing of it stored: one of them is at
        fault. They go again as retries, each alone, so that one fails by itself (and the partition starts a
        new epoch) while the others are stored."""
        log.info("%s-%d: %s; resending the entry's %d batches one by one", slot[0], slot[1], error, len(batches))
        self._requeue(slot, batches)
        return Verdict(True, False, error, [], refresh_metadata=False)

    def _land(self, slot: Slot, batches: Sequence[CoreBatch]) -> None:
        """The batches are no longer in flight (answered, or the send failed)."""
        flying = self.in_flight.get(slot)
        if flying:
            for batch in batches:
                if batch in flying:
                    flying.remove(batch)

    def _requeue(self, slot: Slot, batches: Sequence[CoreBatch]) -> None:
        """Back into the queue in sequence order: before every batch handed out later, after earlier ones."""
        queue = self.ready.setdefault(slot, deque())
        for batch in sorted(batches, key=lambda b: b.ordinal):
            index = 0
            while index < len(queue) and queue[index].assigned and queue[index].ordinal < batch.ordinal:
                index += 1
            queue.insert(index, batch)

    def pause(self, slots: Sequence[Slot], throttle_ms: int) -> None:
        """A broker answered with a throttle time (a quota, or no room for requests in flight): the partitions
        it leads send nothing to it before the time is up."""
        if throttle_ms > 0:
            until = self.clock() + throttle_ms / 1000
            for slot in slots:
                self.retry_at[slot] = max(self.retry_at.get(slot, 0.0), until)

    def may_retry(self, batches: Sequence[CoreBatch]) -> bool:
        """Within delivery_timeout_ms of the oldest batch's creation, and not closed."""
        return not self.closed and self.clock() - batches[0].created < self.delivery_timeout_s

    def unacknowledged(self, batches: Sequence[CoreBatch]) -> list[tuple[CoreBatch, int, LogbrokerError | None]]:
        """acks=0: nobody waits for an answer; the records complete without offsets once sent."""
        return [(batch, -1, None) for batch in batches]

    def release(self, slot: Slot, batches: Sequence[CoreBatch]) -> None:
        """The batches are done (after they were completed): their partition may send more, their memory is
        free."""
        self._land(slot, batches)
        freed = 0
        for batch in batches:
            freed += batch.builder.size_bytes
            batch.builder = None  # type: ignore[assignment]  # the record bytes can go now
            batch.data = None
        self.buffered_bytes -= freed
        self.unfinished -= len(batches)


class _Request:
    __slots__ = ("leader", "slots", "size", "parts")

    def __init__(self, leader: Any) -> None:
        self.leader = leader
        self.slots: set[Slot] = set()
        self.size = 0
        self.parts: list[tuple[Slot, list[CoreBatch]]] = []


def requests_by_leader(items: Sequence[tuple[Slot, list[CoreBatch], Any]], max_request_bytes: int
                       ) -> list[tuple[Any, list[tuple[Slot, list[CoreBatch]]]]]:
    """Group (slot, batches, leader) into requests: one per leader carrying every ready partition, at most one
    entry of a partition per request (a partition's next entry goes in the leader's next request, so its
    batches leave in order), within max_request_bytes (a larger entry still goes, alone)."""
    requests: list[_Request] = []
    by_leader: dict[Any, list[_Request]] = {}
    for slot, batches, leader in items:
        size = sum(b.builder.size_bytes for b in batches)
        candidates = by_leader.setdefault(leader, [])
        request = next((r for r in candidates if slot not in r.slots and r.size + size <= max_request_bytes), None)
        if request is None:
            request = _Request(leader)
            candidates.append(request)
            requests.append(request)
        request.slots.add(slot)
        request.size += size
        request.parts.append((slot, batches))
    return [(r.leader, r.parts) for r in requests]


def match_results(parts: Sequence[tuple[Slot, list[CoreBatch]]], results: Sequence[pb.PartitionProduceResult]
                  ) -> list[tuple[Slot, list[CoreBatch], pb.PartitionProduceResult | None, LogbrokerError | None]]:
    """Pair each partition of a request with its result (the broker answers in request order); a partition
    the answer lacks fails with an error saying so (and is retried)."""
    paired: list[tuple[Slot, list[CoreBatch], pb.PartitionProduceResult | None, LogbrokerError | None]] = []
    for index, (slot, batches) in enumerate(parts):
        result = results[index] if index < len(results) else None
        if result is not None and (result.topic, result.partition) == slot:
            paired.append((slot, batches, result, None))
        else:
            paired.append((slot, batches, None, RequestTimedOutError(
                f"{slot[0]}-{slot[1]}: the broker's answer has no result for this partition; resending")))
    return paired


def partition_count_stale(count: int | None, partition: int | None) -> bool:
    """Must send() ask for a topic's partition count? When none is known (never asked, or forgotten by
    forget_old_partition_counts once older than metadata_max_age_ms), or a partition beyond it is named
    (partitions were added)."""
    return count is None or (partition is not None and partition >= count)
