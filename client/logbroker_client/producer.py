"""Producer: batches records per partition and sends them from a background thread.

Everything the producer decides (the accumulator, sequences, what to send next, what each answer means)
is in producer_core.py, shared with the AsyncProducer; this module does the threading and the gRPC calls.
The caller's thread does the per-record work: pick a partition, append the encoded record to the
partition's open batch, return a RecordFuture. A RecordFuture is two slots (its batch, its index);
the batch owns the one Event, the result and the callbacks, so a record costs no lock or condition
of its own. The sender thread seals batches when full or when `linger_ms` passes, builds the bytes
(header, CRC, zstd), and sends one Produce request per leader broker carrying every ready partition (all of
a partition's new ready batches in one entry), with up to max_in_flight_requests_per_connection (5) batches
of a partition in flight; the core keeps a partition's batches in the order they were sent, retries
included.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from logbroker_client.connection import DEFAULT_REQUEST_TIMEOUT_MS, Connection, translate_rpc_error
from logbroker_client.data_channel import DataChannel
from logbroker_client.data_wire import Method
from logbroker_client.errors import BrokerUnavailableError, LogbrokerError
from logbroker_client.metadata import ClusterMetadata
from logbroker_client.producer_core import (  # noqa: F401  (re-exported: the producer's public constants)
    ACKS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_BUFFER_MEMORY,
    DEFAULT_DELIVERY_TIMEOUT_MS,
    DEFAULT_LINGER_MS,
    DEFAULT_MAX_BLOCK_MS,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_METADATA_MAX_AGE_MS,
    DELIVER_AT_HEADER,
    RECORD_OVERHEAD_BYTES,
    RETRY_BACKOFF_MS,
    CoreBatch,
    FailureTally,
    Headers,
    ProducerCore,
    Slot,
    check_producer_options,
    check_record_size,
    complete_all,
    delivery_headers,
    explain_record_too_large,
    match_results,
    partition_count_stale,
    priority_lane,
    record_size_bound,
    requests_by_leader,
    whole_ms,
)
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.throttle import client_id_metadata, default_producer_client_id
from logbroker_client.types import RecordMetadata

log = logging.getLogger("logbroker_client.producer")



class ProducerBatch(CoreBatch):
    """A batch whose outcome threads wait for: one Event and the callbacks of its records."""

    __slots__ = ("base_offset", "error", "event", "callbacks", "callback_lock")

    def __init__(self, topic: str, partition: int, compression: int, created: float) -> None:
        super().__init__(topic, partition, compression, created)
        self.base_offset = -1
        self.error: BaseException | None = None
        self.event = threading.Event()
        self.callbacks: list[tuple[RecordFuture, Callable[[RecordFuture], Any]]] = []
        self.callback_lock = threading.Lock()

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
        event = batch.event
        if not event.is_set() and not event.wait(timeout):  # is_set first: Event.wait takes a Condition's lock
            raise TimeoutError(f"record to {batch.topic}-{batch.partition} not acknowledged within {timeout}s")
        if batch.error is not None:
            raise batch.error
        offset = batch.base_offset + self._index if batch.base_offset >= 0 else -1
        return RecordMetadata(batch.topic, batch.partition, offset, self._timestamp_ms)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        event = self._batch.event
        if not event.is_set() and not event.wait(timeout):
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
        max_in_flight_requests_per_connection: int = DEFAULT_MAX_IN_FLIGHT,
        metadata_max_age_ms: int = DEFAULT_METADATA_MAX_AGE_MS,
        client_id: str | None = None,
    ) -> None:
        self._wakeup = threading.Event()
        # A topic's partition count is asked again after this long (Kafka's metadata.max.age.ms), so partitions
        # added to a topic get records; a record sent to a partition beyond the known count asks at once.
        self._metadata_max_age_s = metadata_max_age_ms / 1000
        self._core = ProducerCore(
            new_batch=ProducerBatch, new_future=RecordFuture, wake=self._wakeup.set, acks=acks, linger_ms=linger_ms,
            batch_size=batch_size, compression=compression, partitioner=partitioner,
            max_request_bytes=max_request_bytes, buffer_memory=buffer_memory,
            delivery_timeout_ms=delivery_timeout_ms, max_block_ms=max_block_ms,
            enable_idempotence=enable_idempotence,
            max_in_flight_requests_per_connection=max_in_flight_requests_per_connection,
            producer_id=random.getrandbits(62))
        self.acks = self._core.acks
        self._request_timeout_s = request_timeout_ms / 1000
        self._metadata = ClusterMetadata(bootstrap, request_timeout_ms)
        # Sent with every produce: the brokers' quotas are per client id (default: one per producer).
        self.client_id = client_id or default_producer_client_id()
        self._metadata.call_metadata = client_id_metadata(self.client_id)
        self._lock = threading.Lock()  # guards the core: the caller's threads and the sender thread share it
        self._space = threading.Condition(self._lock)
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
        then. priority k > 0 sends it to the topic's priority lane `<topic>.p<k>` (lanes.py), which must exist.
        Blocks up to max_block_ms while buffer_memory is full, then raises RequestTimedOutError."""
        if self._closed:
            raise LogbrokerError("send() on a closed producer")
        if priority is not None:
            topic = priority_lane(topic, priority)
        if deliver_at_ms is not None or delay_ms is not None:
            headers = delivery_headers(headers, deliver_at_ms, delay_ms)
        core = self._core
        count = core.partition_counts.get(topic)
        if count is None or (partition is not None and partition >= count):  # partition_count_stale, inlined
            count = self._partition_count(topic)
        if core.buffered_bytes >= core.buffer_memory:
            self._wait_for_space()
        with self._lock:
            return core.append(topic, value, key, headers, partition, timestamp_ms, count)  # type: ignore[no-any-return]

    def _partition_count(self, topic: str) -> int:
        """The topic's partition count: from the cached metadata the first time, from a broker when the count
        known may be out of date (partitions beyond it named, or forgotten as older than metadata_max_age_ms)."""
        if topic in self._core.counts_asked_s:
            self._metadata.refresh([topic])
        asked_s = time.monotonic()
        count = self._metadata.partitions_for(topic)
        with self._lock:
            self._core.set_partition_count(topic, count, asked_s)
        return count

    def _wait_for_space(self) -> None:
        self._wakeup.set()
        core = self._core
        deadline = time.monotonic() + core.max_block_s
        with self._space:
            while core.buffer_full():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise core.buffer_full_error()
                self._space.wait(remaining)

    def flush(self, timeout: float | None = None, *, raise_on_failure: bool = False) -> int:
        """Send everything queued and wait until every record is acknowledged or has failed.

        Returns how many records failed since the previous flush() (0: every one was acknowledged); with
        raise_on_failure=True, raises DeliveryFailedError summing those failures up instead. Each failed
        record's future holds its own error either way."""
        with self._lock:
            self._core.seal_all()
        self._wakeup.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._core.unfinished:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"flush: {self._core.unfinished} batch(es) still unacknowledged after {timeout}s")
                self._idle.wait(remaining if remaining is not None else 1.0)
        with self._lock:
            failures = self._core.take_failures()
        return failures.report(raise_on_failure)

    def close(self, timeout: float | None = None) -> None:
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            self._closed = self._core.closed = True
            self._wakeup.set()
            self._sender.join(timeout=5)
            self._metadata.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ sender side

    def _run_sender(self) -> None:
        core = self._core
        while not self._closed or core.has_work():
            with self._lock:
                core.forget_old_partition_counts(self._metadata_max_age_s, time.monotonic())
                wait_s = core.seal_lingering()
                taken = core.take_sendable()
            if taken:
                self._send_by_leader(taken)
            self._wakeup.wait(wait_s)
            self._wakeup.clear()

    def _send_by_leader(self, taken: list[tuple[Slot, list[CoreBatch]]]) -> None:
        """One request per leader broker, carrying an entry of each of its ready partitions."""
        connections: dict[str, Connection] = {}
        items = []
        for slot, batches in taken:
            try:
                conn = self._metadata.leader_connection(*slot)
                if batches[0].attempts > 0:  # the last attempt failed: if no replica answers, fail now
                    self._metadata.raise_if_offline(*slot)
            except LogbrokerError as exc:
                self._on_answer(slot, batches, None, exc, None)
                continue
            connections[conn.address] = conn
            items.append((slot, batches, conn.address))
        for address, parts in requests_by_leader(items, self._core.max_request_bytes):
            self._send(connections[address], parts)

    def _send(self, conn: Connection, parts: list[tuple[Slot, list[CoreBatch]]]) -> None:
        core = self._core
        # The sender thread alone builds the bytes of batches handed out to it.
        request = pb.ProduceRequest(acks=core.acks, timeout_ms=int(self._request_timeout_s * 1000), partitions=[
            pb.PartitionRecords(topic=slot[0], partition=slot[1], records=core.request_records(slot, batches))
            for slot, batches in parts])
        channel = self._metadata.data_channel(conn.address)
        if channel is not None:
            self._send_on_data_port(channel, request, parts)
            return
        call = conn.broker.Produce.future(request, timeout=self._request_timeout_s,
                                          metadata=self._metadata.call_metadata)
        if core.acks == 0:  # nobody waits for an answer, but close() must wait for the bytes to leave
            for _, batches in parts:
                complete_all(core.unacknowledged(batches))
            call.add_done_callback(lambda f: self._release_all(parts))
            return
        call.add_done_callback(lambda f: self._on_call_done(parts, f, conn.address))

    def _send_on_data_port(self, channel: DataChannel, request: pb.ProduceRequest,
                           parts: list[tuple[Slot, list[CoreBatch]]]) -> None:
        core = self._core
        if core.acks == 0:  # nobody waits for an answer, but close() must wait for the bytes to leave
            for _, batches in parts:
                complete_all(core.unacknowledged(batches))

            def on_done(response: pb.ProduceResponse | None, error: LogbrokerError | None) -> None:
                self._release_all(parts)
        else:
            def on_done(response: pb.ProduceResponse | None, error: LogbrokerError | None) -> None:
                self._on_response(parts, response, error, channel.address)

        channel.call(Method.PRODUCE, request, pb.ProduceResponse, self._request_timeout_s, on_done)

    def _on_call_done(self, parts: list[tuple[Slot, list[CoreBatch]]], call: Any, address: str) -> None:
        try:
            response = call.result()
        except grpc.RpcError as exc:
            self._on_response(parts, None, translate_rpc_error(exc, address), address)
            return
        except Exception as exc:
            self._on_response(parts, None, LogbrokerError(f"produce to {address} failed: {exc}"), address)
            return
        self._on_response(parts, response, None, address)

    def _on_response(self, parts: list[tuple[Slot, list[CoreBatch]]], response: pb.ProduceResponse | None,
                     error: LogbrokerError | None, address: str) -> None:
        """The answer to a Produce (or the error it failed with as a whole), from either port."""
        if response is None:
            if isinstance(error, BrokerUnavailableError):
                self._metadata.mark_unreachable(address)
            for slot, batches in parts:
                self._on_answer(slot, batches, None, error, address)
            return
        if response.throttle_time_ms:
            with self._lock:
                self._core.pause(self._led_by(address, [slot for slot, _ in parts]), response.throttle_time_ms)
        for slot, batches, result, missing in match_results(parts, response.results):
            self._on_answer(slot, batches, result, missing, address)

    def _led_by(self, address: str, answered: list[Slot]) -> list[Slot]:
        """The answered partitions and every queued one the same broker leads: the broker asked for a pause."""
        return [*answered, *(slot for slot in self._core.ready
                             if slot not in answered and self._metadata.leader_address(*slot) == address)]

    def _on_answer(self, slot: Slot, batches: list[CoreBatch], result: pb.PartitionProduceResult | None,
                   error: LogbrokerError | None, address: str | None) -> None:
        with self._lock:
            verdict = self._core.on_answer(slot, batches, result, error)
        if verdict.leaderless and address:
            self._metadata.mark_leaderless(address)
        if verdict.retry:
            if verdict.refresh_metadata:
                self._metadata.invalidate(slot[0])
            self._wakeup.set()
            return
        complete_all(verdict.completions)  # outside the lock: callbacks run user code
        self._release(slot, verdict.finished)

    def _release_all(self, parts: list[tuple[Slot, list[CoreBatch]]]) -> None:
        for slot, batches in parts:
            self._release(slot, batches)

    def _release(self, slot: Slot, batches: Sequence[CoreBatch]) -> None:
        """The partition may send again; the batches' memory is free."""
        with self._lock:
            self._core.release(slot, batches)
            self._space.notify_all()
        with self._idle:
            self._idle.notify_all()
        self._wakeup.set()
