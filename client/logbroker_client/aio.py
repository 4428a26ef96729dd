"""asyncio clients: AsyncProducer, AsyncConsumer and AsyncAdmin over grpc.aio.

They share the codec, the partitioners, the metadata cache and the error classes with the
synchronous clients; only the waiting differs. Use them inside a running event loop:

    async with AsyncProducer(acks="all") as producer:
        meta = await producer.send_and_wait("orders", b"...", key=b"user-42")
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from logbroker_client.admin import (
    DESCRIBE_ATTEMPT_TIMEOUT_S,
    RetryNote,
    add_partitions_request,
    alter_topic_configs_request,
    check_group_configs_answer,
    drain_request,
    drained_targets,
    group_configs_request,
    move_replicas_request,
    raise_answer_error,
    raise_described_errors,
    raise_topic_errors,
    share_describe_requests,
    take_share_statuses,
    topic_description,
)
from logbroker_client.aio_groups import AsyncCoordinators, AsyncGroupSide
from logbroker_client.connection import (
    DEFAULT_REQUEST_TIMEOUT_MS,
    AsyncConnection,
    rpc_code,
    service_name,
    translate_rpc_error,
    unreachable_reason,
)
from logbroker_client.consumer import (
    DEFAULT_AUTO_COMMIT_INTERVAL_MS,
    DEFAULT_FETCH_MAX_BYTES,
    DEFAULT_FETCH_MAX_WAIT_MS,
    DEFAULT_MAX_PARTITION_FETCH_BYTES,
    DEFAULT_MAX_POLL_INTERVAL_MS,
    DEFAULT_MAX_POLL_RECORDS,
    DEFAULT_SESSION_TIMEOUT_MS,
    GROUP_WAIT_SLICE_S,
    default_client_id,
)
from logbroker_client.data_channel import AsyncDataChannel
from logbroker_client.data_wire import Method
from logbroker_client.errors import (
    BrokerUnavailableError,
    GroupIdNotFoundError,
    LogbrokerError,
    NoBrokerAnsweredError,
    RequestTimedOutError,
    error_for,
)
from logbroker_client.fetch_state import EARLIEST, LATEST, FetchOutcome, FetchState, reset_policy
from logbroker_client.group_member import (
    SIMPLE_MEMBER_EPOCH,
    GroupMember,
    RebalanceListener,
    Subscription,
    commit_entries,
)
from logbroker_client.groups import (
    ResetSpec,
    by_topic,
    check_group_id,
    committed_offsets,
    delete_error,
    describe_error,
    described_partitions,
    fetch_offsets_request,
    group_description,
    group_listings,
    plan_reset,
    refuse_live_group,
)
from logbroker_client.metadata import METADATA_TIMEOUT_S, PROBE_TIMEOUT_S, RETRY_BACKOFF_S, MetadataCache, health_state
from logbroker_client.producer_core import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BUFFER_MEMORY,
    DEFAULT_DELIVERY_TIMEOUT_MS,
    DEFAULT_LINGER_MS,
    DEFAULT_MAX_BLOCK_MS,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_METADATA_MAX_AGE_MS,
    CoreBatch,
    ProducerCore,
    Slot,
    complete_all,
    delivery_headers,
    match_results,
    partition_count_stale,
    priority_lane,
    requests_by_leader,
)
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.share import subscription_lanes
from logbroker_client.throttle import BrokerPauses, client_id_metadata, default_producer_client_id
from logbroker_client.types import (
    ConsumerRecord,
    GroupDescription,
    GroupListing,
    OffsetAndMetadata,
    OffsetAndTimestamp,
    OffsetChange,
    RecordMetadata,
    ShareGroupDescription,
    SharePartitionStatus,
    TopicDescription,
    TopicPartition,
)

# The calls that go on a broker's data port when it has one: gRPC method -> (data port method, answer type).
DATA_PORT_METHODS: dict[str, tuple[Method, type[Any]]] = {
    "Produce": (Method.PRODUCE, pb.ProduceResponse),
    "Fetch": (Method.FETCH, pb.FetchResponse),
    "ListOffsets": (Method.LIST_OFFSETS, pb.ListOffsetsResponse),
}


class AsyncMetadata(MetadataCache):
    def __init__(self, bootstrap: str | Sequence[str] | None, request_timeout_ms: int) -> None:
        super().__init__(bootstrap, request_timeout_ms)
        self._connections: dict[str, AsyncConnection] = {}
        self._data_channel_opening: dict[str, asyncio.Future[AsyncDataChannel]] = {}

    def connection(self, address: str) -> AsyncConnection:
        conn = self._connections.get(address)
        if conn is None:
            conn = self._connections[address] = AsyncConnection(address)
        return conn

    async def call(self, method: str, request: Any, address: str | None = None, admin: bool = False,
                   check: Callable[[Any], None] | None = None, attempt_timeout_s: float | None = None,
                   service: str = "") -> Any:
        """Call a broker: the given one (a partition's leader), else the first that answers of every known
        address, asked again while `check` finds the answer retriable, until the request timeout."""
        service = service_name(admin, service)
        if address:
            return await self._call_at(address, method, request, service)
        deadline = time.monotonic() + self.request_timeout_s
        while True:
            try:
                response = await self._first_answer(method, request, service, attempt_timeout_s, deadline)
                if check is not None:
                    check(response)
                return response
            except LogbrokerError as exc:
                if (not exc.retriable or isinstance(exc, NoBrokerAnsweredError)
                        or time.monotonic() + RETRY_BACKOFF_S >= deadline):
                    raise
                await asyncio.sleep(RETRY_BACKOFF_S)

    async def data_channel(self, address: str) -> AsyncDataChannel | None:
        """As ClusterMetadata.data_channel: the broker's data port, or None to use gRPC."""
        channel, data_address = self.data_channel_or_address(address)
        if data_address is None:
            return channel
        opening = self._data_channel_opening.get(address)
        if opening is None:  # one connection attempt at a time per broker, shared by every caller
            opening = self._data_channel_opening[address] = asyncio.ensure_future(
                AsyncDataChannel.open(address, data_address, self.client_id))
            opening.add_done_callback(lambda done: done.cancelled() or done.exception())  # seen, if its waiter left
        try:
            channel = await asyncio.shield(opening)
        except LogbrokerError as exc:
            self.data_port_failed(address, exc)
            return None
        finally:
            if opening.done():
                self._data_channel_opening.pop(address, None)
        self.data_port_reached(address, channel)
        return channel

    async def _call_at(self, address: str, method: str, request: Any, service: str) -> Any:
        data_method = DATA_PORT_METHODS.get(method) if service == "broker" else None
        if data_method is not None:
            channel = await self.data_channel(address)
            if channel is not None:
                try:
                    return await channel.call(data_method[0], request, data_method[1], self.request_timeout_s)
                except BrokerUnavailableError:
                    self.mark_unreachable(address)
                    raise
        conn = self.connection(address)
        try:
            return await getattr(getattr(conn, service), method)(request, timeout=self.request_timeout_s,
                                                                 metadata=self.call_metadata)
        except grpc.RpcError as exc:
            error = translate_rpc_error(exc, address)
            if isinstance(error, BrokerUnavailableError):
                self.mark_unreachable(address)
            raise error from None

    async def _first_answer(self, method: str, request: Any, service: str, attempt_timeout_s: float | None,
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
                return await getattr(getattr(conn, service), method)(request, timeout=timeout_s)
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
        """As ClusterMetadata.partitions_for: a retriable answer is asked again within the request timeout."""
        count = self.cached_count(topic)
        if count is None:
            deadline = time.monotonic() + self.request_timeout_s
            while (wait_s := self.retry_topic_after(await self.refresh([topic]), topic, deadline)) is not None:
                await asyncio.sleep(wait_s)
            count = self.fetched_count(topic)
        return count

    async def leader(self, topic: str, partition: int) -> str:
        await self.partitions_for(topic)
        return self.leader_address(topic, partition) or self.addresses()[0]

    async def close(self) -> None:
        for conn in self._connections.values():
            await conn.close()
        self._connections.clear()
        self.close_data_channels()
        for opening in self._data_channel_opening.values():
            opening.cancel()
        self._data_channel_opening.clear()


# ------------------------------------------------------------------------------------------ admin

class AsyncAdmin:
    def __init__(self, bootstrap: str | Sequence[str] | None = None,
                 request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS) -> None:
        self._metadata = AsyncMetadata(bootstrap, request_timeout_ms)
        self._coordinators = AsyncCoordinators(self._metadata)
        self._timeout_s = request_timeout_ms / 1000

    async def create_topic(self, name: str, partitions: int = 0, replication_factor: int = 0,
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

    async def alter_topic_configs(self, name: str, configs: Mapping[str, object] | None = None,
                                  delete: Sequence[str] = (), validate_only: bool = False) -> dict[str, str]:
        """As Admin.alter_topic_configs: returns the topic's overrides after the change."""
        request = alter_topic_configs_request(name, configs, delete, validate_only, self._timeout_s)
        response = await self._metadata.call("AlterTopicConfigs", request, admin=True,
                                             check=lambda answer: raise_answer_error(answer, name))
        return dict(response.configs)

    async def add_partitions(self, name: str, total: int) -> None:
        """As Admin.add_partitions: grow a topic to ``total`` partitions."""
        await self._metadata.call("CreatePartitions", add_partitions_request(name, total, self._timeout_s),
                                  admin=True, check=lambda answer: raise_answer_error(answer, name))

    async def move_replicas(self, name: str, partition: int, replicas: Sequence[int]) -> None:
        """As Admin.move_replicas: record the target; the partition's leader does the moving."""
        await self._metadata.call("MoveReplicas", move_replicas_request(name, partition, replicas, self._timeout_s),
                                  admin=True, check=lambda answer: raise_answer_error(answer, name))

    async def drain_broker(self, broker_id: int) -> dict[TopicPartition, list[int]]:
        """As Admin.drain_broker: the target chosen for each partition."""
        response = await self._metadata.call("MoveReplicas", drain_request(broker_id, self._timeout_s), admin=True,
                                             check=lambda answer: raise_answer_error(answer, None))
        return drained_targets(response)

    async def describe_cluster(self) -> pb.MetadataResponse:
        return await self._metadata.refresh()

    async def broker_states(self) -> dict[int, str]:
        """node id -> "up", "not ready", "no answer" or "down", as each broker's gRPC health service answers."""
        return await self._metadata.broker_states()

    # ------------------------------------------------------------------------------ consumer groups

    async def list_groups(self) -> list[GroupListing]:
        return group_listings(await self._metadata.call("ListGroups", pb.ListGroupsRequest(), service="groups"))

    async def describe_groups(self, group_ids: Sequence[str]) -> list[GroupDescription]:
        """As Admin.describe_groups: members, committed offsets, log ends and lag."""
        out = []
        for group_id in group_ids:
            described = await self._describe(check_group_id(group_id))
            out.append(group_description(described, await self._log_ends(described_partitions(described))))
        return out

    async def _describe(self, group_id: str) -> pb.GroupDescription:
        response = await self._coordinators.call(group_id, "DescribeGroups",
                                                 pb.DescribeGroupsRequest(group_ids=[group_id]), errors=describe_error)
        return response.groups[0]

    async def _log_ends(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        out: dict[TopicPartition, int | None] = {}
        for partitions in by_topic(tps).values():
            try:
                found = await self._offsets_at(partitions, LATEST)
            except LogbrokerError:
                found = {}
            out.update({tp: found.get(tp) for tp in partitions})
        return out

    async def _offsets_at(self, tps: Sequence[TopicPartition], timestamp_ms: int) -> dict[TopicPartition, int]:
        found = await async_list_offsets(self._metadata, {tp: timestamp_ms for tp in tps})
        return {tp: offset for tp, (offset, _) in found.items()}

    async def delete_groups(self, group_ids: Sequence[str]) -> None:
        for group_id in group_ids:
            await self._coordinators.call(check_group_id(group_id), "DeleteGroups",
                                          pb.DeleteGroupsRequest(group_ids=[group_id]), errors=delete_error)

    async def reset_offsets(self, group_id: str, topic: str, *, to_earliest: bool = False, to_latest: bool = False,
                            to_offset: int | None = None, to_datetime: datetime | int | None = None,
                            shift_by: int | None = None, partitions: Sequence[int] | None = None,
                            dry_run: bool = False) -> list[OffsetChange]:
        """As Admin.reset_offsets: refused while the group has members; dry_run commits nothing."""
        spec = ResetSpec.of(to_earliest=to_earliest, to_latest=to_latest, to_offset=to_offset,
                            to_datetime=to_datetime, shift_by=shift_by)
        with contextlib.suppress(GroupIdNotFoundError):  # no member and no offset yet: the reset creates them
            refuse_live_group(await self._describe(check_group_id(group_id)))
        count = await self._metadata.partitions_for(topic)
        tps = [TopicPartition(topic, p) for p in (range(count) if partitions is None else dict.fromkeys(partitions))]
        for tp in tps:
            await self._metadata.leader(tp.topic, tp.partition)  # names a partition that does not exist
        response = await self._coordinators.call(group_id, "FetchOffsets", fetch_offsets_request(group_id, tps))
        committed = {tp: found.offset for tp, found in committed_offsets(response).items()}
        by_time = {} if spec.to_datetime_ms is None else await self._offsets_at(tps, spec.to_datetime_ms)
        changes = plan_reset(spec, tps, committed, await self._offsets_at(tps, EARLIEST),
                             await self._offsets_at(tps, LATEST), by_time)
        if not dry_run:
            request = pb.CommitOffsetsRequest(group_id=group_id, member_id="", member_epoch=SIMPLE_MEMBER_EPOCH,
                                              offsets=commit_entries({TopicPartition(c.topic, c.partition): c.new
                                                                      for c in changes}))
            await self._coordinators.call(group_id, "CommitOffsets", request)
        return changes

    # ---------------------------------------------------------------------- group configs, share groups

    async def alter_group_configs(self, group_id: str, configs: Mapping[str, object]) -> None:
        """As Admin.alter_group_configs."""
        await self._metadata.call("AlterGroupConfigs", group_configs_request(group_id, configs), admin=True,
                                  check=check_group_configs_answer)

    async def describe_group_configs(self, group_id: str) -> dict[str, str]:
        """As Admin.describe_group_configs: every config of the group, defaults included."""
        response = await self._metadata.call(
            "DescribeGroupConfigs", pb.DescribeGroupConfigsRequest(group_id=check_group_id(group_id)), admin=True,
            check=check_group_configs_answer)
        return dict(sorted(response.configs.items()))

    async def describe_share_group(self, group_id: str, topics: Sequence[str] | str, *,
                                   priorities: int = 1) -> ShareGroupDescription:
        """As Admin.describe_share_group: per partition, the queue as the share group sees it."""
        group_id = check_group_id(group_id)
        tps = [TopicPartition(topic, p) for topic, _ in subscription_lanes(topics, priorities)
               for p in range(await self._metadata.partitions_for(topic))]
        found: dict[TopicPartition, SharePartitionStatus] = {}
        deadline = time.monotonic() + self._metadata.request_timeout_s
        while len(found) < len(tps):
            leaders = {tp: await self._metadata.leader(*tp) for tp in tps if tp not in found}
            for address, request in share_describe_requests(group_id, leaders).items():
                try:
                    response = await self._metadata.call("DescribeSharePartitions", request, address, service="share")
                except LogbrokerError as exc:
                    if not exc.retriable:
                        raise
                    moved = {item.topic for item in request.partitions}
                else:
                    moved = take_share_statuses(response, found)
                for topic in moved:
                    self._metadata.invalidate(topic)
            if len(found) < len(tps):
                if time.monotonic() > deadline:
                    raise RequestTimedOutError(f"share group {group_id!r}: the partitions' leaders did not answer "
                                               f"within {self._metadata.request_timeout_s:g}s; retry")
                await asyncio.sleep(RETRY_BACKOFF_S)
        return ShareGroupDescription(group_id, [found[tp] for tp in tps])

    async def close(self) -> None:
        await self._metadata.close()

    async def __aenter__(self) -> AsyncAdmin:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --------------------------------------------------------------------------------------- producer

class _AsyncBatch(CoreBatch):
    """A batch whose outcome coroutines await: one asyncio future resolving to its base offset."""

    __slots__ = ("done",)

    def __init__(self, topic: str, partition: int, compression: int, created: float) -> None:
        super().__init__(topic, partition, compression, created)
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def complete(self, base_offset: int, error: BaseException | None) -> None:
        if self.done.done():
            return
        if error is None:
            self.done.set_result(base_offset)
        else:
            self.done.set_exception(error)
            self.done.exception()  # marks it retrieved: the caller may never await this record


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
    """The Producer's API over asyncio, on the same core (producer_core.py): batching, linger, the buffer
    limit, idempotent sequences, one request per leader broker with up to 5 batches of a partition in flight,
    the same retry and leader-loss rules.
    A sender task (started by the first send) plays the part of the Producer's sender thread."""

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
        client_id: str | None = None,
        metadata_max_age_ms: int = DEFAULT_METADATA_MAX_AGE_MS,
    ) -> None:
        self._metadata_max_age_s = metadata_max_age_ms / 1000
        self._core = ProducerCore(
            new_batch=_AsyncBatch, new_future=AsyncRecordFuture, wake=self._wake, acks=acks, linger_ms=linger_ms,
            batch_size=batch_size, compression=compression, partitioner=partitioner,
            max_request_bytes=max_request_bytes, buffer_memory=buffer_memory,
            delivery_timeout_ms=delivery_timeout_ms, max_block_ms=max_block_ms,
            enable_idempotence=enable_idempotence,
            max_in_flight_requests_per_connection=max_in_flight_requests_per_connection,
            producer_id=random.getrandbits(62))
        self.acks = self._core.acks
        self._timeout_ms = request_timeout_ms
        self._metadata = AsyncMetadata(bootstrap, request_timeout_ms)
        self.client_id = client_id or default_producer_client_id()  # the brokers' quotas are per client id
        self._metadata.call_metadata = client_id_metadata(self.client_id)
        # asyncio.Events bind to the running loop when first waited on: made by the first send(), in the loop
        self._wakeup: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None  # set whenever batches are released: buffer room, flush()
        self._sender: asyncio.Task[None] | None = None
        self._requests: set[asyncio.Task[None]] = set()
        self._closed = False

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _start(self) -> None:
        if self._sender is None:
            self._wakeup = asyncio.Event()
            self._changed = asyncio.Event()
            self._sender = asyncio.get_running_loop().create_task(self._run_sender())

    async def send(
        self,
        topic: str,
        value: bytes | str | None = None,
        key: bytes | str | None = None,
        headers: Sequence[tuple[str, bytes | None]] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        *,
        deliver_at_ms: int | None = None,
        delay_ms: int | None = None,
        priority: int | None = None,
    ) -> AsyncRecordFuture:
        """Queue a record; await the returned future for its RecordMetadata. deliver_at_ms, delay_ms and priority
        as in Producer.send. Waits up to max_block_ms while buffer_memory is full, then raises
        RequestTimedOutError."""
        if self._closed:
            raise LogbrokerError("send() on a closed producer")
        if priority is not None:
            topic = priority_lane(topic, priority)
        if deliver_at_ms is not None or delay_ms is not None:
            headers = delivery_headers(headers, deliver_at_ms, delay_ms)
        if self._sender is None:
            self._start()
        core = self._core
        count = core.partition_counts.get(topic)
        if count is None or partition_count_stale(count, partition):
            count = await self._partition_count(topic)
        if core.buffered_bytes >= core.buffer_memory:
            await self._wait_for_space()
        return core.append(topic, value, key, headers, partition, timestamp_ms, count)  # type: ignore[no-any-return]

    async def _partition_count(self, topic: str) -> int:
        """As Producer._partition_count: the cached metadata first, a broker when the known count may be old."""
        if topic in self._core.counts_asked_s:
            await self._metadata.refresh([topic])
        asked_s = time.monotonic()
        count = await self._metadata.partitions_for(topic)
        self._core.set_partition_count(topic, count, asked_s)
        return count

    async def send_and_wait(self, topic: str, value: bytes | str | None = None, **kwargs: Any) -> RecordMetadata:
        return await (await self.send(topic, value, **kwargs))

    async def _wait_for_space(self) -> None:
        core = self._core
        assert self._changed is not None
        self._wake()
        deadline = time.monotonic() + core.max_block_s
        while core.buffer_full():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise core.buffer_full_error()
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def flush(self, timeout: float | None = None, *, raise_on_failure: bool = False) -> int:
        """Send everything queued and wait for every answer. As Producer.flush: returns how many records failed
        since the previous flush (0: all acknowledged), or raises DeliveryFailedError with raise_on_failure;
        TimeoutError if some are still unanswered after timeout seconds."""
        core = self._core
        if self._sender is not None:
            assert self._changed is not None
            core.seal_all()
            self._wake()
            deadline = None if timeout is None else time.monotonic() + timeout
            while core.unfinished:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"flush: {core.unfinished} batch(es) still unacknowledged after {timeout}s")
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
        return core.take_failures().report(raise_on_failure)

    async def close(self, timeout: float | None = None) -> None:
        if self._closed:
            return
        try:
            await self.flush(timeout)
        finally:
            self._closed = self._core.closed = True
            if self._sender is not None:
                self._wake()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._sender, 5)
            await self._metadata.close()

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------------------ sender side

    async def _run_sender(self) -> None:
        core = self._core
        wakeup = self._wakeup
        assert wakeup is not None
        loop = asyncio.get_running_loop()
        while not self._closed or core.has_work():
            core.forget_old_partition_counts(self._metadata_max_age_s, time.monotonic())
            wait_s = core.seal_lingering()
            taken = core.take_sendable()
            if taken:
                for address, parts in requests_by_leader(await self._leaders_of(taken), core.max_request_bytes):
                    task = loop.create_task(self._send(address, parts))
                    self._requests.add(task)
                    task.add_done_callback(self._requests.discard)
            if not wakeup.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), wait_s)
            wakeup.clear()
        if self._requests:
            await asyncio.gather(*self._requests, return_exceptions=True)

    async def _leaders_of(self, taken: list[tuple[Slot, list[CoreBatch]]]
                          ) -> list[tuple[Slot, list[CoreBatch], str]]:
        """Each batch with its partition's leader; a batch whose leader is unknown is answered with why."""
        items = []
        for slot, batches in taken:
            try:
                address = await self._metadata.leader(*slot)
                if batches[0].attempts > 0:  # the last attempt failed: if no replica answers, fail now
                    await self._metadata.raise_if_offline(*slot)
            except LogbrokerError as exc:
                self._on_answer(slot, batches, None, exc, None)
                continue
            except Exception as exc:  # never leave the batches unanswered: flush() waits for them
                self._on_answer(slot, batches, None, LogbrokerError(f"no leader for {slot[0]}-{slot[1]}: {exc}"), None)
                continue
            items.append((slot, batches, address))
        return items

    async def _send(self, address: str, parts: list[tuple[Slot, list[CoreBatch]]]) -> None:
        """One request to a leader broker, carrying an entry of each of its ready partitions."""
        core = self._core
        request = pb.ProduceRequest(acks=core.acks, timeout_ms=self._timeout_ms, partitions=[
            pb.PartitionRecords(topic=slot[0], partition=slot[1], records=core.request_records(slot, batches))
            for slot, batches in parts])
        try:
            response = await self._metadata.call("Produce", request, address)  # marks an unreachable broker
        except Exception as exc:  # never leave the batches unanswered: flush() waits for them
            error = exc if isinstance(exc, LogbrokerError) else LogbrokerError(f"produce to {address} failed: {exc}")
            for slot, batches in parts:
                self._on_answer(slot, batches, None, error, address)
            return
        if core.acks == 0:
            for slot, batches in parts:
                complete_all(core.unacknowledged(batches))
                self._release(slot, batches)
            return
        if response.throttle_time_ms:  # the broker asked for a pause: its partitions send nothing until then
            answered = [slot for slot, _ in parts]
            core.pause([*answered, *(s for s in core.ready
                                     if s not in answered and self._metadata.leader_address(*s) == address)],
                       response.throttle_time_ms)
        for slot, batches, result, missing in match_results(parts, response.results):
            self._on_answer(slot, batches, result, missing, address)

    def _on_answer(self, slot: Slot, batches: list[CoreBatch], result: pb.PartitionProduceResult | None,
                   error: LogbrokerError | None, address: str | None) -> None:
        verdict = self._core.on_answer(slot, batches, result, error)
        if verdict.leaderless and address:
            self._metadata.mark_leaderless(address)
        if verdict.retry:
            if verdict.refresh_metadata:
                self._metadata.invalidate(slot[0])
            self._wake()
            return
        complete_all(verdict.completions)
        self._release(slot, verdict.finished)

    def _release(self, slot: Slot, batches: Sequence[CoreBatch]) -> None:
        self._core.release(slot, batches)
        if self._changed is not None:
            self._changed.set()
        self._wake()


