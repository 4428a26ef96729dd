"""Leader epochs on the Kafka port (KIP-320): fencing by the client's epoch, and OffsetForLeaderEpoch.

A partition's leader epoch is its Raft term: the leader stamps it into every batch it appends, and the
leader-epoch cache of the log (logbroker/storage/leader_epochs.py) knows where each began. A client that
saw epoch E in Metadata sends it with Fetch and ListOffsets; a leader in a later epoch answers
FENCED_LEADER_EPOCH (refresh your metadata), one still in an earlier epoch UNKNOWN_LEADER_EPOCH (I am
behind, retry). OffsetForLeaderEpoch tells where an epoch ended, from the leader's own log, so a consumer
whose leader changed can find out whether its position was truncated away.
"""

from __future__ import annotations

from typing import Any

from kio.schema.errors import ErrorCode

from logbroker.kafka.context import Context
from logbroker.kafka.errors import kafka_error
from logbroker.kafka.versions import api, make, nested, response_class


def leader_epoch_error(ctx: Context, topic: str, partition: int, current_leader_epoch: int) -> ErrorCode | None:
    """The error for a request made in current_leader_epoch (-1: the client does not say), if any."""
    if current_leader_epoch < 0:
        return None
    term = ctx.broker.replicas.leader_replica(topic, partition).term  # not the leader: raises, mapped by the caller
    if current_leader_epoch < term:
        return ErrorCode.fenced_leader_epoch
    if current_leader_epoch > term:
        return ErrorCode.unknown_leader_epoch
    return None


def epoch_of_offset(ctx: Context, topic: str, partition: int, offset: int) -> int:
    """The leader epoch of the batch holding offset on the leader (the latest epoch for the log end)."""
    log = ctx.broker.replicas.leader_replica(topic, partition).log
    if log.log_start_offset <= offset < log.log_end_offset:
        return log.epoch_at(offset)
    return log.epochs.latest_epoch()


@api(23, "OffsetForLeaderEpoch", 2, 4)
async def offset_for_leader_epoch(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(23, version)
    topic_cls = nested(cls, "OffsetForLeaderTopicResult")
    part_cls = nested(cls, "EpochEndOffset")
    topics = []
    for topic in request.topics:
        parts = []
        for part in topic.partitions:
            parts.append(_end_offset(ctx, part_cls, topic.topic, part))
        topics.append(make(topic_cls, topic=topic.topic, partitions=tuple(parts)))
    return make(cls, throttle_time=0, topics=tuple(topics))


def _end_offset(ctx: Context, part_cls: type, topic: str, part: Any) -> Any:
    try:
        code = leader_epoch_error(ctx, topic, part.partition, getattr(part, "current_leader_epoch", -1))
        if code is not None:
            return make(part_cls, error_code=code, partition=part.partition, leader_epoch=-1, end_offset=-1)
        log = ctx.broker.replicas.leader_replica(topic, part.partition).log
        epoch, end_offset = log.epochs.end_offset_for(part.leader_epoch, log.log_end_offset)
    except Exception as exc:
        code, _ = kafka_error(exc, f"{topic}-{part.partition}")
        return make(part_cls, error_code=code, partition=part.partition, leader_epoch=-1, end_offset=-1)
    return make(part_cls, error_code=ErrorCode.none, partition=part.partition, leader_epoch=epoch,
                end_offset=end_offset)
