"""A batch retried by an idempotent producer is stored once and answered with its first offset."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from logbroker_client import Admin, Consumer, TopicPartition
from logbroker_client import records as rec
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from tests.support.brokers import InProcessBroker, wait_until


def batch(values: list[bytes], producer_id: int = -1, sequence: int = -1) -> bytes:
    builder = rec.BatchBuilder()
    for value in values:
        builder.append(1000, None, value)
    return builder.build(producer_id=producer_id, producer_epoch=0 if producer_id >= 0 else -1,
                         base_sequence=sequence)


def produce(stub: pb_grpc.BrokerStub, *batches: bytes) -> pb.PartitionProduceResult:
    """Produce, retrying while a restarted broker elects itself (as clients do)."""
    request = pb.ProduceRequest(acks=-1, partitions=[
        pb.PartitionRecords(topic="idem", partition=0, records=b"".join(batches))])
    answers: list[pb.PartitionProduceResult] = []

    def accepted() -> bool:
        answers.append(stub.Produce(request, timeout=10).results[0])
        return answers[-1].error_code not in (pb.ErrorCode.NOT_LEADER, pb.ErrorCode.NOT_ENOUGH_REPLICAS)

    wait_until(accepted, 10, "a partition leader to accept the batch")
    assert answers[-1].error_code == pb.ErrorCode.NONE, answers[-1].error_message
    return answers[-1]


def stored_values(address: str) -> list[bytes | None]:
    tp = TopicPartition("idem", 0)
    with Consumer(address) as consumer:
        consumer.assign([tp])
        end = consumer.end_offsets([tp])[tp]
        consumer.seek(tp, 0)
        out: list = []
        while consumer.position(tp) < end:
            out.extend(consumer.poll(timeout=1.0))
    return [r.value for r in out]


@pytest.fixture
def stub(bootstrap: str) -> Iterator[pb_grpc.BrokerStub]:
    Admin(bootstrap).create_topic("idem")
    with grpc.insecure_channel(bootstrap) as channel:
        yield pb_grpc.BrokerStub(channel)


def test_a_retried_batch_is_stored_once(stub: pb_grpc.BrokerStub, bootstrap: str) -> None:
    first = produce(stub, batch([b"a", b"b"], producer_id=42, sequence=0))
    retry = produce(stub, batch([b"a", b"b"], producer_id=42, sequence=0))
    assert retry.base_offset == first.base_offset
    assert stored_values(bootstrap) == [b"a", b"b"]


def test_a_retried_request_that_also_carries_a_new_batch_stores_only_the_new_one(
    stub: pb_grpc.BrokerStub, bootstrap: str
) -> None:
    first = produce(stub, batch([b"a"], 42, 0))
    mixed = produce(stub, batch([b"a"], 42, 0), batch([b"b", b"c"], 42, 1))
    assert mixed.batch_base_offsets[0] == first.base_offset
    assert mixed.batch_base_offsets[1] > first.base_offset
    assert stored_values(bootstrap) == [b"a", b"b", b"c"]


def test_batches_without_a_producer_id_are_never_deduplicated(stub: pb_grpc.BrokerStub, bootstrap: str) -> None:
    produce(stub, batch([b"a"]))
    produce(stub, batch([b"a"]))
    assert stored_values(bootstrap) == [b"a", b"a"]


def test_producer_sequences_survive_a_restart(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path / "data").start()
    Admin(broker.address).create_topic("idem")
    with grpc.insecure_channel(broker.address) as channel:
        first = produce(pb_grpc.BrokerStub(channel), batch([b"a"], 42, 0))
    broker.stop()
    restarted = InProcessBroker(tmp_path / "data").start()
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            retry = produce(pb_grpc.BrokerStub(channel), batch([b"a"], 42, 0))
        assert retry.base_offset == first.base_offset
        assert stored_values(restarted.address) == [b"a"]
    finally:
        restarted.stop()
