"""Leader epochs on the Kafka port (KIP-320): Metadata names each partition's epoch, Fetch and ListOffsets are
fenced by it, and OffsetForLeaderEpoch says exactly where an epoch ended, checked against the epochs stamped
in the batches themselves across a leader kill."""

from __future__ import annotations

import datetime
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kio.schema.errors import ErrorCode
from kio.schema.fetch.v12 import request as fetch
from kio.schema.list_offsets.v6 import request as list_offsets
from kio.schema.metadata.v9 import request as metadata
from kio.schema.offset_for_leader_epoch.v4 import request as epochs
from kio.static.primitive import i8, i32, i32Timedelta, i64
from logbroker_client import Producer
from logbroker_client import records as rec

from tests.kafka.conftest import RAFT_TICK_MS, make_topic
from tests.kafka.wire import WireClient
from tests.support.brokers import wait_until
from tests.support.cluster import BrokerCluster

TOPIC = "epochs"
RECORDS_PER_EPOCH = 20


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[BrokerCluster]:
    cluster = BrokerCluster(tmp_path / "cluster", size=3, raft_tick_ms=RAFT_TICK_MS, kafka=True).start()
    try:
        yield cluster
    finally:
        cluster.stop_all()


def call(cluster: BrokerCluster, node: int, request: Any) -> Any:
    with WireClient(cluster.brokers[node].kafka_address) as client:
        return client.call(request)


def metadata_epoch(cluster: BrokerCluster, node: int) -> tuple[int, int]:
    """(leader, leader epoch) of the partition as `node` advertises them."""
    answer = call(cluster, node, metadata.MetadataRequest(
        topics=(metadata.MetadataRequestTopic(name=TOPIC),), allow_auto_topic_creation=False,
        include_cluster_authorized_operations=False, include_topic_authorized_operations=False))
    part = answer.topics[0].partitions[0]
    return int(part.leader_id), int(part.leader_epoch)


def list_latest(cluster: BrokerCluster, node: int, current_epoch: int) -> Any:
    return call(cluster, node, list_offsets.ListOffsetsRequest(
        replica_id=i32(-1), isolation_level=i8(0), topics=(list_offsets.ListOffsetsTopic(
            name=TOPIC, partitions=(list_offsets.ListOffsetsPartition(
                partition_index=i32(0), current_leader_epoch=i32(current_epoch), timestamp=i64(-1)),)),),
    )).topics[0].partitions[0]


def fetch_all(cluster: BrokerCluster, node: int, current_epoch: int) -> Any:
    return call(cluster, node, fetch.FetchRequest(
        max_wait=i32Timedelta.parse(datetime.timedelta(milliseconds=0)), min_bytes=i32(1), topics=(fetch.FetchTopic(
            topic=TOPIC, partitions=(fetch.FetchPartition(
                partition=i32(0), current_leader_epoch=i32(current_epoch), fetch_offset=i64(0),
                partition_max_bytes=i32(1 << 20)),)),), forgotten_topics_data=())).responses[0].partitions[0]


def end_of_epoch(cluster: BrokerCluster, node: int, epoch: int, current_epoch: int = -1) -> Any:
    return call(cluster, node, epochs.OffsetForLeaderEpochRequest(
        replica_id=i32(-1), topics=(epochs.OffsetForLeaderTopic(topic=TOPIC, partitions=(
            epochs.OffsetForLeaderPartition(partition=i32(0), current_leader_epoch=i32(current_epoch),
                                            leader_epoch=i32(epoch)),)),))).topics[0].partitions[0]


def batch_epochs(records: bytes) -> list[tuple[int, int]]:
    """(base offset, partitionLeaderEpoch) of every batch, read from the bytes as stored."""
    return [(h.base_offset, struct.unpack_from(">i", records, pos + 12)[0])
            for pos, h in rec.iter_batch_headers(records)]


def produce(cluster: BrokerCluster, first: int) -> None:
    with Producer(cluster.bootstrap, acks="all") as producer:
        for i in range(first, first + RECORDS_PER_EPOCH):
            producer.send(TOPIC, value=b"r%d" % i, partition=0)
        producer.flush(timeout=30)


def test_epochs_fence_requests_and_say_where_each_epoch_ended(cluster: BrokerCluster) -> None:
    make_topic(cluster, TOPIC)
    first_leader = cluster.leader_of(TOPIC, 0)
    produce(cluster, 0)
    leader, epoch = metadata_epoch(cluster, first_leader)
    assert leader == first_leader and epoch >= 1
    latest = list_latest(cluster, leader, epoch)
    assert latest.error_code == ErrorCode.none and latest.offset >= RECORDS_PER_EPOCH and latest.leader_epoch == epoch
    assert list_latest(cluster, leader, epoch - 1).error_code == ErrorCode.fenced_leader_epoch
    assert list_latest(cluster, leader, epoch + 1).error_code == ErrorCode.unknown_leader_epoch
    assert fetch_all(cluster, leader, epoch - 1).error_code == ErrorCode.fenced_leader_epoch

    cluster.kill(first_leader)
    new_leader = cluster.leader_of(TOPIC, 0, exclude=(first_leader,))
    produce(cluster, RECORDS_PER_EPOCH)
    wait_until(lambda: metadata_epoch(cluster, new_leader)[1] > epoch, 20, "the new leader's epoch to be advertised")
    _, new_epoch = metadata_epoch(cluster, new_leader)
    stored = batch_epochs(bytes(fetch_all(cluster, new_leader, new_epoch).records or b""))
    first_of_new_epoch = next(offset for offset, stamped in stored if stamped > epoch)
    answer = end_of_epoch(cluster, new_leader, epoch, new_epoch)
    assert (answer.error_code, answer.leader_epoch, answer.end_offset) == (ErrorCode.none, epoch, first_of_new_epoch)
    latest = end_of_epoch(cluster, new_leader, new_epoch)
    assert latest.leader_epoch == new_epoch and latest.end_offset == list_latest(cluster, new_leader, -1).offset
    assert end_of_epoch(cluster, new_leader, 0).end_offset == -1  # before every epoch: undefined
    assert end_of_epoch(cluster, new_leader, epoch, epoch).error_code == ErrorCode.fenced_leader_epoch
