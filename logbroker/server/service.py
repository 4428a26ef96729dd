"""gRPC services: requests in, Broker calls, per-partition error codes out.

Per-partition failures are answered in the partition's result (error_code + error_message) and never
fail the other partitions of the request; a malformed request as a whole gets INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from logbroker.cluster.metadata import TopicMetadata
from logbroker.cluster.peer_auth import is_peer, peer_metadata
from logbroker.groups.coordinator import HeartbeatRequest, check_group_id
from logbroker.groups.errors import GroupError, GroupIdNotFound
from logbroker.groups.share import share_config_mapping
from logbroker.groups.share_runtime import NotShareLeader
from logbroker.raft.errors import NotLeaderError, ProposalDroppedError
from logbroker.server import errors
from logbroker.server.broker import Broker, LeaderReportSender
from logbroker.server.data_plane import FetchPass, request_partitions_problem
from logbroker.server.forwarding import (
    FORWARD_TIMEOUT_S,
    FORWARDED_METADATA_KEY,
    ask_forwarded,
    forward_find_coordinator,
    forward_to_controller,
    topics_known_elsewhere,
)
from logbroker.server.groups import GroupFrontEnd
from logbroker.server.quotas import InflightFull, client_id_of, throttle_ms
from logbroker.server.topic_admin import MoveDoneSender
from logbroker.server.topic_view import partition_views

log = logging.getLogger("logbroker.service")

DEFAULT_FETCH_MAX_BYTES = 50 * 1024 * 1024  # what a request that names no limit asks for (the broker caps it)
DEFAULT_PARTITION_FETCH_MAX_BYTES = 1024 * 1024
# One Fetch reads this much, or this many partitions, per event-loop turn before letting others run.
FETCH_BYTES_PER_TURN = 1024 * 1024
FETCH_PARTITIONS_PER_TURN = 256
LIST_OFFSETS_YIELD_EVERY = 1_000  # partitions looked up between turns of the event loop
VALID_ACKS = (-1, 0, 1)
_LEADER_NOT_AVAILABLE = pb.ErrorCode.LEADER_NOT_AVAILABLE  # read once: protobuf enum lookups are slow
DEFAULT_REQUEST_TIMEOUT_MS = 30_000  # when a Produce or CreateTopics request names no timeout
DESCRIBE_TIMEOUT_S = 5.0
# How long a Metadata for a topic this broker does not know waits for the other brokers' word, and then for
# this broker to apply the topic's creation (a commit reaches followers within a heartbeat or two).
TOPIC_CATCH_UP_WAIT_S = 2.0


def _error(exc: Exception, where: str) -> tuple[Any, str]:
    if isinstance(exc, errors.BrokerError):
        return exc.code, exc.message
    log.exception("%s: unexpected error", where)
    return pb.ErrorCode.STORAGE_ERROR, f"{where}: internal error {type(exc).__name__}: {exc}; see the broker log"


def _fill_error(result: Any, exc: Exception, where: str) -> None:
    """Set error_code and error_message, and the leader hint on NOT_LEADER."""
    result.error_code, result.error_message = _error(exc, where)
    if isinstance(exc, errors.NotLeader):
        result.leader.leader_id = exc.leader_id
        result.leader.leader_address = exc.leader_address


class BrokerService(pb_grpc.BrokerServicer):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def Produce(self, request: pb.ProduceRequest, context: grpc.aio.ServicerContext) -> pb.ProduceResponse:
        if request.acks not in VALID_ACKS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"acks must be -1 (all), 0 or 1, got {request.acks}")
        if len(request.partitions) > 1 and (problem := _partitions_problem("Produce", request.partitions)):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        timeout_s = (request.timeout_ms or DEFAULT_REQUEST_TIMEOUT_MS) / 1000
        size = sum(len(p.records) for p in request.partitions)
        try:  # quotas and the in-flight bound may make it wait, and ask the client to wait before the next one
            async with self.broker.backpressure.produce(client_id_of(context.invocation_metadata()), size,
                                                        timeout_s) as ticket:
                if len(request.partitions) == 1:  # the usual request: no task of its own for one partition
                    results = [await self._produce_one(request.partitions[0], request.acks, timeout_s)]
                else:
                    results = await asyncio.gather(*(self._produce_one(p, request.acks, timeout_s)
                                                     for p in request.partitions))
        except InflightFull as full:
            return pb.ProduceResponse(throttle_time_ms=throttle_ms(full.throttle_s), results=[
                pb.PartitionProduceResult(topic=p.topic, partition=p.partition, error_code=full.code,
                                          error_message=f"{p.topic}-{p.partition}: {full.message}")
                for p in request.partitions])
        return pb.ProduceResponse(results=results, throttle_time_ms=ticket.throttle_ms)

    async def _produce_one(self, part: pb.PartitionRecords, acks: int, timeout_s: float) -> pb.PartitionProduceResult:
        result = pb.PartitionProduceResult(topic=part.topic, partition=part.partition)
        try:
            produced = await self.broker.data.produce(part.topic, part.partition, part.records, acks, timeout_s)
        except Exception as exc:
            _fill_error(result, exc, f"{part.topic}-{part.partition}")
            return result
        result.base_offset = produced.base_offset
        result.batch_base_offsets.extend(produced.batch_base_offsets)
        result.log_append_time_ms = produced.log_append_time_ms
        result.log_start_offset = produced.log_start_offset
        return result

    async def Fetch(self, request: pb.FetchRequest, context: grpc.aio.ServicerContext) -> pb.FetchResponse:
        problem = _fetch_request_problem(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        config = self.broker.config
        budget = min(request.max_bytes if request.max_bytes > 0 else DEFAULT_FETCH_MAX_BYTES, config.max_fetch_bytes)
        min_bytes = min(max(request.min_bytes, 1), budget)  # never wait for more than the answer may hold
        results, throttle = await self.broker.data.fetch_long_poll(
            client_id_of(context.invocation_metadata()), request.max_wait_ms, min_bytes,
            lambda: self._read_all(request, budget))
        return pb.FetchResponse(results=results, throttle_time_ms=throttle)

    async def _read_all(self, request: pb.FetchRequest, budget: int) -> FetchPass[list[pb.PartitionFetchResult]]:
        """Read every partition asked for, within the budget; a long request lets other work run between reads.
        Also returns what each partition's answer carries (for the fetch metrics, counted once answered)."""
        partition_cap = self.broker.config.max_partition_fetch_bytes
        results = []
        delivered: list[tuple[str, int, bytes]] = []
        total = 0
        unyielded_bytes = 0
        for index, part in enumerate(request.partitions):
            if unyielded_bytes >= FETCH_BYTES_PER_TURN or (index and index % FETCH_PARTITIONS_PER_TURN == 0):
                await asyncio.sleep(0)
                unyielded_bytes = 0
            asked = part.partition_max_bytes if part.partition_max_bytes > 0 else DEFAULT_PARTITION_FETCH_MAX_BYTES
            result, data = self._read_one(part, min(asked, partition_cap), budget, total)
            total += len(data)
            unyielded_bytes += len(data)
            results.append(result)
            if data:
                delivered.append((part.topic, part.partition, data))
        return FetchPass(results, total, any(r.error_code for r in results), delivered)

    def _read_one(self, part: pb.FetchPartition, limit: int, budget: int, total: int
                  ) -> tuple[pb.PartitionFetchResult, bytes]:
        result = pb.PartitionFetchResult(topic=part.topic, partition=part.partition)
        try:
            fetched = self.broker.data.read_within_budget(part.topic, part.partition, part.fetch_offset, limit,
                                                          budget, total)
        except Exception as exc:
            _fill_error(result, exc, f"{part.topic}-{part.partition}")
            return result, b""
        data = result.records = fetched.records
        result.high_watermark = fetched.high_watermark
        result.log_start_offset = fetched.log_start_offset
        return result, data

    async def ListOffsets(
        self, request: pb.ListOffsetsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListOffsetsResponse:
        problem = _partitions_problem("ListOffsets", request.partitions)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        results = []
        for index, part in enumerate(request.partitions):
            if index and index % LIST_OFFSETS_YIELD_EVERY == 0:
                await asyncio.sleep(0)  # a long request lets other work run between lookups
            result = pb.ListOffsetsResult(topic=part.topic, partition=part.partition)
            try:
                result.offset, result.timestamp_ms = self.broker.data.list_offset(
                    part.topic, part.partition, part.timestamp_ms
                )
            except Exception as exc:
                _fill_error(result, exc, f"{part.topic}-{part.partition}")
            results.append(result)
        return pb.ListOffsetsResponse(results=results)

    async def Metadata(self, request: pb.MetadataRequest, context: grpc.aio.ServicerContext) -> pb.MetadataResponse:
        broker = self.broker
        response = pb.MetadataResponse(controller_id=broker.controller_client.controller_id(), cluster_id="logbroker")
        for node_id, address in sorted(broker.client_addresses.items()):
            host, _, port = address.rpartition(":")
            response.brokers.add(node_id=node_id, host=host, port=int(port),
                                 data_port=broker.config.data_port_of(address))
        names = list(request.topics) or [t.name for t in broker.controller_client.topics()]
        unconfirmed = await self._catch_up_on_topics(names, context)
        for name in names:
            topic = response.topics.add(name=name)
            try:
                spec = self._topic_for_metadata(name, unconfirmed)
            except Exception as exc:
                topic.error_code, topic.error_message = _error(exc, name)
                continue
            add_partition = topic.partitions.add
            for view in partition_views(broker, spec):
                # Per partition of a 10,000-partition answer, so: error_code is left at its default (NONE) when
                # there is a leader, and the enum's value is a module constant (protobuf's enum attribute lookup
                # was a third of each add).
                part = add_partition(partition=view.partition, replicas=view.replicas, isr=view.isr,
                                     leader_epoch=view.replica.node.term if view.replica is not None else -1)
                if view.leader is not None:
                    part.leader_id = view.leader
                else:
                    part.leader_id, part.error_code = -1, _LEADER_NOT_AVAILABLE
        return response

    async def _catch_up_on_topics(self, names: list[str], context: Any) -> dict[str, str]:
        """Before a Metadata answer names topics this broker does not know: the other brokers are asked once
        about all of them (forwarding.topics_known_elsewhere; not when this request was itself forwarded),
        and those known elsewhere, created a moment ago through another broker, are waited for (up to
        TOPIC_CATCH_UP_WAIT_S). Returns why each topic still unknown here may exist after all: such topics
        are answered with a retriable error, never with "does not exist" (a client would give up on a topic
        that exists)."""
        topics = self.broker.cluster.topics
        unknown = [name for name in dict.fromkeys(names) if name not in topics]
        if not unknown or request_is_forwarded(context):
            return {}
        node = self.broker.node_id
        known = await topics_known_elsewhere(self.broker, unknown, TOPIC_CATCH_UP_WAIT_S)
        if known is None:
            return {name: (f"broker {node} does not know topic {name!r} and could not reach another broker to "
                           f"confirm that it does not exist; retry shortly or ask another broker") for name in unknown}
        if known:
            await self.broker.controller_client.wait_for_metadata(lambda: all(n in topics for n in known),
                                                                  TOPIC_CATCH_UP_WAIT_S)
        return {name: (f"topic {name!r} exists, but broker {node} has not yet applied its creation from the "
                       f"controller; retry shortly or ask another broker") for name in known if name not in topics}

    def _topic_for_metadata(self, name: str, unconfirmed: dict[str, str]) -> TopicMetadata:
        if name in unconfirmed:
            raise errors.LeaderNotAvailable(unconfirmed[name])
        return self.broker.controller_client.topic(name)


def _fetch_request_problem(request: pb.FetchRequest) -> str:
    """Why a Fetch is refused as a whole ("" if it is fine): too many partitions, or one named twice (each
    would be read and answered again, multiplying what one request costs)."""
    return _partitions_problem("Fetch", request.partitions)


def _partitions_problem(api: str, partitions: Sequence[Any]) -> str:
    return request_partitions_problem(api, [(part.topic, part.partition) for part in partitions])


class AdminService(pb_grpc.AdminServicer):
    """Topic changes go through the controller; a broker that does not lead it forwards the request."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def _forward(self, method: str, request: Any) -> Any | None:
        """The controller leader's answer, or None when this broker is the leader."""
        return await forward_to_controller(self.broker, method, request, FORWARD_TIMEOUT_S)

    async def CreateTopics(
        self, request: pb.CreateTopicsRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTopicsResponse:
        try:
            forwarded = await self._forward("CreateTopics", request)
        except errors.BrokerError as exc:
            return pb.CreateTopicsResponse(results=[
                pb.TopicResult(name=t.name, error_code=exc.code, error_message=exc.message) for t in request.topics])
        if forwarded is not None:
            # Read-your-writes for the client: answer once this broker has applied the new topics too.
            created = [r.name for r in forwarded.results if not r.error_code]
            await self.broker.controller_client.wait_for_metadata(
                lambda: all(n in self.broker.cluster.topics for n in created), FORWARD_TIMEOUT_S)
            return forwarded  # type: ignore[no-any-return]
        timeout_s = (request.timeout_ms or DEFAULT_REQUEST_TIMEOUT_MS) / 1000
        results = []
        for topic in request.topics:
            result = pb.TopicResult(name=topic.name)
            try:
                await self.broker.controller_client.create_topic(
                    topic.name, topic.partitions or -1, topic.replication_factor or -1, dict(topic.configs),
                    validate_only=request.validate_only, timeout_s=timeout_s,
                )
            except Exception as exc:
                result.error_code, result.error_message = _error(exc, topic.name)
            results.append(result)
        return pb.CreateTopicsResponse(results=results)

    async def DeleteTopics(
        self, request: pb.DeleteTopicsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteTopicsResponse:
        try:
            forwarded = await self._forward("DeleteTopics", request)
        except errors.BrokerError as exc:
            return pb.DeleteTopicsResponse(results=[
                pb.TopicResult(name=n, error_code=exc.code, error_message=exc.message) for n in request.names])
        if forwarded is not None:
            deleted = [r.name for r in forwarded.results if not r.error_code]
            await self.broker.controller_client.wait_for_metadata(
                lambda: not any(n in self.broker.cluster.topics for n in deleted), FORWARD_TIMEOUT_S)
            return forwarded  # type: ignore[no-any-return]
        results = []
        for name in request.names:
            result = pb.TopicResult(name=name)
            try:
                await self.broker.controller_client.delete_topic(name)
            except Exception as exc:
                result.error_code, result.error_message = _error(exc, name)
            results.append(result)
        return pb.DeleteTopicsResponse(results=results)

    async def AlterGroupConfigs(self, request: pb.AlterGroupConfigsRequest,
                                context: grpc.aio.ServicerContext) -> pb.AlterGroupConfigsResponse:
        try:
            check_group_id(request.group_id)
            forwarded = await self._forward("AlterGroupConfigs", request)
            if forwarded is not None and forwarded.error_code:
                return forwarded  # type: ignore[no-any-return]
            if forwarded is not None:
                await self.broker.controller_client.wait_for_metadata(
                    lambda: all(self.broker.cluster.group_configs.get(request.group_id, {}).get(k, "") == v
                                for k, v in request.configs.items()), FORWARD_TIMEOUT_S)
                return forwarded  # type: ignore[no-any-return]
            await self.broker.share_groups.alter_group_configs(request.group_id, dict(request.configs),
                                                               FORWARD_TIMEOUT_S)
        except Exception as exc:
            code, message = _group_error(exc, f"group {request.group_id!r}")
            return pb.AlterGroupConfigsResponse(error_code=code, error_message=message)
        return pb.AlterGroupConfigsResponse()

    async def DescribeGroupConfigs(self, request: pb.DescribeGroupConfigsRequest,
                                   context: grpc.aio.ServicerContext) -> pb.DescribeGroupConfigsResponse:
        try:
            check_group_id(request.group_id)
        except Exception as exc:
            code, message = _group_error(exc, f"group {request.group_id!r}")
            return pb.DescribeGroupConfigsResponse(error_code=code, error_message=message)
        return pb.DescribeGroupConfigsResponse(
            configs=share_config_mapping(self.broker.share_groups.share_config(request.group_id)))

    async def AlterTopicConfigs(self, request: pb.AlterTopicConfigsRequest,
                                context: grpc.aio.ServicerContext) -> pb.AlterTopicConfigsResponse:
        try:
            forwarded = await self._forward("AlterTopicConfigs", request)
            if forwarded is not None:
                if not forwarded.error_code:  # read-your-writes: answer once applied here too
                    await self.broker.controller_client.wait_for_metadata(
                        lambda: self._configs_are(request.topic, forwarded.configs), FORWARD_TIMEOUT_S)
                return forwarded  # type: ignore[no-any-return]
            configs = await self.broker.topic_admin.alter_configs(
                request.topic, dict(request.configs), list(request.delete_configs), _timeout_s(request),
                validate_only=request.validate_only)
        except Exception as exc:
            code, message = _error(exc, f"topic {request.topic!r}")
            return pb.AlterTopicConfigsResponse(error_code=code, error_message=message)
        return pb.AlterTopicConfigsResponse(configs=configs)

    def _configs_are(self, name: str, configs: Any) -> bool:
        topic = self.broker.cluster.topics.get(name)
        return topic is not None and topic.configs == dict(configs)

    async def CreatePartitions(self, request: pb.CreatePartitionsRequest,
                               context: grpc.aio.ServicerContext) -> pb.CreatePartitionsResponse:
        try:
            forwarded = await self._forward("CreatePartitions", request)
            if forwarded is not None:
                if not forwarded.error_code:
                    await self.broker.controller_client.wait_for_metadata(
                        lambda: self._partitions_reach(request.topic, request.total), FORWARD_TIMEOUT_S)
                return forwarded  # type: ignore[no-any-return]
            await self.broker.topic_admin.add_partitions(request.topic, request.total, _timeout_s(request))
        except Exception as exc:
            code, message = _error(exc, f"topic {request.topic!r}")
            return pb.CreatePartitionsResponse(error_code=code, error_message=message)
        return pb.CreatePartitionsResponse()

    def _partitions_reach(self, name: str, total: int) -> bool:
        topic = self.broker.cluster.topics.get(name)
        return topic is not None and topic.partitions >= total

    async def MoveReplicas(self, request: pb.MoveReplicasRequest,
                           context: grpc.aio.ServicerContext) -> pb.MoveReplicasResponse:
        try:
            forwarded = await self._forward("MoveReplicas", request)
            if forwarded is not None:
                if not forwarded.error_code:
                    await self.broker.controller_client.wait_for_metadata(
                        lambda: self._moves_recorded(forwarded.moves), FORWARD_TIMEOUT_S)
                return forwarded  # type: ignore[no-any-return]
            moves = await self._move(request)
        except Exception as exc:
            code, message = _error(exc, "move replicas")
            return pb.MoveReplicasResponse(error_code=code, error_message=message)
        return pb.MoveReplicasResponse(moves=[pb.PartitionTarget(topic=t, partition=p, replicas=r)
                                              for (t, p), r in sorted(moves.items())])

    async def _move(self, request: pb.MoveReplicasRequest) -> dict[tuple[str, int], list[int]]:
        admin = self.broker.topic_admin
        if request.drain_broker >= 0:
            return await admin.drain(request.drain_broker, _timeout_s(request))
        by_topic: dict[str, dict[int, list[int]]] = {}
        for target in request.targets:
            by_topic.setdefault(target.topic, {})[target.partition] = list(target.replicas)
        for name, targets in sorted(by_topic.items()):
            await admin.move_replicas(name, targets, _timeout_s(request))
        return {(t.topic, t.partition): list(t.replicas) for t in request.targets}

    def _moves_recorded(self, moves: Iterable[pb.PartitionTarget]) -> bool:
        cluster = self.broker.cluster
        for move in moves:
            topic = cluster.topics.get(move.topic)
            key = (move.topic, move.partition)
            if topic is None or (cluster.moves.get(key) != list(move.replicas)
                                 and topic.assignment[move.partition] != list(move.replicas)):
                return False
        return True

    async def DescribeTopics(
        self, request: pb.DescribeTopicsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DescribeTopicsResponse:
        response = self._describe_local(request)
        if not request.local_only:
            await self._fill_from_leaders(response)
        return response

    def _describe_local(self, request: pb.DescribeTopicsRequest) -> pb.DescribeTopicsResponse:
        broker = self.broker
        response = pb.DescribeTopicsResponse()
        for name in list(request.names) or [t.name for t in broker.controller_client.topics()]:
            described = response.topics.add(name=name)
            try:
                spec = broker.controller_client.topic(name)
            except Exception as exc:
                described.error_code, described.error_message = _error(exc, name)
                continue
            described.replication_factor = spec.replication_factor
            described.topic_id = spec.topic_id
            described.configs.update(broker.controller_client.effective_configs(name))
            for view in partition_views(broker, spec):
                part = described.partitions.add(partition=view.partition, replicas=view.replicas,
                                                leader_id=view.leader if view.leader is not None else -1,
                                                isr=view.isr,
                                                target_replicas=broker.cluster.moves.get((name, view.partition), []))
                replica = view.replica
                if replica is not None:
                    membership = replica.node.membership
                    part.voters.extend(sorted(membership.voters))
                    part.learners.extend(sorted(membership.learners))
                    part.local_replica = True
                    part.leader_epoch = replica.term
                    part.log_start_offset = replica.log.log_start_offset
                    part.high_watermark = replica.high_watermark
                    part.log_end_offset = replica.log.log_end_offset
                    part.size_bytes = replica.log.size_bytes
                    part.catching_up = replica.catching_up
                    part.leader_since_ms = int(replica.leader_since_s * 1000)
        return response

    async def _fill_from_leaders(self, response: pb.DescribeTopicsResponse) -> None:
        """Partitions led elsewhere: take offsets, size and in-sync set from their leader, which alone knows
        them for sure (a follower's high watermark lags; a broker without a replica has none)."""
        wanted: dict[int, set[str]] = {}
        for topic in response.topics:
            for part in topic.partitions:
                if part.leader_id != self.broker.node_id and part.leader_id in self.broker.peers:
                    wanted.setdefault(part.leader_id, set()).add(topic.name)
        answers = await asyncio.gather(*(self._ask_leader(leader, names) for leader, names in wanted.items()),
                                       return_exceptions=True)
        from_leaders: dict[tuple[str, int], pb.PartitionDescription] = {}
        for leader, answer in zip(wanted, answers, strict=True):
            if isinstance(answer, BaseException):
                continue  # that leader is unreachable: keep this broker's own view
            for topic in answer.topics:
                for part in topic.partitions:
                    if part.leader_id == leader:
                        from_leaders[(topic.name, part.partition)] = part
        for topic in response.topics:
            for part in topic.partitions:
                better = from_leaders.get((topic.name, part.partition))
                if better is not None:
                    part.CopyFrom(better)

    async def _ask_leader(self, leader: int, names: set[str]) -> pb.DescribeTopicsResponse:
        async with grpc.aio.insecure_channel(self.broker.peers[leader]) as channel:
            request = pb.DescribeTopicsRequest(names=sorted(names), local_only=True)
            return await pb_grpc.AdminStub(channel).DescribeTopics(request, timeout=DESCRIBE_TIMEOUT_S)


class RaftService(pb_grpc.RaftServicer):
    """Broker-to-broker calls: the Raft message stream (the transport's) and leader reports.

    Only brokers of this cluster may call them: a call without the cluster secret is refused with
    UNAUTHENTICATED before anything in it is read."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.refused_calls = 0

    async def _require_peer(self, context: grpc.aio.ServicerContext, method: str) -> None:
        if is_peer(context.invocation_metadata(), self.broker.config.cluster_secret):
            return
        self.refused_calls += 1
        if self.refused_calls == 1 or self.refused_calls % 1000 == 0:
            log.warning("refused %s from %s: the call does not carry this cluster's secret (%d refused so far); "
                        "a broker of this cluster needs the same --cluster-secret-file as the others",
                        method, context.peer(), self.refused_calls)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            f"{method} is for the brokers of this cluster only; it needs the cluster secret")

    async def ReportLeaders(self, request: pb.LeaderReport, context: grpc.aio.ServicerContext) -> pb.LeaderReportAck:
        await self._require_peer(context, "Raft.ReportLeaders")
        leaders = [[x.topic, x.partition, x.leader_id, x.epoch, x.topic_id] for x in request.leaders]
        try:
            await self.broker.controller_client.accept_leader_report(request.from_node, leaders, request.disk_id)
        except Exception as exc:
            code, message = _error(exc, f"leader report from broker {request.from_node}")
            return pb.LeaderReportAck(error_code=code, error_message=message)
        return pb.LeaderReportAck()


    async def FinishMove(self, request: pb.MoveDone, context: grpc.aio.ServicerContext) -> pb.LeaderReportAck:
        await self._require_peer(context, "Raft.FinishMove")
        try:
            await self.broker.topic_admin.finish_move(request.from_node, request.topic, request.topic_id,
                                                      request.partition, list(request.replicas))
        except Exception as exc:
            code, message = _error(exc, f"move of {request.topic}-{request.partition} from broker {request.from_node}")
            return pb.LeaderReportAck(error_code=code, error_message=message)
        return pb.LeaderReportAck()


def move_done_sender(secret: str) -> MoveDoneSender:
    """The partition leader's way to tell the controller leader that a move reached its target."""
    metadata = peer_metadata(secret)

    async def send(address: str, node_id: int, topic: str, topic_id: str, partition: int, replicas: list[int]) -> None:
        request = pb.MoveDone(from_node=node_id, topic=topic, topic_id=topic_id, partition=partition,
                              replicas=replicas)
        async with grpc.aio.insecure_channel(address) as channel:
            ack = await pb_grpc.RaftStub(channel).FinishMove(request, timeout=FORWARD_TIMEOUT_S, metadata=metadata)
        if ack.error_code:
            raise errors.LeaderNotAvailable(f"the controller leader at {address} did not record the move of "
                                            f"{topic}-{partition}: {ack.error_message}")

    return send


def _timeout_s(request: Any) -> float:
    return (request.timeout_ms or DEFAULT_REQUEST_TIMEOUT_MS) / 1000


def leader_report_sender(secret: str) -> LeaderReportSender:
    """The broker's way to report leaderships (and its disk) to the controller leader, as a peer of this cluster."""
    metadata = peer_metadata(secret)

    async def send(address: str, node_id: int, leaders: list[list[Any]], disk_id: str = "") -> bool:
        """True once the controller leader at address has committed the report."""
        request = pb.LeaderReport(from_node=node_id, disk_id=disk_id, leaders=[
            pb.PartitionLeader(topic=t, partition=p, leader_id=leader, epoch=epoch, topic_id=topic_id)
            for t, p, leader, epoch, topic_id in leaders])
        async with grpc.aio.insecure_channel(address) as channel:
            ack = await pb_grpc.RaftStub(channel).ReportLeaders(request, timeout=FORWARD_TIMEOUT_S,
                                                                 metadata=metadata)
        if ack.error_code:
            log.warning("the controller leader at %s refused a leader report: %s", address, ack.error_message)
        return not ack.error_code

    return send


def _group_error(exc: Exception, where: str) -> tuple[Any, str]:
    if isinstance(exc, GroupError):
        return pb.ErrorCode.Value(exc.code), exc.message
    return _error(exc, where)


def _tps_to_pb(tps: Iterable[tuple[str, int]]) -> list[pb.TopicPartitions]:
    by_topic: dict[str, list[int]] = {}
    for topic, partition in sorted(tps):
        by_topic.setdefault(topic, []).append(partition)
    return [pb.TopicPartitions(topic=t, partitions=ps) for t, ps in by_topic.items()]


def _tps_from_pb(items: Iterable[pb.TopicPartitions]) -> frozenset[tuple[str, int]]:
    return frozenset((item.topic, p) for item in items for p in item.partitions)


class GroupsService(pb_grpc.GroupsServicer):
    """Consumer groups over gRPC: a thin translation of GroupFrontEnd."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.groups = GroupFrontEnd(broker)

    async def FindCoordinator(self, request: pb.FindCoordinatorRequest,
                              context: grpc.aio.ServicerContext) -> pb.FindCoordinatorResponse:
        controller_client = self.broker.controller_client
        if not await controller_client.ensure_offsets_topic(FORWARD_TIMEOUT_S) and not request_is_forwarded(context):
            forwarded = await forward_find_coordinator(self.broker, request, FORWARD_TIMEOUT_S)
            if forwarded is not None:
                await controller_client.wait_for_metadata(lambda: self.groups.offsets_partitions() is not None,
                                                          FORWARD_TIMEOUT_S)
        response = pb.FindCoordinatorResponse()
        for group_id in request.group_ids:
            found = response.coordinators.add(group_id=group_id, node_id=-1)
            try:
                coordinator = self.groups.find_coordinator(group_id)
            except Exception as exc:
                found.error_code, found.error_message = _group_error(exc, f"group {group_id!r}")
                continue
            found.node_id, found.address = coordinator.node_id, coordinator.address
        return response

    async def Heartbeat(self, request: pb.GroupHeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> pb.GroupHeartbeatResponse:
        heartbeat = HeartbeatRequest(
            request.group_id, request.member_id, request.member_epoch, request.instance_id,
            request.rebalance_timeout_ms, tuple(request.subscribed_topic_names), request.subscribed_topic_regex,
            request.server_assignor, _tps_from_pb(request.owned_partitions), request.full_request,
            request.client_id, request.client_host or context.peer())
        try:
            result = await self.groups.heartbeat(heartbeat)
        except Exception as exc:
            code, message = _group_error(exc, f"group {request.group_id!r}")
            return pb.GroupHeartbeatResponse(error_code=code, error_message=message, member_id=request.member_id)
        response = pb.GroupHeartbeatResponse(member_id=result.member_id, member_epoch=result.member_epoch,
                                             heartbeat_interval_ms=result.heartbeat_interval_ms)
        if result.assignment is not None:
            response.has_assignment = True
            response.assignment.extend(_tps_to_pb(result.assignment))
        return response

    async def CommitOffsets(self, request: pb.CommitOffsetsRequest,
                            context: grpc.aio.ServicerContext) -> pb.CommitOffsetsResponse:
        offsets = [(o.topic, o.partition, o.offset, o.metadata) for o in request.offsets]
        try:
            await self.groups.commit(request.group_id, request.member_id, request.member_epoch, offsets)
        except Exception as exc:
            code, message = _group_error(exc, f"group {request.group_id!r}")
            return pb.CommitOffsetsResponse(error_code=code, error_message=message, results=[
                pb.PartitionResult(topic=o.topic, partition=o.partition, error_code=code) for o in request.offsets])
        return pb.CommitOffsetsResponse(results=[pb.PartitionResult(topic=o.topic, partition=o.partition)
                                                 for o in request.offsets])

    async def FetchOffsets(self, request: pb.FetchOffsetsRequest,
                           context: grpc.aio.ServicerContext) -> pb.FetchOffsetsResponse:
        wanted = sorted(_tps_from_pb(request.partitions)) if request.partitions else None
        try:
            found = self.groups.fetch_offsets(request.group_id, wanted)
        except Exception as exc:
            code, message = _group_error(exc, f"group {request.group_id!r}")
            return pb.FetchOffsetsResponse(error_code=code, error_message=message)
        response = pb.FetchOffsetsResponse()
        for tp in wanted if wanted is not None else sorted(found):
            committed = found.get(tp)
            response.offsets.add(topic=tp[0], partition=tp[1], offset=committed.offset if committed else -1,
                                 metadata=committed.metadata if committed else "",
                                 commit_timestamp_ms=committed.commit_timestamp_ms if committed else -1)
        return response

    async def ListGroups(self, request: pb.ListGroupsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListGroupsResponse:
        listings = {g.group_id: pb.GroupListing(group_id=g.group_id, state=g.state, members=len(g.members))
                    for g in self.groups.local_groups()}
        if not request_is_forwarded(context):
            for node, address in self.broker.peers.items():
                if node == self.broker.node_id:
                    continue
                other = await ask_forwarded(address, pb_grpc.GroupsStub, "ListGroups", request, DESCRIBE_TIMEOUT_S)
                if other is None:
                    continue  # that broker is down: the groups it coordinates move to others
                for listing in other.groups:
                    listings.setdefault(listing.group_id, listing)
        return pb.ListGroupsResponse(groups=[listings[g] for g in sorted(listings)])

    async def DescribeGroups(self, request: pb.DescribeGroupsRequest,
                             context: grpc.aio.ServicerContext) -> pb.DescribeGroupsResponse:
        response = pb.DescribeGroupsResponse()
        for group_id in request.group_ids:
            described = response.groups.add(group_id=group_id, coordinator_id=self.broker.node_id)
            try:
                group = self.groups.describe(group_id)
                if group is None:
                    raise GroupIdNotFound(f"group {group_id!r} does not exist (no member and no committed offset)")
            except Exception as exc:
                described.error_code, described.error_message = _group_error(exc, f"group {group_id!r}")
                continue
            described.state, described.group_epoch = group.state, group.epoch
            described.assignment_epoch, described.assignor = group.assignment_epoch, group.assignor
            for member in sorted(group.members.values(), key=lambda m: m.member_id):
                described.members.add(
                    member_id=member.member_id, instance_id=member.instance_id, client_id=member.client_id,
                    client_host=member.client_host, member_epoch=member.epoch,
                    subscribed_topic_names=member.topics, subscribed_topic_regex=member.regex,
                    assignment=_tps_to_pb(member.assigned),
                    target_assignment=_tps_to_pb(group.targets.get(member.member_id, frozenset())))
            for (topic, partition), committed in sorted(group.offsets.items()):
                described.offsets.add(topic=topic, partition=partition, offset=committed.offset,
                                      metadata=committed.metadata, commit_timestamp_ms=committed.commit_timestamp_ms)
        return response

    async def DeleteGroups(self, request: pb.DeleteGroupsRequest,
                           context: grpc.aio.ServicerContext) -> pb.DeleteGroupsResponse:
        response = pb.DeleteGroupsResponse()
        for group_id in request.group_ids:
            result = response.results.add(group_id=group_id)
            try:
                await self.groups.delete(group_id)
            except Exception as exc:
                result.error_code, result.error_message = _group_error(exc, f"group {group_id!r}")
        return response


def request_is_forwarded(context: grpc.aio.ServicerContext) -> bool:
    return any(key == FORWARDED_METADATA_KEY for key, _ in context.invocation_metadata() or ())


ACK_KINDS = {pb.AckType.ACCEPT: "accept", pb.AckType.RELEASE: "release", pb.AckType.REJECT: "reject",
             pb.AckType.RENEW: "renew"}
DEFAULT_SHARE_MAX_RECORDS = 500
MAX_SHARE_MAX_RECORDS = 10_000
SHARE_POLL_S = 0.1  # a waiting share fetch looks again at least this often


@dataclass(frozen=True)
class Ack:
    first_offset: int
    last_offset: int
    kind: str
    delay_ms: int
    reason: str


def _acks_from_pb(ranges: Iterable[pb.AckRange]) -> list[Ack]:
    acks = []
    for r in ranges:
        kind = ACK_KINDS.get(r.type)
        if kind is None:
            raise errors.InvalidRequest(f"acknowledgement type {r.type} is not accept, release, reject or renew")
        if r.delay_ms < 0:
            raise errors.InvalidRequest(f"a release delay of {r.delay_ms} ms is negative")
        acks.append(Ack(r.first_offset, r.last_offset, kind, r.delay_ms, r.reason[:1000]))
    return acks


def _ack_results(outcomes: Iterable[Any]) -> list[pb.AckResult]:
    return [pb.AckResult(first_offset=o.first_offset, last_offset=o.last_offset,
                         error_code=pb.ErrorCode.INVALID_RECORD_STATE if o.error else pb.ErrorCode.NONE,
                         error_message=o.error) for o in outcomes]


class ShareService(pb_grpc.ShareServicer):
    """Share groups (queues): acquire records with locks, acknowledge them, describe the queue."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def _check(self, group_id: str, member_id: str) -> None:
        check_group_id(group_id)
        if not member_id or len(member_id) > 255:
            raise errors.InvalidRequest(f"share group {group_id!r}: a member id of 1 to 255 characters is required")

    async def ShareFetch(self, request: pb.ShareFetchRequest,
                         context: grpc.aio.ServicerContext) -> pb.ShareFetchResponse:
        try:
            self._check(request.group_id, request.member_id)
            acks = {(p.topic, p.partition): _acks_from_pb(p.acks) for p in request.partitions}
        except Exception as exc:
            code, message = _group_error(exc, f"share group {request.group_id!r}")
            return pb.ShareFetchResponse(partitions=[pb.SharePartitionData(
                topic=p.topic, partition=p.partition, error_code=code, error_message=message)
                for p in request.partitions])
        budget = min(request.max_records or DEFAULT_SHARE_MAX_RECORDS, MAX_SHARE_MAX_RECORDS)
        wait_s = min(max(request.max_wait_ms, 0), self.broker.config.max_fetch_wait_ms) / 1000
        deadline = time.monotonic() + wait_s
        results = [pb.SharePartitionData(topic=p.topic, partition=p.partition) for p in request.partitions]
        while True:
            for result in results:
                if result.error_code:
                    continue
                taken = await self._fetch_one(request, result, acks.pop((result.topic, result.partition), []),
                                              budget)
                budget -= taken
            remaining = deadline - time.monotonic()
            if budget <= 0 or remaining <= 0 or any(r.acquired or r.error_code for r in results):
                return pb.ShareFetchResponse(partitions=results)
            await self.broker.data.wait_for_data(self._share_wait_s(request.group_id, results, remaining))

    def _share_wait_s(self, group_id: str, results: list[pb.SharePartitionData], remaining_s: float) -> float:
        """How long a share fetch sleeps before looking again: until new data (which wakes it), a delayed or
        backed-off record is due, or SHARE_POLL_S passes (a lock expiring elsewhere frees records too)."""
        wait_s = min(remaining_s, SHARE_POLL_S)
        now = time.time() * 1000
        for result in results:
            with contextlib.suppress(Exception):  # not led here any more: the next round reports it
                due_ms = self.broker.share_groups.share_machine(result.topic, result.partition).next_due_ms(group_id)
                if due_ms is not None:
                    wait_s = min(wait_s, max(0.0, (due_ms - now) / 1000))
        return wait_s

    async def _fetch_one(self, request: pb.ShareFetchRequest, result: pb.SharePartitionData, acks: list[Ack],
                         budget: int) -> int:
        where = f"{result.topic}-{result.partition}"
        try:
            machine = self.broker.share_groups.share_machine(result.topic, result.partition)
            outcome = await machine.fetch(request.group_id, request.member_id, acks, max(budget, 0))
        except Exception as exc:
            _fill_error(result, _as_broker_error(exc, where), where)
            return 0
        result.ack_results.extend(_ack_results(outcome.acks))
        if outcome.acks:  # finished records may move the window on: other members waiting for records look again
            self.broker.data.wake_fetchers()
        taken = sum(a.last_offset - a.first_offset + 1 for a in outcome.acquired)
        if outcome.acquired:
            result.records += outcome.records
            result.acquired.extend(pb.AcquiredRange(first_offset=a.first_offset, last_offset=a.last_offset,
                                                    delivery_count=a.delivery_count,
                                                    lock_deadline_ms=a.lock_deadline_ms) for a in outcome.acquired)
            self.broker.metrics.record_delivered(result.topic, result.partition, taken, len(outcome.records))
        return taken

    async def ShareAcknowledge(self, request: pb.ShareAcknowledgeRequest,
                               context: grpc.aio.ServicerContext) -> pb.ShareAcknowledgeResponse:
        response = pb.ShareAcknowledgeResponse()
        for part in request.partitions:
            result = response.partitions.add(topic=part.topic, partition=part.partition)
            where = f"{part.topic}-{part.partition}"
            try:
                self._check(request.group_id, request.member_id)
            except Exception as exc:
                result.error_code, result.error_message = _group_error(exc, f"share group {request.group_id!r}")
                continue
            try:
                machine = self.broker.share_groups.share_machine(part.topic, part.partition)
                outcomes = await machine.acknowledge(request.group_id, request.member_id, _acks_from_pb(part.acks))
                self.broker.data.wake_fetchers()  # as in ShareFetch: the window may have moved on
            except Exception as exc:
                _fill_error(result, _as_broker_error(exc, where), where)
                continue
            result.ack_results.extend(_ack_results(outcomes))
        return response

    async def DescribeSharePartitions(self, request: pb.DescribeSharePartitionsRequest,
                                      context: grpc.aio.ServicerContext) -> pb.DescribeSharePartitionsResponse:
        response = pb.DescribeSharePartitionsResponse()
        for topic, partition in sorted(_tps_from_pb(request.partitions)):
            described = response.partitions.add(topic=topic, partition=partition)
            try:
                state = self.broker.share_groups.share_machine(topic, partition).describe(request.group_id)
            except Exception as exc:
                described.error_code, described.error_message = _error(_as_broker_error(exc, topic), topic)
                continue
            if state is None:
                continue  # the group has not read this partition yet
            described.start_offset, described.available = state["start_offset"], state["available"]
            described.in_flight, described.delayed = state["in_flight"], state["delayed"]
            described.dead_lettered = state["dead_lettered"]
            described.oldest_available_age_ms = state["oldest_available_age_ms"]
            described.in_flight_by_member.update(state["in_flight_by_member"])
        return response


def _as_broker_error(exc: Exception, where: str) -> Exception:
    if isinstance(exc, NotShareLeader):
        return errors.NotLeader(str(exc), leader_id=-1)
    if isinstance(exc, TimeoutError):
        return errors.RequestTimedOut(f"{where}: the share-group state was not committed in time; retry")
    if isinstance(exc, (NotLeaderError, ProposalDroppedError)):
        return errors.NotLeader(f"{where}: leadership is moving; retry", leader_id=-1)
    if isinstance(exc, GroupError):
        return errors.InvalidRequest(exc.message)
    return exc


async def send_dead_letter(address: str, partition_topic: tuple[str, int], batch: bytes) -> None:
    """Produce one dead-letter batch at the partition's leader (acks=all); raise on any error."""
    topic, index = partition_topic
    request = pb.ProduceRequest(acks=-1, timeout_ms=int(FORWARD_TIMEOUT_S * 1000), partitions=[
        pb.PartitionRecords(topic=topic, partition=index, records=batch)])
    async with grpc.aio.insecure_channel(address) as channel:
        answer = await pb_grpc.BrokerStub(channel).Produce(request, timeout=FORWARD_TIMEOUT_S)
    result = answer.results[0]
    if result.error_code and errors.ALREADY_STORED_MARKER in result.error_message:
        raise errors.DuplicateSequence(result.error_message)
    if result.error_code:
        raise errors.LeaderNotAvailable(f"dead letter to {topic}-{index} at {address}: {result.error_message}")


async def create_topic_at(address: str, name: str, partitions: int) -> None:
    """Ask the controller leader at address to create a topic the broker needs (its replication factor is the
    broker default); an existing topic is fine."""
    request = pb.CreateTopicsRequest(topics=[pb.NewTopic(name=name, partitions=partitions)],
                                     timeout_ms=int(FORWARD_TIMEOUT_S * 1000))
    async with grpc.aio.insecure_channel(address) as channel:
        answer = await pb_grpc.AdminStub(channel).CreateTopics(request, timeout=FORWARD_TIMEOUT_S)
    result = answer.results[0]
    if result.error_code and result.error_code != pb.ErrorCode.TOPIC_ALREADY_EXISTS:
        raise errors.LeaderNotAvailable(f"creating topic {name!r} at {address}: {result.error_message}")
