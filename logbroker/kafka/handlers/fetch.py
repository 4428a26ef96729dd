"""Fetch and ListOffsets: whole stored batches, long-polled, with last stable offset = high watermark."""

from __future__ import annotations

import struct
import time
from typing import Any

from kio.schema.errors import ErrorCode
from logbroker_client import records as rec

from logbroker.kafka.context import Context
from logbroker.kafka.errors import kafka_error
from logbroker.kafka.handlers.epochs import epoch_of_offset, leader_epoch_error
from logbroker.kafka.versions import api, make, nested, response_class
from logbroker.server.quotas import FETCH

DEFAULT_PARTITION_MAX_BYTES = 1 << 20


def _read_all(ctx: Context, cls: type, request: Any) -> tuple[list[Any], int, bool]:
    """One pass over the requested partitions: (topic responses, bytes of data batches, whether any partition
    failed)."""
    topic_cls = nested(cls, "FetchableTopicResponse")
    part_cls = nested(cls, "PartitionData")
    config = ctx.broker.config  # its caps win over the request's limits, as on the gRPC port
    budget = min(request.max_bytes if request.max_bytes > 0 else DEFAULT_PARTITION_MAX_BYTES, config.max_fetch_bytes)
    total = 0
    failed = False
    topics = []
    for topic in request.topics:
        parts = []
        for part in topic.partitions:
            limit = min(part.partition_max_bytes if part.partition_max_bytes > 0 else DEFAULT_PARTITION_MAX_BYTES,
                        config.max_partition_fetch_bytes)
            try:
                fenced = leader_epoch_error(ctx, topic.topic, part.partition,
                                            getattr(part, "current_leader_epoch", -1))
                if fenced is not None:
                    raise _Fenced(fenced)
                # Once some bytes are in, the request's budget caps the rest; the first batch always comes
                # whole, however large (Kafka's rule, so a consumer never gets stuck behind a big batch).
                fetched = ctx.broker.data.read(topic.topic, part.partition, part.fetch_offset,
                                          max(1, min(limit, budget - total)) if total else limit)
            except Exception as exc:
                code = exc.code if isinstance(exc, _Fenced) else kafka_error(exc, f"{topic.topic}-{part.partition}")[0]
                failed = True
                parts.append(make(part_cls, partition_index=part.partition, error_code=code, high_watermark=-1,
                                  last_stable_offset=-1, log_start_offset=-1, aborted_transactions=None,
                                  preferred_read_replica=-1, records=None))
                continue
            records = fetched.records
            if total and total + len(records) > budget:
                records = b""
            records, data_bytes = emptied_control_batches(records)
            total += data_bytes
            parts.append(make(part_cls, partition_index=part.partition, error_code=ErrorCode.none,
                              high_watermark=fetched.high_watermark, last_stable_offset=fetched.high_watermark,
                              log_start_offset=fetched.log_start_offset, aborted_transactions=(),
                              preferred_read_replica=-1, records=records))
        topics.append(make(topic_cls, topic=topic.topic, partitions=tuple(parts)))
    return topics, total, failed


def _count_fetched(ctx: Context, topics: list[Any]) -> None:
    """The fetch metrics (records and bytes sent), for the answer that goes out."""
    metrics = getattr(ctx.broker, "metrics", None)
    if metrics is None:
        return
    for topic in topics:
        for part in topic.partitions:
            if part.records:
                metrics.record_fetched(topic.topic, part.partition_index, part.records)


@api(1, "Fetch", 4, 12)
async def fetch(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(1, version)
    if getattr(request, "session_id", 0):
        # No fetch sessions (KIP-227) are created here (we answer session id 0), so none can be named.
        return make(cls, throttle_time=0, error_code=ErrorCode.fetch_session_id_not_found, session_id=0,
                    responses=())
    max_wait_ms = min(max(int(request.max_wait.total_seconds() * 1000), 0), ctx.broker.config.max_fetch_wait_ms)
    deadline = time.monotonic() + max_wait_ms / 1000
    min_bytes = max(request.min_bytes, 1)
    backpressure = ctx.broker.backpressure
    await backpressure.hold_while_in_debt(ctx.client_id, FETCH)  # a client that ignored its last throttle time
    while True:
        topics, total, failed = _read_all(ctx, cls, request)
        remaining = deadline - time.monotonic()
        if total >= min_bytes or remaining <= 0 or failed:
            _count_fetched(ctx, topics)
            return make(cls, throttle_time=backpressure.fetched(ctx.client_id, total), error_code=ErrorCode.none,
                        session_id=0, responses=tuple(topics))
        await ctx.broker.data.wait_for_data(remaining)


@api(2, "ListOffsets", 1, 6)
async def list_offsets(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(2, version)
    topic_cls = nested(cls, "ListOffsetsTopicResponse")
    part_cls = nested(cls, "ListOffsetsPartitionResponse")
    topics = []
    for topic in request.topics:
        parts = []
        for part in topic.partitions:
            offset, timestamp, epoch = -1, -1, -1
            try:
                code = leader_epoch_error(ctx, topic.name, part.partition_index,
                                          getattr(part, "current_leader_epoch", -1)) or ErrorCode.none
                if code is ErrorCode.none:
                    offset, timestamp = ctx.broker.data.list_offset(topic.name, part.partition_index, part.timestamp)
                    epoch = epoch_of_offset(ctx, topic.name, part.partition_index, offset) if offset >= 0 else -1
            except Exception as exc:
                code, _ = kafka_error(exc, f"{topic.name}-{part.partition_index}")
                offset, timestamp, epoch = -1, -1, -1
            parts.append(make(part_cls, partition_index=part.partition_index, error_code=code,
                              timestamp=timestamp, offset=offset, leader_epoch=epoch))
        topics.append(make(topic_cls, name=topic.name, partitions=tuple(parts)))
    return make(cls, throttle_time=0, topics=tuple(topics))


class _Fenced(Exception):
    """The request's leader epoch is not the leader's (its Kafka code rides along)."""

    def __init__(self, code: ErrorCode) -> None:
        super().__init__(code.name)
        self.code = code


def emptied_control_batches(records: bytes) -> tuple[bytes, int]:
    """The fetched batches with each control batch (Raft no-ops, share-group state: logbroker's own) turned into
    an empty data batch over the same offsets, and the bytes of the data batches.

    Kafka clients skip both kinds the same way, past the batch's last offset (compaction leaves empty batches
    too), but clients older than transactions (kafka-python 2.0.2 among them) hand a control batch's records to
    the application as if they were data. Only the data bytes count toward a fetch's min_bytes, so a consumer
    at the end of the log long-polls rather than spinning on a no-op."""
    control = [(pos, header) for pos, header in rec.iter_batch_headers(records) if header.is_control]
    if not control:
        return records, len(records)
    out = bytearray()
    start = 0
    for pos, header in control:
        out += records[start:pos]
        out += _empty_batch(header)
        start = pos + header.size
    out += records[start:]
    return bytes(out), len(records) - sum(header.size for _, header in control)


def _empty_batch(header: rec.BatchHeader) -> bytes:
    batch = bytearray(rec.HEADER.pack(
        header.base_offset, rec.HEADER_SIZE - rec.LOG_OVERHEAD, header.leader_epoch, rec.MAGIC, 0, 0,
        header.last_offset_delta, header.base_timestamp, header.max_timestamp, rec.NO_PRODUCER_ID,
        rec.NO_PRODUCER_EPOCH, rec.NO_SEQUENCE, 0))
    struct.pack_into(">I", batch, rec.CRC_POSITION, rec.crc32c(memoryview(batch)[rec.CRC_START:]))
    return bytes(batch)
