"""Idempotent producers over a real broker's gRPC port: a retried batch is stored once and answered with its
first offset; a batch after a gap or from a fenced epoch is refused and nothing of it is stored."""

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


def batch(values: list[bytes], producer_id: int = -1, sequence: int = -1, epoch: int = 0) -> bytes:
    builder = rec.BatchBuilder()
    for value in values:
        builder.append(1000, None, value)
    return builder.build(producer_id=producer_id, producer_epoch=epoch if producer_id >= 0 else -1,
                         base_sequence=sequence)


def produce(stub: pb_grpc.BrokerStub, *batches: bytes, refused: int = pb.ErrorCode.NONE) -> pb.PartitionProduceResult:
    """Produce, retrying while a restarted broker elects itself (as clients do); the answer must carry the
    error code `refused` (NONE: accepted)."""
    request = pb.ProduceRequest(acks=-1, partitions=[
        pb.PartitionRecords(topic="idem", partition=0, records=b"".join(batches))])
    answers: list[pb.PartitionProduceResult] = []

    def accepted() -> bool:
        answers.append(stub.Produce(request, timeout=10).results[0])
        return answers[-1].error_code not in (pb.ErrorCode.NOT_LEADER, pb.ErrorCode.NOT_ENOUGH_REPLICAS)

    wait_until(accepted, 10, "a partition leader to accept the batch")
    assert answers[-1].error_code == refused, answers[-1].error_message
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


def test_a_batch_after_a_gap_is_refused_out_of_order_and_nothing_is_stored(
    stub: pb_grpc.BrokerStub, bootstrap: str
) -> None:
    produce(stub, batch([b"a", b"b"], 42, 0))
    gap = produce(stub, batch([b"d"], 42, 3), refused=pb.ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER)
    assert "expected 2" in gap.error_message and "idem-0" in gap.error_message
    # A request whose second batch is out of order stores neither.
    produce(stub, batch([b"c"], 42, 2), batch([b"e"], 42, 4), refused=pb.ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER)
    produce(stub, batch([b"c"], 42, 2), batch([b"d"], 42, 3))
    assert stored_values(bootstrap) == [b"a", b"b", b"c", b"d"]


def test_an_older_epoch_is_refused_and_a_newer_one_starts_again_at_zero(
    stub: pb_grpc.BrokerStub, bootstrap: str
) -> None:
    produce(stub, batch([b"a"], 42, 0, epoch=3))
    produce(stub, batch([b"x"], 42, 5, epoch=4), refused=pb.ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER)
    produce(stub, batch([b"b"], 42, 0, epoch=4))
    fenced = produce(stub, batch([b"y"], 42, 1, epoch=3), refused=pb.ErrorCode.INVALID_PRODUCER_EPOCH)
    assert "epoch 4 already wrote" in fenced.error_message
    produce(stub, batch([b"c"], 42, 1, epoch=4))
    assert stored_values(bootstrap) == [b"a", b"b", b"c"]


def test_an_unknown_producer_is_accepted_at_any_sequence_as_in_kafka_3(
    stub: pb_grpc.BrokerStub, bootstrap: str
) -> None:
    produce(stub, batch([b"a"], 43, 17))
    produce(stub, batch([b"b"], 43, 18))
    assert stored_values(bootstrap) == [b"a", b"b"]