# --------------------------------------------------------------------------------------- consumer

async def async_list_offsets(metadata: AsyncMetadata, queries: Mapping[TopicPartition, int]
                             ) -> dict[TopicPartition, tuple[int, int]]:
    """As consumer.list_offsets: one request per leader, retried while leadership moves."""
    deadline = time.monotonic() + metadata.request_timeout_s
    while True:
        try:
            return await _list_offsets_once(metadata, queries)
        except LogbrokerError as exc:
            if not exc.retriable or time.monotonic() > deadline:
                raise
            for tp in queries:
                await metadata.raise_if_offline(tp.topic, tp.partition)
                metadata.invalidate(tp.topic)
            await asyncio.sleep(RETRY_BACKOFF_S)


async def _list_offsets_once(metadata: AsyncMetadata, queries: Mapping[TopicPartition, int]
                             ) -> dict[TopicPartition, tuple[int, int]]:
    by_leader: dict[str, list[pb.ListOffsetsPartition]] = {}
    for tp, ts in queries.items():
        by_leader.setdefault(await metadata.leader(tp.topic, tp.partition), []).append(
            pb.ListOffsetsPartition(topic=tp.topic, partition=tp.partition, timestamp_ms=ts))
    out: dict[TopicPartition, tuple[int, int]] = {}
    for address, parts in by_leader.items():
        response = await metadata.call("ListOffsets", pb.ListOffsetsRequest(partitions=parts), address)
        for result in response.results:
            if result.error_code:
                raise error_for(result.error_code, result.error_message, result.topic, result.partition)
            out[TopicPartition(result.topic, result.partition)] = (result.offset, result.timestamp_ms)
    return out


