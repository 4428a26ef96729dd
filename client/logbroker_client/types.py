"""Plain value types shared by the producer, consumer and admin clients."""

from __future__ import annotations

from typing import NamedTuple

from logbroker_client.records import Record

ConsumerRecord = Record  # topic, partition, offset, timestamp, key, value, headers


class TopicPartition(NamedTuple):
    topic: str
    partition: int


class RecordMetadata(NamedTuple):
    """Where an acknowledged record landed. offset is -1 under acks=0 (nobody answers)."""

    topic: str
    partition: int
    offset: int
    timestamp: int


class OffsetAndTimestamp(NamedTuple):
    offset: int
    timestamp: int


class PartitionInfo(NamedTuple):
    partition: int
    leader_id: int
    replicas: list[int]
    isr: list[int]
    log_start_offset: int
    high_watermark: int
    size_bytes: int
    # No live leader: nothing can be written or read. leader_id is then -1, and the offsets are the answering
    # broker's last knowledge (0 when it holds no replica).
    offline: bool = False


class TopicDescription(NamedTuple):
    name: str
    replication_factor: int
    configs: dict[str, str]
    partitions: list[PartitionInfo]
