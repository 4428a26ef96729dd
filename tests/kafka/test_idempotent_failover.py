"""confluent-kafka (librdkafka) with enable.idempotence=true produces through the Kafka port while the partition
leader is SIGKILLed: the broker's producer-state table (shared with gRPC) answers its retries, and the checker
finds every acknowledged record stored once, in order (tests.support.checker)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer as CKProducer

from tests.kafka.conftest import RAFT_TICK_MS, make_topic
from tests.support.checker import AckLog, assert_clean, make_value, read_log
from tests.support.cluster import BrokerCluster

TOPIC = "ck-failover"
PARTITIONS = 2
BEFORE_KILL = 3000
AFTER_KILL = 3000


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[BrokerCluster]:
    cluster = BrokerCluster(tmp_path / "cluster", size=3, raft_tick_ms=RAFT_TICK_MS, kafka=True).start()
    try:
        yield cluster
    finally:
        cluster.stop_all()


def _send(producer: CKProducer, acks: AckLog, first: int, count: int) -> None:
    for seq in range(first, first + count):
        value = make_value(seq)

        def on_delivery(err: Any, msg: Any, value: bytes = value) -> None:
            if err is None:
                acks.ack(value, msg.partition(), msg.offset())
            else:
                acks.fail(value, RuntimeError(str(err)))

        while True:
            try:
                producer.produce(TOPIC, value=value, partition=seq % PARTITIONS, on_delivery=on_delivery)
                break
            except BufferError:  # librdkafka's queue is full: let deliveries drain it
                producer.poll(0.05)
        producer.poll(0)


def test_an_idempotent_confluent_producer_rides_out_a_leader_kill(cluster: BrokerCluster) -> None:
    make_topic(cluster, TOPIC, partitions=PARTITIONS)
    leader = cluster.leader_of(TOPIC, 0)
    acks = AckLog()
    producer = CKProducer({"bootstrap.servers": cluster.kafka_bootstrap, "enable.idempotence": True,
                           "linger.ms": 2, "batch.num.messages": 200, "message.timeout.ms": 40_000,
                           "max.in.flight.requests.per.connection": 5})
    _send(producer, acks, 0, BEFORE_KILL)
    deadline = time.monotonic() + 20
    while acks.count() < BEFORE_KILL // 2 and time.monotonic() < deadline:
        producer.poll(0.05)
    assert acks.count() >= BEFORE_KILL // 2, f"too few acknowledged before the kill: {acks.summary()}"
    cluster.kill(leader)
    _send(producer, acks, BEFORE_KILL, AFTER_KILL)
    assert producer.flush(45) == 0, f"records still queued: {acks.summary()}"
    assert acks.failed == 0, acks.summary()
    assert acks.count() == BEFORE_KILL + AFTER_KILL
    survivors = [node for node in cluster.brokers if node != leader]
    for partition in range(PARTITIONS):
        cluster.wait_caught_up(TOPIC, partition, nodes=survivors)
    log = read_log(cluster.bootstrap_of(*survivors), TOPIC, range(PARTITIONS))
    assert_clean(acks.snapshot(), log, context=f"{acks.summary()}\n")
