"""Bad input gets a clear per-partition error and changes nothing on disk."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from logbroker_client import Admin
from logbroker_client import records as rec
from logbroker_client.errors import (
    InvalidConfigError,
    InvalidPartitionsError,
    InvalidReplicationFactorError,
    InvalidTopicError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc


@pytest.fixture
def stub(bootstrap: str) -> Iterator[pb_grpc.BrokerStub]:
    Admin(bootstrap).create_topic("t", partitions=2, configs={"max.message.bytes": "10000"})
    with grpc.insecure_channel(bootstrap) as channel:
        yield pb_grpc.BrokerStub(channel)


@pytest.fixture
def start(stub: pb_grpc.BrokerStub) -> int:
    """Where partition 0's first record lands: a new leader's no-op control batch comes first."""
    return high_watermark(stub)


def good_batch(n: int = 3, size: int = 10) -> bytes:
    return rec.build_batch([(1000 + i, None, b"x" * size, []) for i in range(n)])


def produce(stub: pb_grpc.BrokerStub, records: bytes, topic: str = "t", partition: int = 0,
            acks: int = 1) -> pb.PartitionProduceResult:
    request = pb.ProduceRequest(acks=acks, partitions=[
        pb.PartitionRecords(topic=topic, partition=partition, records=records)])
    return stub.Produce(request, timeout=10).results[0]


def high_watermark(stub: pb_grpc.BrokerStub, partition: int = 0) -> int:
    query = pb.ListOffsetsPartition(topic="t", partition=partition, timestamp_ms=-1)
    request = pb.ListOffsetsRequest(partitions=[query])
    return stub.ListOffsets(request, timeout=10).results[0].offset


def test_a_good_batch_is_accepted_and_offsets_assigned(stub: pb_grpc.BrokerStub, start: int) -> None:
    assert produce(stub, good_batch()).base_offset == start
    result = produce(stub, good_batch(2) + good_batch(4))
    assert (result.error_code, result.base_offset) == (pb.ErrorCode.NONE, start + 3)
    assert high_watermark(stub) == start + 9


def _flip_crc_covered_byte(batch: bytes) -> bytes:
    damaged = bytearray(batch)
    damaged[-3] ^= 0x01
    return bytes(damaged)


def _wrong_magic(batch: bytes) -> bytes:
    damaged = bytearray(batch)
    damaged[16] = 1
    return bytes(damaged)


def _bad_count(batch: bytes) -> bytes:
    damaged = bytearray(batch)
    struct.pack_into(">i", damaged, 57, 99)
    return bytes(damaged)


@pytest.mark.parametrize("damage, message", [
    (_flip_crc_covered_byte, "CRC mismatch"),
    (_wrong_magic, "magic 1"),
    (lambda b: b[:-5], "truncated"),
    (lambda b: b[:40], "truncated"),
    (lambda b: b + b[:20], "truncated"),
    (_bad_count, "recordsCount"),
])
def test_a_damaged_batch_is_rejected_and_nothing_is_written(
    stub: pb_grpc.BrokerStub, start: int, damage, message: str
) -> None:
    produce(stub, good_batch())
    result = produce(stub, good_batch() + damage(good_batch()))  # a good batch first: all or nothing
    assert result.error_code == pb.ErrorCode.CORRUPT_BATCH
    assert message in result.error_message and "t-0" in result.error_message
    assert high_watermark(stub) == start + 3
    assert produce(stub, good_batch()).base_offset == start + 3


def test_a_request_without_records_is_rejected(stub: pb_grpc.BrokerStub) -> None:
    result = produce(stub, b"")
    assert result.error_code == pb.ErrorCode.CORRUPT_BATCH and "no record batch" in result.error_message


def test_control_batches_from_clients_are_refused(stub: pb_grpc.BrokerStub, start: int) -> None:
    result = produce(stub, rec.build_control_batch(0, 0, 1000))
    assert result.error_code == pb.ErrorCode.CORRUPT_BATCH
    assert high_watermark(stub) == start


def test_an_oversized_batch_is_rejected_with_the_limit_named(stub: pb_grpc.BrokerStub, start: int) -> None:
    result = produce(stub, good_batch(1, size=20_000))
    assert result.error_code == pb.ErrorCode.RECORD_TOO_LARGE
    assert "max.message.bytes=10000" in result.error_message
    assert high_watermark(stub) == start


def test_unknown_topic_and_partition_are_per_partition_errors(stub: pb_grpc.BrokerStub) -> None:
    request = pb.ProduceRequest(acks=1, partitions=[
        pb.PartitionRecords(topic="missing", partition=0, records=good_batch()),
        pb.PartitionRecords(topic="t", partition=7, records=good_batch()),
        pb.PartitionRecords(topic="t", partition=1, records=good_batch()),
    ])
    missing, bad_partition, fine = stub.Produce(request, timeout=10).results
    assert missing.error_code == pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION and "'missing'" in missing.error_message
    assert bad_partition.error_code == pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    assert "partitions 0..1" in bad_partition.error_message
    assert fine.error_code == pb.ErrorCode.NONE
    assert high_watermark(stub, 1) == fine.base_offset + 3


def test_fetching_outside_the_log_is_offset_out_of_range(stub: pb_grpc.BrokerStub, start: int) -> None:
    produce(stub, good_batch())
    request = pb.FetchRequest(max_wait_ms=0, partitions=[pb.FetchPartition(topic="t", partition=0, fetch_offset=50)])
    result = stub.Fetch(request, timeout=10).results[0]
    assert result.error_code == pb.ErrorCode.OFFSET_OUT_OF_RANGE
    assert f"0..{start + 3}" in result.error_message


def test_invalid_acks_fail_the_whole_request(stub: pb_grpc.BrokerStub, start: int) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        produce(stub, good_batch(), acks=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert high_watermark(stub) == start


@pytest.mark.parametrize("name", ["", "has space", "a/b", "..", "x" * 250])
def test_invalid_topic_names_are_refused(bootstrap: str, name: str) -> None:
    with pytest.raises(InvalidTopicError):
        Admin(bootstrap).create_topic(name)
    assert name not in Admin(bootstrap).list_topics()


def test_topic_creation_errors_name_the_problem(bootstrap: str) -> None:
    admin = Admin(bootstrap)
    admin.create_topic("dup")
    with pytest.raises(TopicAlreadyExistsError, match="'dup' already exists"):
        admin.create_topic("dup")
    with pytest.raises(InvalidPartitionsError):
        admin.create_topic("zero", partitions=-5)
    with pytest.raises(InvalidReplicationFactorError, match="1"):
        admin.create_topic("rf", replication_factor=3)
    with pytest.raises(InvalidConfigError, match="retention.ms"):
        admin.create_topic("cfg", configs={"retention.ms": "soon"})
    with pytest.raises(InvalidConfigError, match="cleanup.policy=compact is not supported"):
        admin.create_topic("compacted", configs={"cleanup.policy": "compact"})
    assert admin.list_topics() == ["dup"]


def test_deleting_a_topic_removes_it_and_its_files(broker, bootstrap: str) -> None:
    admin = Admin(bootstrap)
    admin.create_topic("gone", partitions=3)
    assert (broker.config.data_dir / "gone-2").is_dir()
    admin.delete_topic("gone")
    assert "gone" not in admin.list_topics()
    assert not (broker.config.data_dir / "gone-2").exists()
    with pytest.raises(UnknownTopicOrPartitionError):
        admin.delete_topic("gone")


def test_health_and_reflection_services_answer(bootstrap: str) -> None:
    with grpc.insecure_channel(bootstrap) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="logbroker.v1.Broker"), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"logbroker.v1.Broker", "logbroker.v1.Admin", "grpc.health.v1.Health"} <= names
