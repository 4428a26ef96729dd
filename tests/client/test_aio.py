"""The asyncio clients against a real broker: admin, produce, consume, replay, retries."""

from __future__ import annotations

from pathlib import Path

import pytest
from logbroker_client import AsyncAdmin, AsyncConsumer, AsyncProducer, TopicPartition
from logbroker_client.errors import (
    InvalidConfigError,
    InvalidPartitionsError,
    RecordTooLargeError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)

from tests.support.brokers import InProcessBroker


async def consume(bootstrap: str, tp: TopicPartition, start: int, expected: int) -> list:
    async with AsyncConsumer(bootstrap) as consumer:
        await consumer.assign([tp])
        consumer.seek(tp, start)
        records: list = []
        for _ in range(50):
            records.extend(await consumer.poll(timeout=0.5))
            if len(records) >= expected:
                break
        return records


async def test_async_admin_creates_lists_describes_and_deletes(bootstrap: str) -> None:
    async with AsyncAdmin(bootstrap) as admin:
        await admin.create_topic("async-admin", partitions=2, configs={"retention.ms": "60000"})
        with pytest.raises(TopicAlreadyExistsError):
            await admin.create_topic("async-admin")
        assert "async-admin" in await admin.list_topics()
        described = (await admin.describe_topics(["async-admin"]))[0]
        assert (len(described.partitions), described.configs["retention.ms"]) == (2, "60000")
        await admin.delete_topic("async-admin")
        assert "async-admin" not in await admin.list_topics()


async def test_async_admin_alters_configs_and_adds_partitions(bootstrap: str) -> None:
    async with AsyncAdmin(bootstrap) as admin:
        await admin.create_topic("async-grow", partitions=1, configs={"retention.ms": "60000"})
        overrides = await admin.alter_topic_configs("async-grow", {"segment.ms": 3_600_000}, delete=["retention.ms"])
        assert overrides == {"segment.ms": "3600000"}
        with pytest.raises(InvalidConfigError, match="retention.ms"):
            await admin.alter_topic_configs("async-grow", {"retention.ms": "soon"})
        await admin.add_partitions("async-grow", 3)
        described = (await admin.describe_topics(["async-grow"]))[0]
        assert len(described.partitions) == 3 and described.configs.get("retention.ms") != "soon"
        with pytest.raises(InvalidPartitionsError):
            await admin.add_partitions("async-grow", 2)


async def test_an_async_producer_sees_partitions_added_after_it_started(bootstrap: str) -> None:
    async with AsyncAdmin(bootstrap) as admin, AsyncProducer(bootstrap, linger_ms=0) as producer:
        await admin.create_topic("async-later", partitions=1)
        assert (await producer.send_and_wait("async-later", b"first", partition=0)).partition == 0
        await admin.add_partitions("async-later", 3)
        assert (await producer.send_and_wait("async-later", b"later", partition=2)).partition == 2


async def test_async_records_come_back_at_their_offsets(bootstrap: str) -> None:
    async with AsyncAdmin(bootstrap) as admin:
        await admin.create_topic("async-orders", partitions=1)
    async with AsyncProducer(bootstrap, acks="all") as producer:
        futures = [await producer.send("async-orders", b"v%d" % i, key=b"k") for i in range(200)]
        metas = [await f for f in futures]
    first = metas[0].offset
    assert [m.offset for m in metas] == list(range(first, first + 200))
    records = await consume(bootstrap, TopicPartition("async-orders", 0), first + 50, 150)
    assert [(r.offset, r.value) for r in records] == [(first + i, b"v%d" % i) for i in range(50, 200)]


async def test_async_consumer_finds_offsets_by_time_and_the_end(bootstrap: str) -> None:
    async with AsyncAdmin(bootstrap) as admin:
        await admin.create_topic("async-timed", partitions=1)
    base = 1_700_000_000_000
    async with AsyncProducer(bootstrap, acks=1) as producer:
        metas = [await producer.send_and_wait("async-timed", b"%d" % i, timestamp_ms=base + i) for i in range(10)]
    tp = TopicPartition("async-timed", 0)
    async with AsyncConsumer(bootstrap) as consumer:
        await consumer.assign([tp])
        found = await consumer.offsets_for_times({tp: base + 4})
        assert found[tp] is not None and found[tp].offset == metas[4].offset
        await consumer.seek_to_end(tp)
        assert await consumer.position(tp) == metas[-1].offset + 1


async def test_async_send_to_an_unknown_topic_names_it(bootstrap: str) -> None:
    async with AsyncProducer(bootstrap) as producer:
        with pytest.raises(UnknownTopicOrPartitionError, match="'ghost'"):
            await producer.send("ghost", b"x")


async def test_async_producer_delivers_to_a_restarted_broker(tmp_path: Path) -> None:
    first = InProcessBroker(tmp_path / "data").start()
    async with AsyncAdmin(first.address) as admin:
        await admin.create_topic("async-retry", partitions=1)
    first.stop()
    restarted = InProcessBroker(tmp_path / "data").start()  # a new port; partition leader not yet elected
    try:
        async with AsyncProducer(restarted.address, acks="all") as producer:
            meta = await producer.send_and_wait("async-retry", b"after restart")
        records = await consume(restarted.address, TopicPartition("async-retry", 0), meta.offset, 1)
        assert [r.value for r in records] == [b"after restart"]
    finally:
        restarted.stop()


async def test_async_producer_refuses_an_oversized_record_and_a_missing_partition(bootstrap: str) -> None:
    async with AsyncAdmin(bootstrap) as admin:
        await admin.create_topic("async-limits", partitions=2)
    async with AsyncProducer(bootstrap, max_request_bytes=1000) as producer:
        with pytest.raises(RecordTooLargeError, match="nothing was sent"):
            await producer.send("async-limits", b"x" * 2000)
        with pytest.raises(UnknownTopicOrPartitionError, match="partitions 0..1"):
            await producer.send("async-limits", b"x", partition=5)
        meta = await producer.send_and_wait("async-limits", b"fits", partition=1)
    records = await consume(bootstrap, TopicPartition("async-limits", 1), 0, 1)
    assert [(r.offset, r.value) for r in records] == [(meta.offset, b"fits")]  # the refused record never went
