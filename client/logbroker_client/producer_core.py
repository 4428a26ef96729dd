"""What a producer decides, without any I/O: shared by Producer (a sender thread) and AsyncProducer (asyncio).

The accumulator appends each record to its partition's open batch, seals a batch when the next record
would overfill it (batch_size) or when linger_ms has passed, and counts the bytes buffered against
buffer_memory. Sealed batches wait in a queue per partition; at most one request per partition is in flight,
so a partition's batches land in the order they were sent, retries included. A batch's bytes are built
once, when first sent, and that is when it takes its producer sequence (idempotence): a retry resends the
same bytes, so the leader recognises a batch it already stored, and sequences never need rewinding.

For each answer (or failure to get one) the core says what happens next (a Verdict): retry after a
backoff with fresh metadata (the batches go back to the head of their queue), fail the one oversized batch
of a request and resend the others at once, or complete the batches (with their offsets, or the typed
error they fail with, counted for flush()). The I/O layers only choose a leader, send, wait and wake up.
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
# Batches of one partition in one request. The broker's idempotence window (BATCHES_PER_PRODUCER = 32 in
# logbroker/cluster/producer_state.py) must hold a whole retried request, so keep this well below it.
MAX_BATCHES_PER_REQUEST = 16
RECORD_OVERHEAD_BYTES = 21  # length, attributes, timestamp and offset deltas, key and value lengths
ACKS = {"all": -1, "-1": -1, -1: -1, "1": 1, 1: 1, "0": 0, 0: 0}
PARTITIONERS = ("sticky", "round_robin")
IDLE_WAIT_S = 0.05  # the longest a sender sleeps with nothing due

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


def refused_batch(error: LogbrokerError, sizes: Sequence[int]) -> int | None:
    """Which batch of a several-batch request the broker refused as too large (its message gives the size), so
    the producer fails that one alone and sends the others again: they are not at fault."""
    if len(sizes) < 2 or not isinstance(error, RecordTooLargeError):
        return None
    size = re.search(r"batch of (\d+) bytes", str(error))
    if size is None or int(size.group(1)) not in sizes:
        return None
    return sizes.index(int(size.group(1)))


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

    __slots__ = ("topic", "partition", "builder", "created", "data", "attempts")

    def __init__(self, topic: str, partition: int, compression: int, created: float) -> None:
        self.topic = topic
        self.partition = partition
        self.builder = rec.BatchBuilder(compression)
        self.created = created
        self.data: bytes | None = None  # built (with its sequence) when first sent, then resent unchanged
        self.attempts = 0

    @abc.abstractmethod
    def complete(self, base_offset: int, error: BaseException | None) -> None:
        """Tell the batch's waiters: acknowledged at base_offset, or failed with error."""


