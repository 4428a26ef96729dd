"""Fetch and ListOffsets: whole stored batches, long-polled, with last stable offset = high watermark."""

from __future__ import annotations

import struct
from typing import Any

from kio.schema.errors import ErrorCode
from logbroker_client import records as rec

from logbroker.kafka.context import Context, refuse_partitions_problem
from logbroker.kafka.errors import kafka_error
from logbroker.kafka.handlers.epochs import epoch_of_offset, leader_epoch_error
from logbroker.kafka.versions import api, make, nested, response_class
from logbroker.server.data_plane import FetchPass

DEFAULT_PARTITION_MAX_BYTES = 1 << 20


async def _read_all(ctx: Context, cls: type, request: Any) -> FetchPass[list[Any]]:
    """One pass over the requested partitions: the topic responses, the bytes of data batches (what counts
    toward min_bytes), whether any partition failed, and what each partition's answer carries."""
    topic_cls = nested(cls, "FetchableTopicResponse")
    part_cls = nested(cls, "PartitionData")
    config = ctx.broker.config  # its caps win over the request's limits, as on the gRPC port
    budget = min(request.max_bytes if request.max_bytes > 0 else DEFAULT_PARTITION_MAX_BYTES, config.max_fetch_bytes)
    total = 0
    failed = False
    topics = []
    delivered: list[tuple[str, int, bytes]] = []
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
                fetched = ctx.broker.data.read_within_budget(topic.topic, part.partition, part.fetch_offset, limit,
                                                             budget, total)
            except Exception as exc:
                code = exc.code if isinstance(exc, _Fenced) else kafka_error(exc, f"{topic.topic}-{part.partition}")[0]
                failed = True
                parts.append(make(part_cls, partition_index=part.partition, error_code=code, high_watermark=-1,
                                  last_stable_offset=-1, log_start_offset=-1, aborted_transactions=None,
                                  preferred_read_replica=-1, records=None))
                continue
            records, data_bytes = emptied_control_batches(fetched.records)
            total += data_bytes
            if records:
                delivered.append((topic.topic, part.partition, records))
            parts.append(make(part_cls, partition_index=part.partition, error_code=ErrorCode.none,
                              high_watermark=fetched.high_watermark, last_stable_offset=fetched.high_watermark,
                              log_start_offset=fetched.log_start_offset, aborted_transactions=(),
                              preferred_read_replica=-1, records=records))
        topics.append(make(topic_cls, topic=topic.topic, partitions=tuple(parts)))
    return FetchPass(topics, total, failed, delivered)


@api(1, "Fetch", 4, 12)
async def fetch(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(1, version)
    refuse_partitions_problem(ctx, "Fetch", [(t.topic, p.partition) for t in request.topics for p in t.partitions])
    if getattr(request, "session_id", 0):
        # No fetch sessions (KIP-227) are created here (we answer session id 0), so none can be named.
        return make(cls, throttle_time=0, error_code=ErrorCode.fetch_session_id_not_found, session_id=0,
                    responses=())
    topics, throttle = await ctx.broker.data.fetch_long_poll(
        ctx.client_id, int(request.max_wait.total_seconds() * 1000), max(request.min_bytes, 1),
        lambda: _read_all(ctx, cls, request))
    return make(cls, throttle_time=throttle, error_code=ErrorCode.none, session_id=0, responses=tuple(topics))


@api(2, "ListOffsets", 1, 6)
async def list_offsets(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(2, version)
    refuse_partitions_problem(ctx, "ListOffsets",
                              [(t.name, p.partition_index) for t in request.topics for p in t.partitions])
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
