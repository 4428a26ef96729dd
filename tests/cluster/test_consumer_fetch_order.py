"""A consumer reading partitions led by different brokers takes each broker's answer as it comes: a long poll
at one broker whose partitions are caught up does not hold back another broker's records (fetches in flight
name disjoint partitions, so the order they finish in changes nothing a partition sees)."""

from __future__ import annotations

import asyncio
import time

from logbroker_client import Admin, Consumer, Producer
from logbroker_client.aio import AsyncConsumer
from logbroker_client.types import TopicPartition

from tests.support.brokers import wait_until
from tests.support.cluster import BrokerCluster

TOPIC = "spread"
LONG_POLL_MS = 8_000  # far longer than any poll below waits: an answer that waited for it would be late
DEADLINE_S = 20.0


def partitions_on_two_leaders(cluster: BrokerCluster) -> tuple[TopicPartition, TopicPartition]:
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic(TOPIC, partitions=3, replication_factor=1)
    leaders: dict[int, int] = {}

    def known() -> bool:
        with Admin(cluster.bootstrap) as admin:
            parts = admin.describe_topics([TOPIC])[0].partitions
        leaders.update({p.partition: p.leader_id for p in parts if p.leader_id > 0})
        return len(set(leaders.values())) >= 2 and len(leaders) == 3

    wait_until(known, DEADLINE_S, "partitions led by two brokers")
    idle = 0
    busy = next(p for p, leader in leaders.items() if leader != leaders[idle])
    return TopicPartition(TOPIC, idle), TopicPartition(TOPIC, busy)


def test_a_long_poll_at_one_broker_does_not_hold_back_another_brokers_records(cluster: BrokerCluster) -> None:
    idle, busy = partitions_on_two_leaders(cluster)
    with Producer(cluster.bootstrap, linger_ms=0) as producer:
        for i in range(5):
            producer.send(TOPIC, f"job-{i}".encode(), partition=busy.partition).result(DEADLINE_S)
    with Consumer(cluster.bootstrap, fetch_max_wait_ms=LONG_POLL_MS, auto_offset_reset="earliest") as consumer:
        consumer.assign([idle])
        assert consumer.poll(timeout=0.3) == []  # a long poll is now in flight at the idle partition's leader
        oldest = consumer._fetch.in_flight[0]
        consumer.assign([idle, busy])
        values: list[bytes | None] = []
        deadline = time.monotonic() + DEADLINE_S
        while len(values) < 5 and time.monotonic() < deadline:
            values += [r.value for r in consumer.poll(timeout=1.0)]
        assert values == [f"job-{i}".encode() for i in range(5)]
        # The busy broker's answer was taken while the idle broker's long poll was still open.
        assert oldest in consumer._fetch.in_flight and not oldest.handle.done()


def test_the_asyncio_consumer_too(cluster: BrokerCluster) -> None:
    idle, busy = partitions_on_two_leaders(cluster)
    with Producer(cluster.bootstrap, linger_ms=0) as producer:
        for i in range(5):
            producer.send(TOPIC, f"job-{i}".encode(), partition=busy.partition).result(DEADLINE_S)

    async def consume() -> tuple[list[bytes | None], bool]:
        async with AsyncConsumer(cluster.bootstrap, fetch_max_wait_ms=LONG_POLL_MS,
                                 auto_offset_reset="earliest") as consumer:
            await consumer.assign([idle])
            assert await consumer.poll(timeout=0.3) == []
            oldest = consumer._fetch.in_flight[0]
            await consumer.assign([idle, busy])
            values: list[bytes | None] = []
            deadline = time.monotonic() + DEADLINE_S
            while len(values) < 5 and time.monotonic() < deadline:
                values += [r.value for r in await consumer.poll(timeout=1.0)]
            return values, oldest in consumer._fetch.in_flight and not oldest.handle.done()

    values, long_poll_still_open = asyncio.run(consume())
    assert values == [f"job-{i}".encode() for i in range(5)]
    assert long_poll_still_open
