"""Producer: batches records per partition and sends them from a background thread.

The caller's thread does the per-record work: pick a partition, append the encoded record to the
partition's open batch, return a RecordFuture. A RecordFuture is two slots (its batch, its index);
the batch owns the one Event, the result and the callbacks, so a record costs no lock or condition
of its own. The sender thread seals batches when full or when `linger_ms` passes, builds the bytes
(header, CRC, zstd), and keeps at most one request in flight per partition so batches of a
partition land in the order they were sent, retries included.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from logbroker_client import records as rec
from logbroker_client.connection import DEFAULT_REQUEST_TIMEOUT_MS, translate_rpc_error
from logbroker_client.errors import (
    BrokerUnavailableError,
    DeliveryFailedError,
    LogbrokerError,
    RecordTooLargeError,
    RequestTimedOutError,
    error_for,
)
from logbroker_client.lanes import check_priority, lane_topic
from logbroker_client.metadata import ClusterMetadata
from logbroker_client.partitioner import RoundRobinPartitioner, StickyPartitioner, choose_partition
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.types import RecordMetadata

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

DELIVER_AT_HEADER = "lb.deliver.at.ms"  # the broker holds such a record back from share consumers until then

Headers = Sequence[tuple[str, bytes | None]]


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


def check_producer_options(acks: str | int, compression: str) -> None:
    """The settings every producer shares, checked the same way (sync and asyncio)."""
    if acks not in ACKS:
        raise ValueError(f"acks must be 'all', 1 or 0, got {acks!r}")
    if compression not in rec.COMPRESSION_CODECS:
        raise ValueError(f"compression must be one of {sorted(rec.COMPRESSION_CODECS)}, got {compression!r}")


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


class ProducerBatch:
    """Records for one partition, sent and acknowledged together."""

    __slots__ = ("topic", "partition", "builder", "created", "data", "base_offset",
                 "error", "event", "callbacks", "attempts", "callback_lock")

    def __init__(self, topic: str, partition: int, compression: int, created: float) -> None:
        self.topic = topic
        self.partition = partition
        self.builder = rec.BatchBuilder(compression)
        self.created = created
        self.data: bytes | None = None
        self.base_offset = -1
        self.error: BaseException | None = None
        self.event = threading.Event()
        self.callbacks: list[tuple[RecordFuture, Callable[[RecordFuture], Any]]] = []
        self.callback_lock = threading.Lock()
        self.attempts = 0

    def complete(self, base_offset: int, error: BaseException | None) -> None:
        self.base_offset = base_offset
        self.error = error
        with self.callback_lock:  # a callback added from now on runs at once in add_done_callback
            self.event.set()
            callbacks, self.callbacks = self.callbacks, []
        for future, callback in callbacks:
            run_callback(callback, future)


class RecordFuture:
    """A concurrent.futures-style future for one record: result() gives its RecordMetadata."""

    __slots__ = ("_batch", "_index", "_timestamp_ms")

    def __init__(self, batch: ProducerBatch, index: int, timestamp_ms: int) -> None:
        self._batch = batch
        self._index = index
        self._timestamp_ms = timestamp_ms

    def done(self) -> bool:
        return self._batch.event.is_set()

    def result(self, timeout: float | None = None) -> RecordMetadata:
        batch = self._batch
        if not batch.event.wait(timeout):
            raise TimeoutError(f"record to {batch.topic}-{batch.partition} not acknowledged within {timeout}s")
        if batch.error is not None:
            raise batch.error
        offset = batch.base_offset + self._index if batch.base_offset >= 0 else -1
        return RecordMetadata(batch.topic, batch.partition, offset, self._timestamp_ms)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self._batch.event.wait(timeout):
            raise TimeoutError("record not acknowledged in time")
        return self._batch.error

    def add_done_callback(self, fn: Callable[[RecordFuture], Any]) -> None:
        batch = self._batch
        with batch.callback_lock:
            if not batch.event.is_set():
                batch.callbacks.append((self, fn))
                return
        run_callback(fn, self)


def run_callback(fn: Callable[[RecordFuture], Any], future: RecordFuture) -> None:
    try:
        fn(future)
    except Exception:
        log.exception("a record's done-callback raised; the producer carries on")


class Producer:
    def __init__(
        self,
        bootstrap: str | Sequence[str] | None = None,
        *,
        acks: str | int = "all",
        linger_ms: float = DEFAULT_LINGER_MS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        compression: str = "none",
        partitioner: str = "sticky",
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        buffer_memory: int = DEFAULT_BUFFER_MEMORY,
        request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS,
        delivery_timeout_ms: int = DEFAULT_DELIVERY_TIMEOUT_MS,
        max_block_ms: int = DEFAULT_MAX_BLOCK_MS,
        enable_idempotence: bool = True,
    ) -> None:
        check_producer_options(acks, compression)
        if partitioner not in ("sticky", "round_robin"):
            raise ValueError(f"partitioner must be 'sticky' or 'round_robin', got {partitioner!r}")
        self.acks = ACKS[acks]
        # Idempotence: a random 62-bit producer id (no broker round trip to allocate one) and a sequence
        # per partition let the leader recognise a batch retried after a lost answer and not store it twice.
        self._idempotent = enable_idempotence
        self._producer_id = random.getrandbits(62)
        self._sequences: dict[tuple[str, int], int] = {}
        self._linger_s = linger_ms / 1000
        self._batch_size = batch_size
        self._compression = rec.COMPRESSION_CODECS[compression]
        self._max_request_bytes = max_request_bytes
        self._buffer_memory = buffer_memory
        self._request_timeout_s = request_timeout_ms / 1000
        self._delivery_timeout_s = delivery_timeout_ms / 1000
        self._max_block_s = max_block_ms / 1000
        self._metadata = ClusterMetadata(bootstrap, request_timeout_ms)
        self._null_key_partitioner = StickyPartitioner() if partitioner == "sticky" else RoundRobinPartitioner()
        self._partition_counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._wakeup = threading.Event()
        self._open: dict[tuple[str, int], ProducerBatch] = {}
        self._ready: dict[tuple[str, int], deque[ProducerBatch]] = {}
        self._in_flight: set[tuple[str, int]] = set()
        self._retry_at: dict[tuple[str, int], float] = {}  # backoff: no resend of a partition before then
        self._buffered_bytes = 0
        self._unfinished = 0
        self._failures = FailureTally()  # since the last flush(), guarded by _lock
        self._idle = threading.Condition(threading.Lock())
        self._closed = False
        self._sender = threading.Thread(target=self._run_sender, name="logbroker-producer", daemon=True)
        self._sender.start()

    # ------------------------------------------------------------------------------ caller side

    def send(
        self,
        topic: str,
        value: bytes | str | None = None,
        key: bytes | str | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        *,
        deliver_at_ms: int | None = None,
        delay_ms: int | None = None,
        priority: int | None = None,
    ) -> RecordFuture:
        """Queue a record; the future resolves to its RecordMetadata once the broker acknowledges it.

        deliver_at_ms (ms since the epoch) or delay_ms (from now) hold the record back from share consumers until
        then. priority k > 0 sends it to the topic's priority lane `<topic>.p<k>` (lanes.py), which must exist."""
        if self._closed:
            raise LogbrokerError("send() on a closed producer")
        if priority is not None:
            topic = priority_lane(topic, priority)
        if deliver_at_ms is not None or delay_ms is not None:
            headers = delivery_headers(headers, deliver_at_ms, delay_ms)
        if value.__class__ is str:
            value = value.encode()  # type: ignore[union-attr]
        if key.__class__ is str:
            key = key.encode()  # type: ignore[union-attr]
        count = self._partition_counts.get(topic)
        if count is None:
            count = self._partition_counts[topic] = self._metadata.partitions_for(topic)
        partition = choose_partition(topic, key, partition, count, self._null_key_partitioner)  # type: ignore[arg-type]
        if timestamp_ms is None:
            timestamp_ms = time.time_ns() // 1_000_000
        if self._buffered_bytes >= self._buffer_memory:
            self._wait_for_space()
        payload_bytes = check_record_size(topic, partition, key, value, self._max_request_bytes)  # type: ignore[arg-type]
        record_bytes = record_size_bound(payload_bytes, headers)
        slot = (topic, partition)
        with self._lock:
            batch = self._open.get(slot)
            if batch is not None and batch.builder.size_bytes + record_bytes > self._batch_size:
                self._seal(slot, batch)
                self._wakeup.set()
                batch = None
            if batch is None:
                batch = self._open[slot] = ProducerBatch(topic, partition, self._compression, time.monotonic())
                self._unfinished += 1
                self._wakeup.set()  # once per batch: the sender must start this batch's linger clock
            builder = batch.builder
            before = builder.size_bytes
            index = builder.append(timestamp_ms, key, value, headers or ())  # type: ignore[arg-type]
            self._buffered_bytes += builder.size_bytes - before
            if builder.size_bytes >= self._batch_size:
                self._seal(slot, batch)
                self._wakeup.set()
        return RecordFuture(batch, index, timestamp_ms)

    def _wait_for_space(self) -> None:
        self._wakeup.set()
        deadline = time.monotonic() + self._max_block_s
        with self._space:
            while self._buffered_bytes >= self._buffer_memory:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RequestTimedOutError(
                        f"producer buffer full ({self._buffered_bytes} bytes) for {self._max_block_s}s; "
                        "the brokers are not keeping up or are unreachable")
                self._space.wait(remaining)

    def _seal(self, slot: tuple[str, int], batch: ProducerBatch) -> None:
        """Move an open batch to the partition's send queue (caller holds the lock)."""
        del self._open[slot]
        self._ready.setdefault(slot, deque()).append(batch)
        self._null_key_partitioner.on_batch_sealed(slot[0], slot[1], self._partition_counts.get(slot[0], 1))

    def flush(self, timeout: float | None = None, *, raise_on_failure: bool = False) -> int:
        """Send everything queued and wait until every record is acknowledged or has failed.

        Returns how many records failed since the previous flush() (0: every one was acknowledged); with
        raise_on_failure=True, raises DeliveryFailedError summing those failures up instead. Each failed
        record's future holds its own error either way."""
        with self._lock:
            for slot, batch in list(self._open.items()):
                self._seal(slot, batch)
        self._wakeup.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._unfinished:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"flush: {self._unfinished} batch(es) still unacknowledged after {timeout}s")
                self._idle.wait(remaining if remaining is not None else 1.0)
        with self._lock:
            failures, self._failures = self._failures, FailureTally()
        return failures.report(raise_on_failure)

    def close(self, timeout: float | None = None) -> None:
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            self._closed = True
            self._wakeup.set()
            self._sender.join(timeout=5)
            self._metadata.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ sender side

    def _run_sender(self) -> None:
        while not self._closed or self._open or any(self._ready.values()):
            wait_s = self._seal_lingering()
            self._dispatch_ready()
            self._wakeup.wait(wait_s)
            self._wakeup.clear()

    def _seal_lingering(self) -> float:
        """Seal batches older than linger_ms; return how long until the next one is due."""
        now = time.monotonic()
        next_due = 0.05
        with self._lock:
            for slot, batch in list(self._open.items()):
                due = batch.created + self._linger_s - now
                if due <= 0:
                    self._seal(slot, batch)
                else:
                    next_due = min(next_due, due)
            for retry_at in self._retry_at.values():
                if retry_at > now:
                    next_due = min(next_due, retry_at - now)
        return next_due

    def _dispatch_ready(self) -> None:
        now = time.monotonic()
        with self._lock:
            slots = [s for s, q in self._ready.items()
                     if q and s not in self._in_flight and self._retry_at.get(s, 0.0) <= now]
            taken = {}
            for slot in slots:
                queue = self._ready[slot]
                picked = [queue.popleft()]
                size = picked[0].builder.size_bytes
                while (queue and len(picked) < MAX_BATCHES_PER_REQUEST
                       and size + queue[0].builder.size_bytes <= self._max_request_bytes):
                    size += queue[0].builder.size_bytes
                    picked.append(queue.popleft())
                taken[slot] = picked
                self._in_flight.add(slot)
        for slot, batches in taken.items():
            self._send(slot, batches)

    def _send(self, slot: tuple[str, int], batches: list[ProducerBatch]) -> None:
        retry = batches[0].attempts > 0
        for batch in batches:
            if batch.data is None:
                batch.data = self._build(slot, batch)
            batch.attempts += 1
        datas = [b.data for b in batches if b.data is not None]
        records = datas[0] if len(datas) == 1 else b"".join(datas)  # one batch: no extra copy
        request = pb.ProduceRequest(acks=self.acks, timeout_ms=int(self._request_timeout_s * 1000), partitions=[
            pb.PartitionRecords(topic=slot[0], partition=slot[1], records=records)])
        try:
            conn = self._metadata.leader_connection(*slot)
            if retry:  # the last attempt failed: if no replica of the partition answers, fail now, not in minutes
                self._metadata.raise_if_offline(*slot)
        except LogbrokerError as exc:
            self._on_result(slot, batches, None, exc)
            return
        call = conn.broker.Produce.future(request, timeout=self._request_timeout_s)
        if self.acks == 0:  # nobody waits for an answer, but close() must wait for the bytes to leave
            self._complete(batches, -1, None)
            call.add_done_callback(lambda f: self._release(slot, batches))
            return
        call.add_done_callback(lambda f: self._on_call_done(slot, batches, f, conn.address))

    def _build(self, slot: tuple[str, int], batch: ProducerBatch) -> bytes:
        """Seal the bytes once; a retry resends them unchanged, sequence included, so the broker can dedupe."""
        if not self._idempotent:
            return batch.builder.build()
        sequence = self._sequences.get(slot, 0)
        self._sequences[slot] = (sequence + batch.builder.count) & 0x7FFFFFFF
        return batch.builder.build(producer_id=self._producer_id, producer_epoch=0, base_sequence=sequence)

    def _on_call_done(self, slot: tuple[str, int], batches: list[ProducerBatch], call: Any, address: str) -> None:
        try:
            response = call.result()
        except grpc.RpcError as exc:
            error = translate_rpc_error(exc, address)
            if isinstance(error, BrokerUnavailableError):
                self._metadata.mark_unreachable(address)
            self._on_result(slot, batches, None, error)
            return
        except Exception as exc:
            self._on_result(slot, batches, None, LogbrokerError(f"produce to {address} failed: {exc}"))
            return
        result = response.results[0]
        if result.error_code in (pb.ErrorCode.NOT_LEADER, pb.ErrorCode.NOT_ENOUGH_REPLICAS) \
                and not result.leader.leader_address:
            # That broker cannot say who leads (it may be cut off from its peers): ask the others first.
            self._metadata.mark_leaderless(address)
        self._on_result(slot, batches, result, None)

    def _on_result(self, slot: tuple[str, int], batches: list[ProducerBatch],
                   result: pb.PartitionProduceResult | None, error: LogbrokerError | None) -> None:
        if result is not None and result.error_code:
            error = error_for(result.error_code, result.error_message, *slot)
        if error is not None:
            refused = refused_batch(error, [len(b.data or b"") for b in batches])
            if refused is not None:
                self._fail_one_resend_rest(slot, batches, refused, error)
                return
        error = explain_record_too_large(error, *slot, [(b.builder.count, len(b.data or b"")) for b in batches])
        if error is not None and error.retriable and self._may_retry(batches):
            log.info("%s-%d: %s; retrying in %d ms", slot[0], slot[1], error, RETRY_BACKOFF_MS)
            self._metadata.invalidate(slot[0])
            with self._lock:  # back at the head of the queue: a partition's batches keep their order
                self._ready.setdefault(slot, deque()).extendleft(reversed(batches))
                self._retry_at[slot] = time.monotonic() + RETRY_BACKOFF_MS / 1000
                self._in_flight.discard(slot)
            self._wakeup.set()
            return
        if error is not None:
            failed = sum(b.builder.count for b in batches)
            log.warning("%s-%d: %d record(s) failed: %s", slot[0], slot[1], failed, error)
            with self._lock:
                self._failures.add(failed, error)
        if result is not None and error is None and len(result.batch_base_offsets) == len(batches):
            for batch, base_offset in zip(batches, result.batch_base_offsets, strict=True):
                batch.complete(base_offset, None)
        else:
            self._complete(batches, result.base_offset if result is not None and error is None else -1, error)
        self._release(slot, batches)

    def _fail_one_resend_rest(self, slot: tuple[str, int], batches: list[ProducerBatch], refused: int,
                              error: LogbrokerError) -> None:
        """The broker refuses a request whole for one oversized batch; the others go again at once, in order
        (their sequences stay theirs: the broker accepts a gap where the refused batch was)."""
        bad = batches[refused]
        error = explain_record_too_large(error, *slot, [(bad.builder.count, len(bad.data or b""))]) or error
        log.warning("%s-%d: %d record(s) failed: %s", slot[0], slot[1], bad.builder.count, error)
        with self._lock:
            self._ready.setdefault(slot, deque()).extendleft(reversed([b for b in batches if b is not bad]))
            self._failures.add(bad.builder.count, error)
        bad.complete(-1, error)
        self._release(slot, [bad])

    @staticmethod
    def _complete(batches: list[ProducerBatch], next_offset: int, error: BaseException | None) -> None:
        """Batches of one request are stored contiguously from next_offset (brokers without batch offsets)."""
        for batch in batches:
            count = batch.builder.count
            batch.complete(next_offset, error)
            if next_offset >= 0:
                next_offset += count

    def _release(self, slot: tuple[str, int], batches: list[ProducerBatch]) -> None:
        """The partition may send again; the batches' memory is free."""
        freed = 0
        for batch in batches:
            freed += batch.builder.size_bytes
            batch.builder = None  # type: ignore[assignment]  # the record bytes can go now
            batch.data = None
        with self._lock:
            self._in_flight.discard(slot)
            self._buffered_bytes -= freed
            self._unfinished -= len(batches)
            self._space.notify_all()
        with self._idle:
            self._idle.notify_all()
        self._wakeup.set()

    def _may_retry(self, batches: list[ProducerBatch]) -> bool:
        return not self._closed and time.monotonic() - batches[0].created < self._delivery_timeout_s
