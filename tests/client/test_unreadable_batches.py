"""A stored batch that cannot be read (records that contradict its header, as a broker from before the produce
check stored them, or bytes damaged on disk) raises CorruptBatchError naming it and the seek that skips it;
records before it are handed out first, and after the seek both consumers read on."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from logbroker_client import Admin, AsyncConsumer, Consumer, Producer, TopicPartition
from logbroker_client import records as rec
from logbroker_client.errors import CorruptBatchError
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from tests.support.batches import LYING_BATCHES
from tests.support.brokers import InProcessBroker

TP0 = TopicPartition("t", 0)
TP1 = TopicPartition("t", 1)
POLLS = 40  # each poll waits at most its timeout for data: a bound, not a sleep


class Stored:
    """Offsets of what was written to partition 0: good batch A, the unreadable batch, good batch C."""

    def __init__(self, good_before: int, broken: int, good_after: int) -> None:
        self.good_before = good_before
        self.broken = broken
        self.skip_to = broken + 3  # each lying batch claims three records
        self.good_after = good_after


def good_batch(label: bytes) -> bytes:
    return rec.build_batch([(1000 + i, None, label + b"%d" % i, []) for i in range(3)])


def produce(stub: pb_grpc.BrokerStub, partition: int, records: bytes) -> int:
    request = pb.ProduceRequest(acks=-1, partitions=[
        pb.PartitionRecords(topic="t", partition=partition, records=records)])
    result = stub.Produce(request, timeout=10).results[0]
    assert result.error_code == pb.ErrorCode.NONE, result.error_message
    return result.base_offset


@pytest.fixture
def stub(bootstrap: str) -> Iterator[pb_grpc.BrokerStub]:
    Admin(bootstrap).create_topic("t", partitions=2)
    with grpc.insecure_channel(bootstrap) as channel:
        yield pb_grpc.BrokerStub(channel)


def store(stub: pb_grpc.BrokerStub, lying: bytes, monkeypatch: pytest.MonkeyPatch) -> Stored:
    good_before = produce(stub, 0, good_batch(b"a"))
    with monkeypatch.context() as old_broker:  # the in-process broker, as before it walked records
        old_broker.setattr(rec, "validate_records", lambda *args, **kwargs: None)
        broken = produce(stub, 0, lying)
    good_after = produce(stub, 0, good_batch(b"c"))
    produce(stub, 1, good_batch(b"p1-"))
    return Stored(good_before, broken, good_after)


def expect_named_error(error: CorruptBatchError, stored: Stored) -> None:
    text = str(error)
    assert (error.topic, error.partition) == ("t", 0)
    assert f"t-0: the batch at offset {stored.broken} " in text
    assert f"skip it with seek(TopicPartition('t', 0), {stored.skip_to})" in text


def poll_values(consumer: Consumer, wanted: int) -> list[bytes | None]:
    values: list[bytes | None] = []
    for _ in range(POLLS):
        values += [r.value for r in consumer.poll(timeout=0.5)]
        if len(values) >= wanted:
            break
    return values


def poll_error(consumer: Consumer) -> CorruptBatchError:
    with pytest.raises(CorruptBatchError) as caught:
        for _ in range(POLLS):
            assert consumer.poll(timeout=0.5) == []
    return caught.value


@pytest.mark.parametrize("kind", ["offset deltas", "more records", "fewer records", "key past its record"])
def test_the_consumer_hands_out_records_before_a_broken_batch_then_names_it_and_skips_it_on_seek(
    bootstrap: str, stub: pb_grpc.BrokerStub, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    stored = store(stub, LYING_BATCHES[kind][0](), monkeypatch)
    with Consumer(bootstrap) as consumer:
        consumer.assign([TP0])
        consumer.seek(TP0, stored.good_before)
        assert poll_values(consumer, 3) == [b"a0", b"a1", b"a2"]  # fetched with the broken batch, not lost
        expect_named_error(poll_error(consumer), stored)
        assert consumer.position(TP0) == stored.broken
        expect_named_error(poll_error(consumer), stored)  # until the caller skips it
        consumer.seek(TP0, stored.skip_to)
        assert poll_values(consumer, 3) == [b"c0", b"c1", b"c2"]


def test_a_consumer_positioned_inside_a_broken_batch_is_told_at_once(
    bootstrap: str, stub: pb_grpc.BrokerStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = store(stub, LYING_BATCHES["fewer records"][0](), monkeypatch)
    with Consumer(bootstrap) as consumer:
        consumer.assign([TP0])
        consumer.seek(TP0, stored.broken + 1)
        expect_named_error(poll_error(consumer), stored)


async def async_poll_values(consumer: AsyncConsumer, wanted: int) -> list[tuple[int, bytes | None]]:
    found: list[tuple[int, bytes | None]] = []
    for _ in range(POLLS):
        found += [(r.partition, r.value) for r in await consumer.poll(timeout=0.5)]
        if len(found) >= wanted:
            break
    return found


async def test_the_async_consumer_loses_no_records_names_the_broken_batch_and_skips_it_on_seek(
    bootstrap: str, stub: pb_grpc.BrokerStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = store(stub, LYING_BATCHES["offset deltas"][0](), monkeypatch)
    async with AsyncConsumer(bootstrap) as consumer:
        await consumer.assign([TP0, TP1])
        consumer.seek(TP0, stored.good_before)
        await consumer.seek_to_beginning(TP1)
        # One fetch brings both partitions, and batch A before the broken one: all handed out first.
        found = await async_poll_values(consumer, 6)
        assert sorted(found) == [(0, b"a0"), (0, b"a1"), (0, b"a2"), (1, b"p1-0"), (1, b"p1-1"), (1, b"p1-2")]
        for _ in range(2):  # named at the next poll, and again until the caller skips it
            with pytest.raises(CorruptBatchError) as caught:
                for _ in range(POLLS):
                    assert await consumer.poll(timeout=0.5) == []
            expect_named_error(caught.value, stored)
            assert await consumer.position(TP0) == stored.broken
        consumer.seek(TP0, stored.skip_to)
        assert await async_poll_values(consumer, 3) == [(0, b"c0"), (0, b"c1"), (0, b"c2")]


async def test_the_async_consumer_checks_crcs(broker: InProcessBroker) -> None:
    Admin(broker.address).create_topic("rot")
    with Producer(broker.address, acks="all") as producer:
        damaged = producer.send("rot", value=b"A" * 200).result(timeout=10).offset
        after = producer.send("rot", value=b"after").result(timeout=10).offset
    # Bit rot under a running broker: it reads segments with os.pread, so it serves the damaged bytes.
    segment = next((broker.config.data_dir / "rot-0").glob("*.log"))
    with open(segment, "r+b") as file:
        position = file.read().index(b"A" * 200) + 100  # inside the value: only the CRC can tell
        file.seek(position)
        file.write(b"B")
    tp = TopicPartition("rot", 0)
    async with AsyncConsumer(broker.address) as consumer:
        await consumer.assign([tp])
        consumer.seek(tp, damaged)
        with pytest.raises(CorruptBatchError) as caught:
            for _ in range(POLLS):
                assert await consumer.poll(timeout=0.5) == []
        assert "CRC" in str(caught.value)
        assert f"rot-0: the batch at offset {damaged} " in str(caught.value)
        assert f"skip it with seek(TopicPartition('rot', 0), {after})" in str(caught.value)
        consumer.seek(tp, after)
        assert await async_poll_values(consumer, 1) == [(0, b"after")]
    async with AsyncConsumer(broker.address, check_crcs=False) as unchecked:
        await unchecked.assign([tp])
        unchecked.seek(tp, damaged)
        values = [value for _, value in await async_poll_values(unchecked, 2)]
        assert values == [b"A" * 100 + b"B" + b"A" * 99, b"after"]  # as asked for: the bytes as stored
