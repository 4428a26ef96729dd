"""Produce and InitProducerId: record batches pass through to the broker core as the client built them."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kio.schema.errors import ErrorCode

from logbroker.kafka.context import Context, refuse_partitions_problem
from logbroker.kafka.errors import kafka_error
from logbroker.kafka.versions import api, make, nested, response_class
from logbroker.server.quotas import InflightFull, throttle_ms

log = logging.getLogger("logbroker.kafka")

VALID_ACKS = (-1, 0, 1)


async def _produce_one(ctx: Context, cls: type, topic: str, part: Any, acks: int, timeout_s: float) -> Any:
    try:
        if acks not in VALID_ACKS:
            return make(cls, index=part.index, error_code=ErrorCode.invalid_required_acks, base_offset=-1,
                        log_append_time=None, log_start_offset=-1, record_errors=(),
                        error_message=f"acks must be -1, 0 or 1, got {acks}")
        result = await ctx.broker.data.produce(topic, part.index, bytes(part.records or b""), acks, timeout_s)
    except Exception as exc:
        code, message = kafka_error(exc, f"{topic}-{part.index}")
        return make(cls, index=part.index, error_code=code, base_offset=-1, log_append_time=None,
                    log_start_offset=-1, record_errors=(), error_message=message)
    return make(cls, index=part.index, error_code=ErrorCode.none, base_offset=result.base_offset,
                log_append_time=None, log_start_offset=result.log_start_offset, record_errors=(),
                error_message=None)


@api(0, "Produce", 0, 9, served_from=3)
async def produce(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(0, version)
    topic_cls = nested(cls, "TopicProduceResponse")
    part_cls = nested(cls, "PartitionProduceResponse")
    refuse_partitions_problem(ctx, "Produce", [(t.name, p.index) for t in request.topic_data for p in t.partition_data])
    acks = int(request.acks)
    timeout_s = max(request.timeout.total_seconds(), 0.001)
    if request.transactional_id is not None:
        log.info("client %s: transactional produce refused (transactions are not supported)", ctx.client_id)
        return make(cls, throttle_time=0, responses=tuple(
            make(topic_cls, name=t.name, partition_responses=tuple(
                make(part_cls, index=p.index, error_code=ErrorCode.transactional_id_authorization_failed,
                     base_offset=-1, log_append_time=None, log_start_offset=-1, record_errors=(),
                     error_message="transactions are not supported by logbroker") for p in t.partition_data))
            for t in request.topic_data))
    size = sum(len(p.records or b"") for t in request.topic_data for p in t.partition_data)
    try:  # the gRPC port's admission: the client's quota and the broker's in-flight bound (KIP-219 throttling)
        async with ctx.broker.backpressure.produce(ctx.client_id, size, timeout_s) as ticket:
            # Started in request order: each partition's batches are proposed before any later request's.
            work = [(t.name, [_produce_one(ctx, part_cls, t.name, p, acks, timeout_s) for p in t.partition_data])
                    for t in request.topic_data]
            done = await asyncio.gather(*(c for _, parts in work for c in parts))
    except InflightFull as full:
        if acks == 0:
            return None
        return make(cls, throttle_time=throttle_ms(full.throttle_s), responses=tuple(
            make(topic_cls, name=t.name, partition_responses=tuple(
                make(part_cls, index=p.index, error_code=ErrorCode.request_timed_out, base_offset=-1,
                     log_append_time=None, log_start_offset=-1, record_errors=(), error_message=full.message)
                for p in t.partition_data)) for t in request.topic_data))
    if acks == 0:
        return None
    responses, i = [], 0
    for name, parts in work:
        responses.append(make(topic_cls, name=name, partition_responses=tuple(done[i:i + len(parts)])))
        i += len(parts)
    return make(cls, throttle_time=ticket.throttle_ms, responses=tuple(responses))


@api(22, "InitProducerId", 0, 4)
async def init_producer_id(ctx: Context, request: Any, version: int) -> Any:
    """A fresh producer id for an idempotent producer (epoch 0). A producer asking to bump the epoch of its
    id (KIP-360, v3+) gets a fresh id instead: its sequences start again at 0 either way."""
    cls = response_class(22, version)
    if request.transactional_id is not None:
        log.info("client %s: InitProducerId for transactional id %r refused (transactions are not supported)",
                 ctx.client_id, request.transactional_id)
        return make(cls, throttle_time=0, error_code=ErrorCode.transactional_id_authorization_failed,
                    producer_id=-1, producer_epoch=-1)
    producer_id = ctx.settings.producer_ids.next_id()
    return make(cls, throttle_time=0, error_code=ErrorCode.none, producer_id=producer_id, producer_epoch=0)
