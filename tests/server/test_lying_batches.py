"""A CRC-valid batch whose records contradict its header is refused as CORRUPT_BATCH on produce; nothing of
the request is written, and the partition reads as before."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import grpc
import pytest
from logbroker_client import Admin
from logbroker_client import records as rec
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from tests.support.batches import LYING_BATCHES, seal


@pytest.fixture
def stub(bootstrap: str) -> Iterator[pb_grpc.BrokerStub]:
    Admin(bootstrap).create_topic("t")
    with grpc.insecure_channel(bootstrap) as channel:
        yield pb_grpc.BrokerStub(channel)


def good_batch(label: bytes) -> bytes:
    return rec.build_batch([(1000 + i, None, label + b"%d" % i, []) for i in range(3)])


def produce(stub: pb_grpc.BrokerStub, records: bytes) -> pb.PartitionProduceResult:
    request = pb.ProduceRequest(acks=1, partitions=[pb.PartitionRecords(topic="t", partition=0, records=records)])
    return stub.Produce(request, timeout=10).results[0]


def high_watermark(stub: pb_grpc.BrokerStub) -> int:
    query = pb.ListOffsetsPartition(topic="t", partition=0, timestamp_ms=-1)
    return stub.ListOffsets(pb.ListOffsetsRequest(partitions=[query]), timeout=10).results[0].offset


def values_from(stub: pb_grpc.BrokerStub, offset: int) -> list[bytes | None]:
    fetch = pb.FetchPartition(topic="t", partition=0, fetch_offset=offset)
    request = pb.FetchRequest(max_wait_ms=0, partitions=[fetch])
    result = stub.Fetch(request, timeout=10).results[0]
    assert result.error_code == pb.ErrorCode.NONE
    return [r.value for _, records in rec.iter_batches(result.records) for r in records]


def assert_refused_and_nothing_written(stub: pb_grpc.BrokerStub, lying: bytes, message: str) -> None:
    before = produce(stub, good_batch(b"before"))
    high = high_watermark(stub)
    same_request = good_batch(b"same-request")  # a good batch first: all or nothing
    result = produce(stub, same_request + lying)
    assert result.error_code == pb.ErrorCode.CORRUPT_BATCH
    assert f"t-0: batch at byte {len(same_request)} of the request rejected" in result.error_message
    assert message in result.error_message and "nothing was written" in result.error_message
    assert high_watermark(stub) == high
    assert produce(stub, good_batch(b"after")).base_offset == high
    expected = [b"before%d" % i for i in range(3)] + [b"after%d" % i for i in range(3)]
    assert values_from(stub, before.base_offset) == expected


@pytest.mark.parametrize("kind", list(LYING_BATCHES))
def test_a_lying_batch_is_refused_and_the_partition_is_unchanged(stub: pb_grpc.BrokerStub, kind: str) -> None:
    build, message = LYING_BATCHES[kind]
    assert_refused_and_nothing_written(stub, build(), message)


def test_a_zstd_frame_claiming_a_gigabyte_is_refused_unread(stub: pb_grpc.BrokerStub) -> None:
    frame = struct.pack("<IBQ", 0xFD2FB528, 0xE0, 1 << 30) + b"\x00" * 8
    lying = seal(frame, count=1, attributes=rec.COMPRESSION_ZSTD)
    assert_refused_and_nothing_written(stub, lying, "declares 1073741824 bytes, over the limit")


def test_good_zstd_batches_are_still_accepted(stub: pb_grpc.BrokerStub) -> None:
    batch = rec.build_batch([(1000 + i, b"k", b"z%d" % i, [("h", b"x")]) for i in range(50)],
                            compression=rec.COMPRESSION_ZSTD)
    result = produce(stub, batch)
    assert result.error_code == pb.ErrorCode.NONE
    assert values_from(stub, result.base_offset) == [b"z%d" % i for i in range(50)]
