"""asyncio clients: AsyncProducer, AsyncConsumer and AsyncAdmin over grpc.aio.

They share the codec, the partitioners, the metadata cache and the error classes with the
synchronous clients; only the waiting differs. Use them inside a running event loop:

    async with AsyncProducer(acks="all") as producer:
        meta = await producer.send_and_wait("orders", b"...", key=b"user-42")
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from logbroker_client import records as rec
from logbroker_client.admin import (
    DESCRIBE_ATTEMPT_TIMEOUT_S,
    RetryNote,
    raise_described_errors,
    raise_topic_errors,
    topic_description,
)
from logbroker_client.connection import (
    DEFAULT_REQUEST_TIMEOUT_MS,
    AsyncConnection,
    rpc_code,
    translate_rpc_error,
    unreachable_reason,
)
from logbroker_client.consumer import (
    DEFAULT_FETCH_MAX_WAIT_MS,
    DEFAULT_MAX_PARTITION_FETCH_BYTES,
    RESETS,
    decode_batch,
)
from logbroker_client.errors import (
    BrokerUnavailableError,
    CorruptBatchError,
    LogbrokerError,
    NoBrokerAnsweredError,
    OffsetOutOfRangeError,
    RequestTimedOutError,
    error_for,
)
from logbroker_client.metadata import METADATA_TIMEOUT_S, PROBE_TIMEOUT_S, RETRY_BACKOFF_S, MetadataCache, health_state
from logbroker_client.partitioner import StickyPartitioner, choose_partition
from logbroker_client.producer import (
    ACKS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_DELIVERY_TIMEOUT_MS,
    DEFAULT_LINGER_MS,
    DEFAULT_MAX_REQUEST_BYTES,
    MAX_BATCHES_PER_REQUEST,
    RETRY_BACKOFF_MS,
    FailureTally,
    check_producer_options,
    check_record_size,
    explain_record_too_large,
    record_size_bound,
    refused_batch,
)
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.types import ConsumerRecord, OffsetAndTimestamp, RecordMetadata, TopicDescription, TopicPartition


class AsyncMetadata(MetadataCache):
    def __init__(self, bootstrap: str | Sequence[str] | None, request_timeout_ms: int) -> None:
        super().__init__(bootstrap, request_timeout_ms)
        self._connections: dict[str, AsyncConnection] = {}

    def connection(self, address: str) -> AsyncConnection:
        conn = self._connections.get(address)
        if conn is None:
            conn = self._connections[address] = AsyncConnection(address)
        return conn

    async def call(self, method: str, request: Any, address: str | None = None, admin: bool = False,
                   check: Callable[[Any], None] | None = None, attempt_timeout_s: float | None = None) -> Any:
        """Call a broker: the given one (a partition's leader), else the first that answers of every known
        address, asked again while `check` finds the answer retriable, until the request timeout."""
        if address:
            return await self._call_at(address, method, request, admin)
        deadline = time.monotonic() + self.request_timeout_s
        while True:
            try:
                response = await self._first_answer(method, request, admin, attempt_timeout_s, deadline)
                if check is not None:
                    check(response)
                return response
            except LogbrokerError as exc:
                if (not exc.retriable or isinstance(exc, NoBrokerAnsweredError)
                        or time.monotonic() + RETRY_BACKOFF_S >= deadline):
                    raise
                await asyncio.sleep(RETRY_BACKOFF_S)

    async def _call_at(self, address: str, method: str, request: Any, admin: bool) -> Any:
        conn = self.connection(address)
        try:
            return await getattr(conn.admin if admin else conn.broker, method)(request, timeout=self.request_timeout_s)
        except grpc.RpcError as exc:
            error = translate_rpc_error(exc, address)
            if isinstance(error, BrokerUnavailableError):
                self.mark_unreachable(address)
            raise error from None

    async def _first_answer(self, method: str, request: Any, admin: bool, attempt_timeout_s: float | None,
                            deadline: float) -> Any:
        """As ClusterMetadata._first_answer: a broker that gives no answer (or a stuck one) makes way for the next."""
        failures: dict[str, str] = {}
        candidates = self.addresses(for_metadata=True)
        for address in candidates:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            timeout_s = remaining if attempt_timeout_s is None else min(remaining, attempt_timeout_s)
            conn = self.connection(address)
            try:
                return await getattr(conn.admin if admin else conn.broker, method)(request, timeout=timeout_s)
            except grpc.RpcError as exc:
                code = rpc_code(exc)
                stuck = code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout_s < remaining
                if code != grpc.StatusCode.UNAVAILABLE and not stuck:
                    raise translate_rpc_error(exc, address) from None
                self.mark_unreachable(address)
                failures[address] = unreachable_reason(exc)
        if len(failures) == len(candidates):
            raise self.no_broker_answered(failures)
        raise RequestTimedOutError(f"{method}: no broker answered within {self.request_timeout_s:g}s "
                                   f"(tried {', '.join(failures) or 'none'})")

    async def refresh(self, topics: Sequence[str] = ()) -> pb.MetadataResponse:
        response: pb.MetadataResponse = await self.call(
            "Metadata", pb.MetadataRequest(topics=list(topics)),
            attempt_timeout_s=min(self.request_timeout_s, METADATA_TIMEOUT_S))
        self.apply(response)
        return response

    async def probe(self, addresses: Sequence[str], timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, str]:
        """Ask every address's health service at once: UP, NOT_READY, NO_ANSWER or DOWN each."""
        unique = list(dict.fromkeys(addresses))
        states = await asyncio.gather(*(self._probe_one(address, timeout_s) for address in unique))
        return dict(zip(unique, states, strict=True))

    async def _probe_one(self, address: str, timeout_s: float) -> str:
        try:
            response = await self.connection(address).health.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            return health_state(None, exc)
        return health_state(response, None)

    async def brokers(self) -> dict[int, str]:
        """node id -> HOST:PORT of every broker, as the last Metadata answer (or a new one) lists them."""
        if not self.broker_addresses():
            await self.refresh()
        return self.broker_addresses()

    async def broker_states(self) -> dict[int, str]:
        """Each broker of the cluster (as Metadata lists them) and whether it answers now."""
        brokers = await self.brokers()
        states = await self.probe(list(brokers.values()))
        return {node: states[address] for node, address in brokers.items()}

    async def raise_if_offline(self, topic: str, partition: int) -> None:
        """Fail at once, naming the replicas, when the partition has no leader and none of its replicas answers."""
        if not self.suspect_offline(topic, partition):
            return
        brokers = self.broker_addresses()
        replicas = {node: brokers[node] for node in self.replicas_of(topic, partition) if node in brokers}
        states = await self.probe(list(replicas.values()))
        error = self.offline_error(topic, partition, {node: states[a] for node, a in replicas.items()})
        if error is not None:
            raise error

    async def partitions_for(self, topic: str) -> int:
        count = self.cached_count(topic)
        if count is None:
            self.check_topic(await self.refresh([topic]), topic)
            count = self.cached_count(topic)
            if count is None:
                raise LogbrokerError(f"broker returned no metadata for topic {topic!r}")
        return count

    async def leader(self, topic: str, partition: int) -> str:
        await self.partitions_for(topic)
        return self.leader_address(topic, partition) or self.addresses()[0]

    async def close(self) -> None:
        for conn in self._connections.values():
            await conn.close()
        self._connections.clear()


# ------------------------------------------------------------------------------------------ admin

class AsyncAdmin:
    def __init__(self, bootstrap: str | Sequence[str] | None = None,
                 request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS) -> None:
        self._metadata = AsyncMetadata(bootstrap, request_timeout_ms)

    async def create_topic(self, name: str, partitions: int = 1, replication_factor: int = 1,
                           configs: Mapping[str, str] | None = None) -> None:
        topic = pb.NewTopic(name=name, partitions=partitions, replication_factor=replication_factor,
                            configs=dict(configs or {}))
        note = RetryNote(lambda response: raise_topic_errors(response.results))
        try:
            await self._metadata.call("CreateTopics", pb.CreateTopicsRequest(topics=[topic]), admin=True, check=note)
        except LogbrokerError as exc:
            raise note.explain(exc) from None

    async def delete_topic(self, name: str) -> None:
        await self._metadata.call("DeleteTopics", pb.DeleteTopicsRequest(names=[name]), admin=True,
                                  check=lambda response: raise_topic_errors(response.results))

    async def list_topics(self) -> list[str]:
        response = await self._metadata.call("DescribeTopics", pb.DescribeTopicsRequest(), admin=True,
                                             attempt_timeout_s=DESCRIBE_ATTEMPT_TIMEOUT_S)
        return sorted(t.name for t in response.topics)

    async def describe_topics(self, names: Sequence[str] = (), *,
                              broker_states: Mapping[int, str] | None = None) -> list[TopicDescription]:
        """As Admin.describe_topics: a partition whose leader does not answer is offline (leader_id -1)."""
        response = await self._metadata.call(
            "DescribeTopics", pb.DescribeTopicsRequest(names=list(names)), admin=True,
            check=lambda answer: raise_described_errors(answer.topics), attempt_timeout_s=DESCRIBE_ATTEMPT_TIMEOUT_S)
        states = await self.broker_states() if broker_states is None else broker_states
        return [topic_description(t, states) for t in response.topics]

    async def describe_cluster(self) -> pb.MetadataResponse:
        return await self._metadata.refresh()

    async def broker_states(self) -> dict[int, str]:
        """node id -> "up", "not ready", "no answer" or "down", as each broker's gRPC health service answers."""
        return await self._metadata.broker_states()

    async def close(self) -> None:
        await self._metadata.close()

    async def __aenter__(self) -> AsyncAdmin:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --------------------------------------------------------------------------------------- producer

class _AsyncBatch:
    __slots__ = ("topic", "partition", "builder", "done", "created")

    def __init__(self, topic: str, partition: int, compression: int, loop: asyncio.AbstractEventLoop) -> None:
        self.topic = topic
        self.partition = partition
        self.builder = rec.BatchBuilder(compression)
        self.done: asyncio.Future[int] = loop.create_future()  # resolves to the base offset
        self.created = loop.time()


class AsyncRecordFuture:
    """Awaitable: `await future` gives the record's RecordMetadata."""

    __slots__ = ("_batch", "_index", "_timestamp_ms")

    def __init__(self, batch: _AsyncBatch, index: int, timestamp_ms: int) -> None:
        self._batch = batch
        self._index = index
        self._timestamp_ms = timestamp_ms

    def done(self) -> bool:
        return self._batch.done.done()

    async def _result(self) -> RecordMetadata:
        batch = self._batch
        base = await asyncio.shield(batch.done)
        offset = base + self._index if base >= 0 else -1
        return RecordMetadata(batch.topic, batch.partition, offset, self._timestamp_ms)

    def __await__(self) -> Any:
        return self._result().__await__()


class AsyncProducer:
    def __init__(
        self,
        bootstrap: str | Sequence[str] | None = None,
        *,
        acks: str | int = "all",
        linger_ms: float = DEFAULT_LINGER_MS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        compression: str = "none",
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS,
        delivery_timeout_ms: int = DEFAULT_DELIVERY_TIMEOUT_MS,
    ) -> None:
        check_producer_options(acks, compression)
        self.acks = ACKS[acks]
        self._linger_s = linger_ms / 1000
        self._batch_size = batch_size
        self._compression = rec.COMPRESSION_CODECS[compression]
        self._max_request_bytes = max_request_bytes
        self._timeout_ms = request_timeout_ms
        self._metadata = AsyncMetadata(bootstrap, request_timeout_ms)
        self._delivery_timeout_s = delivery_timeout_ms / 1000
        self._producer_id = random.getrandbits(62)  # idempotence, as in the synchronous Producer
        self._sequences: dict[tuple[str, int], int] = {}
        self._sticky = StickyPartitioner()
        self._open: dict[tuple[str, int], _AsyncBatch] = {}
        self._queues: dict[tuple[str, int], deque[_AsyncBatch]] = {}
        self._senders: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._linger_tasks: dict[tuple[str, int], asyncio.TimerHandle] = {}
        self._failures = FailureTally()  # since the last flush()

    async def send(
        self,
        topic: str,
        value: bytes | str | None = None,
        key: bytes | str | None = None,
        headers: Sequence[tuple[str, bytes | None]] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> AsyncRecordFuture:
        """Queue a record; await the returned future for its RecordMetadata."""
        if isinstance(value, str):
            value = value.encode()
        if isinstance(key, str):
            key = key.encode()
        count = await self._metadata.partitions_for(topic)
        partition = choose_partition(topic, key, partition, count, self._sticky)
        record_bytes = record_size_bound(check_record_size(topic, partition, key, value, self._max_request_bytes),
                                         headers)
        timestamp_ms = time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms
        slot = (topic, partition)
        batch = self._open.get(slot)
        if batch is not None and batch.builder.size_bytes + record_bytes > self._batch_size:
            self._seal(slot)  # as the synchronous Producer: a record that would overfill the batch starts a new one
            batch = None
        loop = asyncio.get_running_loop()
        if batch is None:
            batch = self._open[slot] = _AsyncBatch(topic, partition, self._compression, loop)
            self._linger_tasks[slot] = loop.call_later(self._linger_s, self._seal, slot)
        index = batch.builder.append(timestamp_ms, key, value, headers or ())
        if batch.builder.size_bytes >= self._batch_size:
            self._seal(slot)
        return AsyncRecordFuture(batch, index, timestamp_ms)

    async def send_and_wait(self, topic: str, value: bytes | str | None = None, **kwargs: Any) -> RecordMetadata:
        return await (await self.send(topic, value, **kwargs))

    def _seal(self, slot: tuple[str, int]) -> None:
        batch = self._open.pop(slot, None)
        timer = self._linger_tasks.pop(slot, None)
        if timer is not None:
            timer.cancel()
        if batch is None:
            return
        self._queues.setdefault(slot, deque()).append(batch)
        self._sticky.on_batch_sealed(slot[0], slot[1], self._metadata.cached_count(slot[0]) or 1)
        if slot not in self._senders:
            self._senders[slot] = asyncio.get_running_loop().create_task(self._drain(slot))

    async def _drain(self, slot: tuple[str, int]) -> None:
        """One sender per partition: its batches go out one request at a time, in order."""
        queue = self._queues[slot]
        try:
            while queue:
                batches = [queue.popleft()]
                size = batches[0].builder.size_bytes
                while (queue and len(batches) < MAX_BATCHES_PER_REQUEST
                       and size + queue[0].builder.size_bytes <= self._max_request_bytes):
                    size += queue[0].builder.size_bytes
                    batches.append(queue.popleft())
                await self._send_batches(slot, batches)
        finally:
            del self._senders[slot]

    async def _send_batches(self, slot: tuple[str, int], batches: list[_AsyncBatch],
                            built: list[bytes] | None = None) -> None:
        """Send until acknowledged, retrying while leadership moves (within the delivery timeout). The bytes,
        producer id and sequences stay the same on every attempt, so the leader stores a retried batch once."""
        built = built or [self._build(slot, b) for b in batches]
        request = pb.ProduceRequest(acks=self.acks, timeout_ms=self._timeout_ms, partitions=[
            pb.PartitionRecords(topic=slot[0], partition=slot[1], records=b"".join(built))])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._delivery_timeout_s
        while True:
            try:
                result = await self._produce_once(slot, request)
                break
            except LogbrokerError as exc:
                error = await self._final_error(slot, exc, loop.time() < deadline)
                if error is None:
                    self._metadata.invalidate(slot[0])
                    await asyncio.sleep(RETRY_BACKOFF_MS / 1000)
                    continue
                refused = refused_batch(error, [len(data) for data in built])
                if refused is not None:  # that batch alone is at fault: send the others again
                    bad = batches[refused]
                    self._fail([bad], explain_record_too_large(error, *slot, [(bad.builder.count, len(built[refused]))])
                               or error)
                    keep = [i for i in range(len(batches)) if i != refused]
                    await self._send_batches(slot, [batches[i] for i in keep], [built[i] for i in keep])
                    return
                sizes = [(b.builder.count, len(data)) for b, data in zip(batches, built, strict=True)]
                self._fail(batches, explain_record_too_large(error, *slot, sizes) or error)
                return
        if self.acks != 0 and len(result.batch_base_offsets) == len(batches):
            for batch, base_offset in zip(batches, result.batch_base_offsets, strict=True):
                batch.done.set_result(base_offset)
            return
        offset = result.base_offset if self.acks != 0 else -1
        for batch in batches:
            batch.done.set_result(offset)
            if offset >= 0:
                offset += batch.builder.count

    async def _final_error(self, slot: tuple[str, int], exc: LogbrokerError, in_time: bool) -> LogbrokerError | None:
        """None to retry; else the error the batches fail with. A partition none of whose replicas answers
        fails at once rather than at the delivery timeout."""
        if not exc.retriable or not in_time:
            return exc
        try:
            await self._metadata.raise_if_offline(*slot)
        except LogbrokerError as offline:
            return offline
        return None

    def _fail(self, batches: list[_AsyncBatch], error: LogbrokerError) -> None:
        self._failures.add(sum(b.builder.count for b in batches), error)
        for batch in batches:
            batch.done.set_exception(error)
            batch.done.exception()  # marks it retrieved: the caller may never await this record

    async def _produce_once(self, slot: tuple[str, int], request: pb.ProduceRequest) -> pb.PartitionProduceResult:
        response = await self._metadata.call("Produce", request, await self._metadata.leader(*slot))
        result: pb.PartitionProduceResult = response.results[0]
        if result.error_code:
            raise error_for(result.error_code, result.error_message, *slot)
        return result

    def _build(self, slot: tuple[str, int], batch: _AsyncBatch) -> bytes:
        sequence = self._sequences.get(slot, 0)
        self._sequences[slot] = (sequence + batch.builder.count) & 0x7FFFFFFF
        return batch.builder.build(producer_id=self._producer_id, producer_epoch=0, base_sequence=sequence)

    async def flush(self, *, raise_on_failure: bool = False) -> int:
        """Send everything queued and wait for every answer. As Producer.flush: returns how many records failed
        since the previous flush (0: all acknowledged), or raises DeliveryFailedError with raise_on_failure."""
        for slot in list(self._open):
            self._seal(slot)
        while self._senders:
            await asyncio.gather(*self._senders.values(), return_exceptions=True)
        failures, self._failures = self._failures, FailureTally()
        return failures.report(raise_on_failure)

    async def close(self) -> None:
        await self.flush()
        await self._metadata.close()

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --------------------------------------------------------------------------------------- consumer

class AsyncConsumer:
    """assign / seek / poll over asyncio; one fetch per poll to each partition leader."""

    def __init__(
        self,
        bootstrap: str | Sequence[str] | None = None,
        *,
        auto_offset_reset: str = "latest",
        fetch_max_wait_ms: int = DEFAULT_FETCH_MAX_WAIT_MS,
        max_partition_fetch_bytes: int = DEFAULT_MAX_PARTITION_FETCH_BYTES,
        request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS,
        check_crcs: bool = True,
    ) -> None:
        if auto_offset_reset not in RESETS:
            raise ValueError(f"auto_offset_reset must be one of {sorted(RESETS)}, got {auto_offset_reset!r}")
        self._reset = RESETS[auto_offset_reset]
        self._check_crcs = check_crcs
        # A broken batch found behind records this poll hands out: (position at it, error), raised next poll.
        self._unreadable: dict[TopicPartition, tuple[int, CorruptBatchError]] = {}
        self._max_wait_ms = fetch_max_wait_ms
        self._partition_max_bytes = max_partition_fetch_bytes
        self._metadata = AsyncMetadata(bootstrap, request_timeout_ms)
        self._positions: dict[TopicPartition, int | None] = {}

    async def assign(self, partitions: Iterable[TopicPartition]) -> None:
        assigned: dict[TopicPartition, int | None] = {}
        for tp in (TopicPartition(*p) for p in partitions):
            await self._metadata.leader(tp.topic, tp.partition)  # validates topic and partition
            assigned[tp] = self._positions.get(tp)
        self._positions = assigned

    def assignment(self) -> set[TopicPartition]:
        return set(self._positions)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        tp = self._assigned(partition)
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self._positions[tp] = offset

    def _assigned(self, partition: TopicPartition) -> TopicPartition:
        tp = TopicPartition(*partition)
        if tp not in self._positions:
            raise LogbrokerError(f"{tp.topic}-{tp.partition} is not assigned to this consumer; assign() it first")
        return tp

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        await self._seek_to(-2, partitions)

    async def seek_to_end(self, *partitions: TopicPartition) -> None:
        await self._seek_to(-1, partitions)

    async def _seek_to(self, which: int, partitions: Sequence[TopicPartition]) -> None:
        found = await self._list({self._assigned(p): which for p in partitions or list(self._positions)})
        for tp, (offset, _) in found.items():
            self._positions[tp] = offset

    async def position(self, partition: TopicPartition) -> int:
        tp = self._assigned(partition)
        position = self._positions[tp]
        if position is None:
            await self._reset_positions([tp])
            position = self._positions[tp]
        assert position is not None
        return position

    async def offsets_for_times(
        self, timestamps: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        found = await self._list({TopicPartition(*tp): ts for tp, ts in timestamps.items()})
        return {tp: (OffsetAndTimestamp(o, t) if o >= 0 else None) for tp, (o, t) in found.items()}

    async def _list(self, queries: Mapping[TopicPartition, int]) -> dict[TopicPartition, tuple[int, int]]:
        out = {}
        for tp, ts in queries.items():
            request = pb.ListOffsetsRequest(
                partitions=[pb.ListOffsetsPartition(topic=tp.topic, partition=tp.partition, timestamp_ms=ts)])
            response = await self._metadata.call("ListOffsets", request, await self._metadata.leader(*tp))
            result = response.results[0]
            if result.error_code:
                raise error_for(result.error_code, result.error_message, tp.topic, tp.partition)
            out[tp] = (result.offset, result.timestamp_ms)
        return out

    async def _reset_positions(self, tps: Sequence[TopicPartition]) -> None:
        if self._reset is None:
            raise OffsetOutOfRangeError(f"no position for {list(tps)} and auto_offset_reset='none'; seek() first")
        for tp, (offset, _) in (await self._list({tp: self._reset for tp in tps})).items():
            self._positions[tp] = offset

    async def poll(self, timeout: float = 1.0) -> list[ConsumerRecord]:
        """Records from every assigned partition; waits up to timeout for the first to arrive."""
        self._raise_unreadable()
        missing = [tp for tp, pos in self._positions.items() if pos is None]
        if missing:
            await self._reset_positions(missing)
        by_leader: dict[str, list[pb.FetchPartition]] = {}
        for tp, position in self._positions.items():
            by_leader.setdefault(await self._metadata.leader(*tp), []).append(pb.FetchPartition(
                topic=tp.topic, partition=tp.partition, fetch_offset=position or 0,
                partition_max_bytes=self._partition_max_bytes))
        wait_ms = int(min(timeout * 1000, self._max_wait_ms))
        responses = await asyncio.gather(*(
            self._metadata.call("Fetch", pb.FetchRequest(max_wait_ms=wait_ms, min_bytes=1, partitions=parts), leader)
            for leader, parts in by_leader.items()
        ), return_exceptions=True)
        records: list[ConsumerRecord] = []
        for parts, response in zip(by_leader.values(), responses, strict=True):
            if isinstance(response, LogbrokerError) and response.retriable:
                for part in parts:  # that leader is gone: find the new one on the next poll
                    self._metadata.invalidate(part.topic)
                continue
            if isinstance(response, BaseException):
                raise response
            for result in response.results:
                await self._absorb(result, records)
        if not records:
            self._raise_unreadable()
        return records

    def _raise_unreadable(self) -> None:
        """Raise for a broken batch a partition is still positioned at; a seek since it was found skips it."""
        unreadable, self._unreadable = self._unreadable, {}
        for tp, (position, error) in unreadable.items():
            if self._positions.get(tp) == position:
                raise error

    async def _absorb(self, result: pb.PartitionFetchResult, out: list[ConsumerRecord]) -> None:
        tp = TopicPartition(result.topic, result.partition)
        if result.error_code:
            error = error_for(result.error_code, result.error_message, tp.topic, tp.partition)
            if isinstance(error, OffsetOutOfRangeError) and self._reset is not None:
                await self._reset_positions([tp])
                return
            if error.retriable:  # leadership is moving: ask again for the leader on the next poll
                self._metadata.invalidate(tp.topic)
                return
            raise error
        start = self._positions.get(tp)
        if start is None or not result.records:
            return
        data = result.records
        position = start
        try:
            for pos, header in rec.iter_batch_headers(data):
                last = header.base_offset + header.last_offset_delta
                if last < start:
                    continue
                if not header.attributes & rec.CONTROL_FLAG:
                    decode_batch(tp, data, pos, header, start, out, self._check_crcs)
                position = self._positions[tp] = last + 1
        except CorruptBatchError as exc:
            # Raising now would drop the records out holds already, whose positions have moved past them.
            self._unreadable[tp] = (position, exc)

    async def close(self) -> None:
        await self._metadata.close()

    async def __aenter__(self) -> AsyncConsumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
