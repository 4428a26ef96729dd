"""Both producers ride out a leader change the same way (producer_core.py): the partition's leader is SIGKILLed
while records are in flight, and every record is acknowledged, stored once and in order, by the new leader."""

from __future__ import annotations

import asyncio

from logbroker_client import Admin, AsyncProducer, Producer

from tests.support.checker import read_log
from tests.support.cluster import BrokerCluster

BEFORE = 200
AFTER = 300
OPTIONS = {"acks": "all", "linger_ms": 2, "request_timeout_ms": 2000, "delivery_timeout_ms": 60_000}


def setup(cluster: BrokerCluster, topic: str) -> int:
    with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic(topic, partitions=1, replication_factor=3)
    return cluster.leader_of(topic, 0)


def check(cluster: BrokerCluster, topic: str, offsets: list[int], killed: int) -> None:
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets), "acknowledged out of order or twice"
    assert cluster.leader_of(topic, 0, exclude=(killed,)) != killed
    cluster.wait_caught_up(topic, 0, nodes=[node for node in cluster.brokers if node != killed])
    stored = [r.value for r in read_log(cluster.bootstrap, topic, [0])[0]]
    assert stored == [b"%d" % i for i in range(BEFORE + AFTER)]  # each once, in the order sent


def test_the_producer_rides_out_a_leader_change(cluster: BrokerCluster) -> None:
    leader = setup(cluster, "moving")
    with Producer(cluster.bootstrap, **OPTIONS) as producer:  # type: ignore[arg-type]
        futures = [producer.send("moving", b"%d" % i, partition=0) for i in range(BEFORE)]
        futures[-1].result(timeout=30)
        cluster.kill(leader)
        futures += [producer.send("moving", b"%d" % i, partition=0) for i in range(BEFORE, BEFORE + AFTER)]
        assert producer.flush(timeout=60) == 0
        offsets = [f.result(timeout=0).offset for f in futures]
    check(cluster, "moving", offsets, leader)


def test_the_async_producer_rides_out_a_leader_change(cluster: BrokerCluster) -> None:
    leader = setup(cluster, "moving-async")

    async def produce() -> list[int]:
        async with AsyncProducer(cluster.bootstrap, **OPTIONS) as producer:  # type: ignore[arg-type]
            futures = [await producer.send("moving-async", b"%d" % i, partition=0) for i in range(BEFORE)]
            await futures[-1]
            cluster.kill(leader)
            for i in range(BEFORE, BEFORE + AFTER):
                futures.append(await producer.send("moving-async", b"%d" % i, partition=0))
            assert await producer.flush(timeout=60) == 0
            return [(await f).offset for f in futures]

    check(cluster, "moving-async", asyncio.run(produce()), leader)