class AsyncConsumer:
    """The Consumer's API over asyncio (I/O methods are coroutines; seek, pause and resume are not, as they
    do none). Fetches are pipelined as in the synchronous Consumer, and the state they feed is the same
    (fetch_state.py, group_member.py)."""

    def __init__(
        self,
        bootstrap: str | Sequence[str] | None = None,
        *,
        group_id: str | None = None,
        auto_offset_reset: str = "latest",
        enable_auto_commit: bool = True,
        auto_commit_interval_ms: int = DEFAULT_AUTO_COMMIT_INTERVAL_MS,
        group_instance_id: str | None = None,
        session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS,
        max_poll_interval_ms: int = DEFAULT_MAX_POLL_INTERVAL_MS,
        client_id: str | None = None,
        fetch_min_bytes: int = 1,
        fetch_max_wait_ms: int = DEFAULT_FETCH_MAX_WAIT_MS,
        fetch_max_bytes: int = DEFAULT_FETCH_MAX_BYTES,
        max_partition_fetch_bytes: int = DEFAULT_MAX_PARTITION_FETCH_BYTES,
        max_poll_records: int = DEFAULT_MAX_POLL_RECORDS,
        request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS,
        check_crcs: bool = True,
    ) -> None:
        self._fetch = FetchState(reset_policy(auto_offset_reset), check_crcs)
        self._min_bytes = fetch_min_bytes
        self._max_wait_ms = fetch_max_wait_ms
        self._max_bytes = fetch_max_bytes
        self._partition_max_bytes = max_partition_fetch_bytes
        self._max_poll_records = max_poll_records
        self._metadata = AsyncMetadata(bootstrap, request_timeout_ms)
        self.client_id = client_id or default_client_id()  # sent with every fetch: the brokers' quotas use it
        self._metadata.call_metadata = client_id_metadata(self.client_id)
        self._pauses = BrokerPauses()  # brokers that answered a fetch with a throttle time
        self._closed = False
        self._group: AsyncGroupSide | None = None
        if group_id is not None:
            member = GroupMember(check_group_id(group_id), session_timeout_ms=session_timeout_ms,
                                 rebalance_timeout_ms=max_poll_interval_ms, instance_id=group_instance_id,
                                 client_id=self.client_id, client_host=socket.gethostname())
            self._group = AsyncGroupSide(member, self._fetch, self._metadata, enable_auto_commit,
                                         auto_commit_interval_ms, request_timeout_ms / 1000)
        elif group_instance_id is not None:
            raise ValueError("group_instance_id needs a group_id")

    # ------------------------------------------------------------------------------ assignment

    async def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """As Consumer.assign: by hand; with a group_id new partitions start at the committed offsets."""
        if self._group is not None and self._group.member.subscribed:
            raise LogbrokerError("this consumer has subscribed to a group's topics: the coordinator assigns its "
                                 "partitions, so assign() cannot be mixed in; use a second AsyncConsumer")
        tps = [TopicPartition(*p) for p in partitions]
        for tp in tps:
            await self._metadata.leader(tp.topic, tp.partition)  # validates topic and partition
        added = self._fetch.assign(tps)
        if self._group is not None and added:
            for tp, offset in (await self._group.committed_positions(added)).items():
                self._fetch.seek(tp, offset)

    def assignment(self) -> set[TopicPartition]:
        return set(self._fetch.assigned)

    @property
    def ownership_checked_at_ms(self) -> float | None:
        """As Consumer.ownership_checked_at_ms: when (time.monotonic(), in ms) the last poll() that returned
        group records confirmed the session owning them."""
        return self._group.owned_checked_ms if self._group is not None else None

    def subscribe(self, topics: Sequence[str] | str | None = None, *, pattern: str | None = None,
                  on_assigned: Callable[[set[TopicPartition]], Any] | None = None,
                  on_revoked: Callable[[set[TopicPartition]], Any] | None = None,
                  on_lost: Callable[[set[TopicPartition]], Any] | None = None) -> None:
        """As Consumer.subscribe (call it inside the running loop); callbacks may be coroutine functions."""
        group = self._require_group("subscribe()")
        if self._fetch.assigned and not group.member.subscribed:
            raise LogbrokerError("this consumer has partitions assigned by hand; call assign([]) before subscribe()")
        names = (topics,) if isinstance(topics, str) else tuple(topics or ())
        group.subscribe(Subscription(names, pattern or ""), RebalanceListener(on_assigned, on_revoked, on_lost))

    def _require_group(self, what: str) -> AsyncGroupSide:
        if self._group is None:
            raise LogbrokerError(f"{what} needs a consumer group: create the AsyncConsumer with group_id='...'")
        return self._group

    # --------------------------------------------------------------------------------- seeking

    def seek(self, partition: TopicPartition, offset: int) -> None:
        tp = self._fetch.require_assigned(partition)
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self._fetch.seek(tp, offset)

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        await self._seek_to(EARLIEST, partitions)

    async def seek_to_end(self, *partitions: TopicPartition) -> None:
        await self._seek_to(LATEST, partitions)

    async def _seek_to(self, which: int, partitions: Sequence[TopicPartition]) -> None:
        tps = [self._fetch.require_assigned(p) for p in partitions] or list(self._fetch.assigned)
        for tp, (offset, _) in (await async_list_offsets(self._metadata, {tp: which for tp in tps})).items():
            self._fetch.seek(tp, offset)

    async def position(self, partition: TopicPartition) -> int:
        tp = self._fetch.require_assigned(partition)
        if tp not in self._fetch.positions:
            await self._reset_positions([tp])
        return self._fetch.positions[tp]

    async def beginning_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        found = await async_list_offsets(self._metadata, {TopicPartition(*tp): EARLIEST for tp in partitions})
        return {tp: offset for tp, (offset, _) in found.items()}

    async def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        found = await async_list_offsets(self._metadata, {TopicPartition(*tp): LATEST for tp in partitions})
        return {tp: offset for tp, (offset, _) in found.items()}

    async def offsets_for_times(
        self, timestamps: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        for ts in timestamps.values():
            if ts < 0:
                raise ValueError(f"timestamps must be >= 0 ms since the epoch, got {ts}")
        found = await async_list_offsets(self._metadata, {TopicPartition(*tp): ts for tp, ts in timestamps.items()})
        return {tp: (OffsetAndTimestamp(o, t) if o >= 0 else None) for tp, (o, t) in found.items()}

    async def _reset_positions(self, tps: Sequence[TopicPartition]) -> None:
        timestamp = self._fetch.reset_timestamp(tps)
        for tp, (offset, _) in (await async_list_offsets(self._metadata, {tp: timestamp for tp in tps})).items():
            self._fetch.seek(tp, offset)

    # ---------------------------------------------------------------------------- pause/resume

    def pause(self, *partitions: TopicPartition) -> None:
        self._fetch.paused.update(self._fetch.require_assigned(tp) for tp in partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self._fetch.paused.difference_update(TopicPartition(*tp) for tp in partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self._fetch.paused)

    # ------------------------------------------------------------------------------------ poll

    async def poll(self, timeout: float = 1.0, max_records: int | None = None) -> list[ConsumerRecord]:
        """As Consumer.poll: records of the assigned (or owned), unpaused partitions, [] after timeout."""
        if self._closed:
            raise LogbrokerError("poll() on a closed consumer")
        limit = max_records or self._max_poll_records
        deadline = time.monotonic() + timeout
        while True:
            if self._group is not None:
                await self._group.on_poll()
            records = self._fetch.take(limit)
            if records and self._group is not None:
                records = self._group.still_owned(records)
            if records:
                await self._prefetch()
                return records
            remaining = deadline - time.monotonic()
            if not self._fetch.fetchable():
                if self._group is None or remaining <= 0:
                    return []
                await self._group.wait_for_news(min(remaining, GROUP_WAIT_SLICE_S))
                continue
            missing = self._fetch.missing_positions()
            if missing:
                await self._reset_positions(missing)
            await self._prefetch()
            if remaining <= 0:
                return []
            if self._group is None:
                if not await self._complete_one_fetch(remaining):
                    return []
            elif not await self._complete_one_fetch(min(remaining, GROUP_WAIT_SLICE_S)) and not self._fetch.in_flight:
                await self._group.wait_for_news(min(remaining, GROUP_WAIT_SLICE_S))

    async def _prefetch(self) -> None:
        by_leader: dict[str, dict[TopicPartition, int]] = {}
        for tp, offset in self._fetch.to_fetch():
            by_leader.setdefault(await self._metadata.leader(tp.topic, tp.partition), {})[tp] = offset
        for address, offsets in by_leader.items():
            if self._pauses.paused(address):
                continue  # it asked for a pause (throttle time): fetch from it once that is over
            request = pb.FetchRequest(
                max_wait_ms=self._max_wait_ms, min_bytes=self._min_bytes, max_bytes=self._max_bytes,
                partitions=[pb.FetchPartition(topic=tp.topic, partition=tp.partition, fetch_offset=offset,
                                              partition_max_bytes=self._partition_max_bytes)
                            for tp, offset in offsets.items()])
            fetch = self._fetch.begin_fetch(address, offsets)
            fetch.handle = asyncio.get_running_loop().create_task(self._metadata.call("Fetch", request, address))

    async def _complete_one_fetch(self, timeout: float) -> bool:
        """Wait for the first fetch in flight to finish and buffer its records; False if none finished in time.
        The first to finish, not the oldest: a long poll of caught-up partitions at one broker must not hold up
        another broker's answer full of records (fetches in flight name disjoint partitions)."""
        if not self._fetch.in_flight:
            wait_s = min(self._pauses.wait_s(), timeout)  # fetches held back by a throttle time
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            return wait_s > 0
        done, _ = await asyncio.wait([f.handle for f in self._fetch.in_flight], timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done:
            return False
        fetch = next(f for f in self._fetch.in_flight if f.handle in done)
        self._fetch.end_fetch(fetch)
        try:
            response = fetch.handle.result()
        except LogbrokerError as error:
            if not error.retriable:
                raise
            for tp in fetch.offsets:  # that leader is gone: find the new one on the next round
                self._metadata.invalidate(tp.topic)
            await asyncio.sleep(min(RETRY_BACKOFF_S, timeout))
            return True
        self._pauses.note(fetch.address, response.throttle_time_ms)
        for result in response.results:
            if self._fetch.absorb(fetch, result) is FetchOutcome.FIND_LEADER:
                self._metadata.invalidate(result.topic)
        return True

    # --------------------------------------------------------------------------------- commits

    async def commit(self, offsets: Mapping[TopicPartition, int | OffsetAndMetadata] | None = None) -> None:
        """As Consumer.commit: the given offsets, or what poll() has handed out of the partitions held."""
        group = self._require_group("commit()")
        await group.commit(group.owned_positions() if offsets is None else offsets)

    def commit_async(self, offsets: Mapping[TopicPartition, int | OffsetAndMetadata] | None = None
                     ) -> asyncio.Task[None]:
        """As commit(), without waiting: await the task (or not) for the outcome."""
        group = self._require_group("commit_async()")
        chosen = dict(group.owned_positions() if offsets is None else offsets)
        return asyncio.get_running_loop().create_task(group.commit(chosen))

    async def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, OffsetAndMetadata | None]:
        return await self._require_group("committed()").committed([TopicPartition(*tp) for tp in partitions])

    # ------------------------------------------------------------------------------- lifecycle

    async def close(self) -> None:
        """Commit (with auto-commit on) and leave the group at once."""
        if self._closed:
            return
        try:
            if self._group is not None:
                await self._group.close()
        finally:
            self._closed = True
            for fetch in self._fetch.in_flight:
                fetch.handle.cancel()
            await asyncio.gather(*(f.handle for f in self._fetch.in_flight), return_exceptions=True)
            self._fetch.in_flight.clear()
            await self._metadata.close()

    async def __aenter__(self) -> AsyncConsumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[ConsumerRecord]:
        return self._records()

    async def _records(self) -> AsyncIterator[ConsumerRecord]:
        while not self._closed:
            for record in await self.poll():
                yield record
