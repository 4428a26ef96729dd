"""gRPC services: requests in, Broker calls, per-partition error codes out.

Per-partition failures are answered in the partition's result (error_code + error_message) and never
fail the other partitions of the request; a malformed request as a whole gets INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from logbroker.server import errors
from logbroker.server.broker import Broker

log = logging.getLogger("logbroker.service")

DEFAULT_FETCH_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_PARTITION_FETCH_MAX_BYTES = 1024 * 1024
VALID_ACKS = (-1, 0, 1)


def _error(exc: Exception, where: str) -> tuple[Any, str]:
    if isinstance(exc, errors.BrokerError):
        return exc.code, exc.message
    log.exception("%s: unexpected error", where)
    return pb.ErrorCode.STORAGE_ERROR, f"{where}: internal error {type(exc).__name__}: {exc}; see the broker log"


class BrokerService(pb_grpc.BrokerServicer):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def Produce(self, request: pb.ProduceRequest, context: grpc.aio.ServicerContext) -> pb.ProduceResponse:
        if request.acks not in VALID_ACKS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"acks must be -1 (all), 0 or 1, got {request.acks}")
        results = await asyncio.gather(*(self._produce_one(p, request.acks) for p in request.partitions))
        return pb.ProduceResponse(results=results)

    async def _produce_one(self, part: pb.PartitionRecords, acks: int) -> pb.PartitionProduceResult:
        result = pb.PartitionProduceResult(topic=part.topic, partition=part.partition)
        try:
            produced = await self.broker.produce(part.topic, part.partition, part.records, acks)
        except Exception as exc:
            result.error_code, result.error_message = _error(exc, f"{part.topic}-{part.partition}")
            return result
        result.base_offset = produced.base_offset
        result.log_append_time_ms = produced.log_append_time_ms
        result.log_start_offset = produced.log_start_offset
        return result

    async def Fetch(self, request: pb.FetchRequest, context: grpc.aio.ServicerContext) -> pb.FetchResponse:
        max_wait_ms = min(max(request.max_wait_ms, 0), self.broker.config.max_fetch_wait_ms)
        deadline = time.monotonic() + max_wait_ms / 1000
        min_bytes = max(request.min_bytes, 1)
        while True:
            results, total = self._read_all(request)
            remaining = deadline - time.monotonic()
            if total >= min_bytes or remaining <= 0 or any(r.error_code for r in results):
                return pb.FetchResponse(results=results)
            await self.broker.wait_for_data(remaining)

    def _read_all(self, request: pb.FetchRequest) -> tuple[list[pb.PartitionFetchResult], int]:
        budget = request.max_bytes if request.max_bytes > 0 else DEFAULT_FETCH_MAX_BYTES
        results = []
        total = 0
        for part in request.partitions:
            result = pb.PartitionFetchResult(topic=part.topic, partition=part.partition)
            limit = part.partition_max_bytes if part.partition_max_bytes > 0 else DEFAULT_PARTITION_FETCH_MAX_BYTES
            try:
                # Once some bytes are in, the budget caps the rest; the first batch always fits (Kafka's rule).
                fetched = self.broker.read(part.topic, part.partition, part.fetch_offset,
                                           max(1, min(limit, budget - total)) if total else limit)
            except Exception as exc:
                result.error_code, result.error_message = _error(exc, f"{part.topic}-{part.partition}")
            else:
                if total and total + len(fetched.records) > budget:
                    fetched.records = b""
                result.records = fetched.records
                result.high_watermark = fetched.high_watermark
                result.log_start_offset = fetched.log_start_offset
                total += len(fetched.records)
            results.append(result)
        return results, total

    async def ListOffsets(
        self, request: pb.ListOffsetsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListOffsetsResponse:
        results = []
        for part in request.partitions:
            result = pb.ListOffsetsResult(topic=part.topic, partition=part.partition)
            try:
                result.offset, result.timestamp_ms = self.broker.list_offset(
                    part.topic, part.partition, part.timestamp_ms
                )
            except Exception as exc:
                result.error_code, result.error_message = _error(exc, f"{part.topic}-{part.partition}")
            results.append(result)
        return pb.ListOffsetsResponse(results=results)

    async def Metadata(self, request: pb.MetadataRequest, context: grpc.aio.ServicerContext) -> pb.MetadataResponse:
        config = self.broker.config
        response = pb.MetadataResponse(
            brokers=[pb.BrokerInfo(node_id=config.node_id, host=config.host, port=config.port)],
            controller_id=config.node_id,
            cluster_id=f"logbroker-{config.node_id}",
        )
        names = list(request.topics) or [t.name for t in self.broker.topics()]
        for name in names:
            topic = response.topics.add(name=name)
            try:
                spec = self.broker.topic(name)
            except Exception as exc:
                topic.error_code, topic.error_message = _error(exc, name)
                continue
            for index in range(spec.partitions):
                partition = self.broker.partition(name, index)
                topic.partitions.add(
                    partition=index, leader_id=config.node_id, leader_epoch=partition.leader_epoch,
                    replicas=[config.node_id], isr=[config.node_id],
                )
        return response


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def CreateTopics(
        self, request: pb.CreateTopicsRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTopicsResponse:
        results = []
        for topic in request.topics:
            result = pb.TopicResult(name=topic.name)
            try:
                self.broker.create_topic(
                    topic.name, topic.partitions or -1, topic.replication_factor or -1, dict(topic.configs),
                    validate_only=request.validate_only,
                )
            except Exception as exc:
                result.error_code, result.error_message = _error(exc, topic.name)
            results.append(result)
        return pb.CreateTopicsResponse(results=results)

    async def DeleteTopics(
        self, request: pb.DeleteTopicsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteTopicsResponse:
        results = []
        for name in request.names:
            result = pb.TopicResult(name=name)
            try:
                await self.broker.delete_topic(name)
            except Exception as exc:
                result.error_code, result.error_message = _error(exc, name)
            results.append(result)
        return pb.DeleteTopicsResponse(results=results)

    async def DescribeTopics(
        self, request: pb.DescribeTopicsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DescribeTopicsResponse:
        node_id = self.broker.config.node_id
        response = pb.DescribeTopicsResponse()
        for name in list(request.names) or [t.name for t in self.broker.topics()]:
            described = response.topics.add(name=name)
            try:
                spec = self.broker.topic(name)
            except Exception as exc:
                described.error_code, described.error_message = _error(exc, name)
                continue
            described.replication_factor = spec.replication_factor
            described.configs.update(self.broker.effective_configs(name))
            for index in range(spec.partitions):
                partition = self.broker.partition(name, index)
                described.partitions.add(
                    partition=index, leader_id=node_id, replicas=[node_id], isr=[node_id],
                    log_start_offset=partition.log.log_start_offset, high_watermark=partition.high_watermark,
                    size_bytes=partition.log.size_bytes, leader_epoch=partition.leader_epoch,
                )
        return response