class Verdict:
    """What to do with the batches of one answered (or failed) request.

    retry: they are back at the head of their queue and go again after the backoff; refresh the topic's
    metadata first. leaderless: the broker that answered could not name a leader, so ask the others first.
    completions: (batch, base offset or -1, error or None) to complete, then release() the batches."""

    __slots__ = ("retry", "leaderless", "error", "completions")

    def __init__(self, retry: bool, leaderless: bool, error: LogbrokerError | None,
                 completions: list[tuple[CoreBatch, int, LogbrokerError | None]]) -> None:
        self.retry = retry
        self.leaderless = leaderless
        self.error = error
        self.completions = completions

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
        producer_id: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_producer_options(acks, compression, partitioner)
        self.new_batch = new_batch
        self.new_future = new_future
        self.wake = wake
        self.clock = clock
        self.acks = ACKS[acks]
        # Idempotence: a random 62-bit producer id (no broker round trip to allocate one, chosen by the caller)
        # and a sequence per partition let the leader recognise a batch retried after a lost answer.
        self.idempotent = enable_idempotence
        self.producer_id = producer_id
        self.sequences: dict[Slot, int] = {}
        self.linger_s = linger_ms / 1000
        self.batch_size = batch_size
        self.compression = rec.COMPRESSION_CODECS[compression]
        self.max_request_bytes = max_request_bytes
        self.buffer_memory = buffer_memory
        self.delivery_timeout_s = delivery_timeout_ms / 1000
        self.max_block_s = max_block_ms / 1000
        self.partitioner = StickyPartitioner() if partitioner == "sticky" else RoundRobinPartitioner()
        self.partition_counts: dict[str, int] = {}  # filled by the I/O layer from metadata
        self.open: dict[Slot, CoreBatch] = {}
        self.ready: dict[Slot, deque[CoreBatch]] = {}
        self.in_flight: set[Slot] = set()
        self.retry_at: dict[Slot, float] = {}  # backoff: no resend of a partition before then
        self.buffered_bytes = 0
        self.unfinished = 0  # batches not yet completed and released
        self.failures = FailureTally()  # since the last flush()
        self.closed = False  # no more retries: what fails now fails for good

    # ------------------------------------------------------------------------------ caller side

    def append(self, topic: str, value: Any, key: Any, headers: Headers | None, partition: int | None,
               timestamp_ms: int | None, count: int) -> Any:
        """Add one record to its partition's open batch (the hot path: per record, no allocation a batch could
        share). count is the topic's partition count. Returns new_future(batch, index, timestamp_ms)."""
        if value.__class__ is str:
            value = value.encode()
        if key.__class__ is str:
            key = key.encode()
        partition = choose_partition(topic, key, partition, count, self.partitioner)
        if timestamp_ms is None:
            timestamp_ms = time.time_ns() // 1_000_000
        payload_bytes = check_record_size(topic, partition, key, value, self.max_request_bytes)
        record_bytes = record_size_bound(payload_bytes, headers)
        slot = (topic, partition)
        batch = self.open.get(slot)
        if batch is not None and batch.builder.size_bytes + record_bytes > self.batch_size:
            self.seal(slot, batch)  # a record that would overfill the batch starts a new one
            self.wake()
            batch = None
        if batch is None:
            batch = self.open[slot] = self.new_batch(topic, partition, self.compression, self.clock())
            self.unfinished += 1
            self.buffered_bytes += batch.builder.size_bytes  # its header: release() frees the whole size
            self.wake()  # once per batch: the sender must start this batch's linger clock
        builder = batch.builder
        before = builder.size_bytes
        index = builder.append(timestamp_ms, key, value, headers or ())
        self.buffered_bytes += builder.size_bytes - before
        if builder.size_bytes >= self.batch_size:
            self.seal(slot, batch)
            self.wake()
        return self.new_future(batch, index, timestamp_ms)

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
        """Seal batches older than linger_ms; return how long the sender may sleep before something is due."""
        now = self.clock()
        next_due = IDLE_WAIT_S
        for slot, batch in list(self.open.items()):
            due = batch.created + self.linger_s - now
            if due <= 0:
                self.seal(slot, batch)
            else:
                next_due = min(next_due, due)
        for retry_at in self.retry_at.values():
            if retry_at > now:
                next_due = min(next_due, retry_at - now)
        return next_due

    def take_sendable(self) -> list[tuple[Slot, list[CoreBatch]]]:
        """The next request of each partition that may send now (nothing in flight, backoff over): up to
        MAX_BATCHES_PER_REQUEST batches from the head of its queue, within max_request_bytes."""
        now = self.clock()
        taken = []
        for slot, queue in self.ready.items():
            if not queue or slot in self.in_flight or self.retry_at.get(slot, 0.0) > now:
                continue
            picked = [queue.popleft()]
            size = picked[0].builder.size_bytes
            while (queue and len(picked) < MAX_BATCHES_PER_REQUEST
                   and size + queue[0].builder.size_bytes <= self.max_request_bytes):
                size += queue[0].builder.size_bytes
                picked.append(queue.popleft())
            taken.append((slot, picked))
            self.in_flight.add(slot)
        return taken

    def request_records(self, slot: Slot, batches: Sequence[CoreBatch]) -> bytes:
        """The records field of the request: each batch built once (taking its sequences), resent as built."""
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
        sequence = self.sequences.get(slot, 0)
        self.sequences[slot] = (sequence + batch.builder.count) & 0x7FFFFFFF
        return batch.builder.build(producer_id=self.producer_id, producer_epoch=0, base_sequence=sequence)

    def on_answer(self, slot: Slot, batches: list[CoreBatch], result: pb.PartitionProduceResult | None,
                  error: LogbrokerError | None) -> Verdict:
        """The partition's answer (result) or the failure to get one (error): requeue, or say how each batch
        completes. The caller completes them (outside any lock: callbacks run user code), then release()s."""
        leaderless = False
        if result is not None and result.error_code:
            error = error_for(result.error_code, result.error_message, *slot)
            # That broker cannot say who leads (it may be cut off from its peers): ask the others first.
            leaderless = result.error_code in LEADERLESS_CODES and not result.leader.leader_address
        if error is not None:
            refused = refused_batch(error, [len(b.data or b"") for b in batches])
            if refused is not None:
                return self._fail_one_resend_rest(slot, batches, refused, error, leaderless)
        error = explain_record_too_large(error, *slot, [(b.builder.count, len(b.data or b"")) for b in batches])
        if error is not None and error.retriable and self.may_retry(batches):
            log.info("%s-%d: %s; retrying in %d ms", slot[0], slot[1], error, RETRY_BACKOFF_MS)
            # back at the head of the queue: a partition's batches keep their order
            self.ready.setdefault(slot, deque()).extendleft(reversed(batches))
            self.retry_at[slot] = max(self.retry_at.get(slot, 0.0), self.clock() + RETRY_BACKOFF_MS / 1000)
            self.in_flight.discard(slot)
            return Verdict(True, leaderless, error, [])
        if error is not None:
            failed = sum(b.builder.count for b in batches)
            log.warning("%s-%d: %d record(s) failed: %s", slot[0], slot[1], failed, error)
            self.failures.add(failed, error)
            return Verdict(False, leaderless, error, [(b, -1, error) for b in batches])
        assert result is not None
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

    def _fail_one_resend_rest(self, slot: Slot, batches: list[CoreBatch], refused: int, error: LogbrokerError,
                              leaderless: bool) -> Verdict:
        """The broker refuses a request whole for one oversized batch; the others go again at once, in order
        (their sequences stay theirs: the broker accepts a gap where the refused batch was)."""
        bad = batches[refused]
        error = explain_record_too_large(error, *slot, [(bad.builder.count, len(bad.data or b""))]) or error
        log.warning("%s-%d: %d record(s) failed: %s", slot[0], slot[1], bad.builder.count, error)
        self.ready.setdefault(slot, deque()).extendleft(reversed([b for b in batches if b is not bad]))
        self.failures.add(bad.builder.count, error)
        return Verdict(False, leaderless, error, [(bad, -1, error)])

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
        """The partition may send again; the batches' memory is free (after they were completed)."""
        freed = 0
        for batch in batches:
            freed += batch.builder.size_bytes
            batch.builder = None  # type: ignore[assignment]  # the record bytes can go now
            batch.data = None
        self.in_flight.discard(slot)
        self.buffered_bytes -= freed
        self.unfinished -= len(batches)
