"""Unchanged Kafka clients (kafka-python, confluent-kafka, aiokafka) against a real three-broker cluster."""

from __future__ import annotations

import asyncio
import time

from confluent_kafka import Consumer as CKConsumer
from confluent_kafka import Producer as CKProducer
from confluent_kafka import TopicPartition as CKTopicPartition
from kafka import KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KPTopicPartition
from logbroker_client import Consumer, Producer, TopicPartition

from tests.kafka.conftest import make_topic
from tests.support.cluster import BrokerCluster

COUNT = 200


def _records(prefix: str, count: int = COUNT) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    return [(f"key-{i % 7}".encode(), f"{prefix}-{i}".encode() * (1 + i % 5), [("n", str(i).encode())])
            for i in range(count)]


def _ck_consume(bootstrap: str, topic: str, partitions: int, expected: int, timeout_s: float = 15.0) -> list:
    consumer = CKConsumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}-reader", "enable.auto.commit": False,
                           "auto.offset.reset": "earliest"})
    consumer.assign([CKTopicPartition(topic, p, 0) for p in range(partitions)])
    got = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < expected and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None:
                continue
            assert message.error() is None, message.error()
            got.append(message)
    finally:
        consumer.close()
    return got


def test_kafka_python_produces_idempotently_and_consumes(kafka_cluster: BrokerCluster, topic_name: str) -> None:
    make_topic(kafka_cluster, topic_name, partitions=3)
    producer = KafkaProducer(bootstrap_servers=kafka_cluster.kafka_bootstrap, acks="all", enable_idempotence=True,
                             linger_ms=5)
    sent = _records("kp")
    futures = [producer.send(topic_name, key=k, value=v, headers=h) for k, v, h in sent]
    producer.flush(15)
    metas = [f.get(timeout=10) for f in futures]
    producer.close()
    assert sorted({m.partition for m in metas}) == [0, 1, 2]
    consumer = KafkaConsumer(bootstrap_servers=kafka_cluster.kafka_bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=3000)
    consumer.assign([KPTopicPartition(topic_name, p) for p in range(3)])
    got = {}
    deadline = time.monotonic() + 15
    while len(got) < COUNT and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            for m in batch:
                got[(m.partition, m.offset)] = (m.key, m.value, list(m.headers))
    consumer.close()
    assert sorted(got.values()) == sorted((k, v, h) for k, v, h in sent)
    for meta, (k, v, h) in zip(metas, sent, strict=True):  # each record sits at the offset it was acknowledged at
        assert got[(meta.partition, meta.offset)] == (k, v, h)


def test_confluent_kafka_produces_idempotently_and_consumes(kafka_cluster: BrokerCluster, topic_name: str) -> None:
    make_topic(kafka_cluster, topic_name, partitions=3)
    producer = CKProducer({"bootstrap.servers": kafka_cluster.kafka_bootstrap, "enable.idempotence": True,
                           "linger.ms": 5})
    delivered: list = []
    for key, value, headers in _records("ck"):
        producer.produce(topic_name, key=key, value=value, headers=headers,
                         on_delivery=lambda err, msg: delivered.append((err, msg.partition(), msg.offset())))
    assert producer.flush(20) == 0
    assert [d for d in delivered if d[0] is not None] == []
    got = _ck_consume(kafka_cluster.kafka_bootstrap, topic_name, 3, COUNT)
    assert sorted((m.partition(), m.offset()) for m in got) == sorted((p, o) for _, p, o in delivered)
    assert sorted((m.key(), m.value(), m.headers()) for m in got) == sorted(_records("ck"))


def test_aiokafka_produces_and_consumes(kafka_cluster: BrokerCluster, topic_name: str) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka import TopicPartition as AIOTopicPartition

    make_topic(kafka_cluster, topic_name, partitions=2)

    async def run() -> tuple[list, list]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_cluster.kafka_bootstrap, enable_idempotence=True)
        await producer.start()
        try:
            metas = [await producer.send_and_wait(topic_name, value=v, key=k, headers=h)
                     for k, v, h in _records("aio", 50)]
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_cluster.kafka_bootstrap, auto_offset_reset="earliest",
                                    enable_auto_commit=False)
        await consumer.start()
        got: list = []
        try:
            consumer.assign([AIOTopicPartition(topic_name, p) for p in range(2)])
            deadline = time.monotonic() + 15
            while len(got) < 50 and time.monotonic() < deadline:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    got.extend(batch)
        finally:
            await consumer.stop()
        return metas, got

    metas, got = asyncio.run(run())
    assert sorted((m.partition, m.offset) for m in metas) == sorted((m.partition, m.offset) for m in got)
    assert sorted((m.key, m.value, list(m.headers)) for m in got) == sorted(_records("aio", 50))


def test_records_from_grpc_are_read_byte_identical_by_a_kafka_client(kafka_cluster: BrokerCluster,
                                                                      topic_name: str) -> None:
    make_topic(kafka_cluster, topic_name)
    sent = [(bytes([i % 256]) * (i % 40), bytes(range(256)) * (i % 3) + b"\x00end", [("bin", bytes([0, 255, i % 256]))])
            for i in range(COUNT)]
    with Producer(kafka_cluster.bootstrap, acks="all", compression="zstd") as producer:
        futures = [producer.send(topic_name, value=v, key=k or None, headers=h, timestamp_ms=1_700_000_000_000 + i)
                   for i, (k, v, h) in enumerate(sent)]
        producer.flush()
    metas = [f.result(timeout=10) for f in futures]
    got = _ck_consume(kafka_cluster.kafka_bootstrap, topic_name, 1, COUNT)
    assert [(m.offset(), m.key(), m.value(), m.headers(), m.timestamp()[1]) for m in got] == [
        (meta.offset, k or None, v, h, 1_700_000_000_000 + i)
        for i, (meta, (k, v, h)) in enumerate(zip(metas, sent, strict=True))]


def test_records_from_a_kafka_client_are_read_byte_identical_over_grpc(kafka_cluster: BrokerCluster,
                                                                       topic_name: str) -> None:
    make_topic(kafka_cluster, topic_name)
    producer = CKProducer({"bootstrap.servers": kafka_cluster.kafka_bootstrap, "enable.idempotence": True})
    delivered: list = []
    sent = [(b"k%d" % i, bytes(range(256)) + b"%d" % i, [("h", b"\x00\x01")]) for i in range(COUNT)]
    for i, (key, value, headers) in enumerate(sent):
        producer.produce(topic_name, key=key, value=value, headers=headers, timestamp=1_700_000_000_000 + i,
                         on_delivery=lambda err, msg: delivered.append(msg.offset()))
    assert producer.flush(20) == 0
    tp = TopicPartition(topic_name, 0)
    with Consumer(kafka_cluster.bootstrap) as consumer:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        records: list = []
        deadline = time.monotonic() + 15
        while len(records) < COUNT and time.monotonic() < deadline:
            records.extend(consumer.poll(timeout=0.5))
    assert [(r.offset, r.key, r.value, r.headers, r.timestamp) for r in records] == [
        (offset, k, v, h, 1_700_000_000_000 + i)
        for i, (offset, (k, v, h)) in enumerate(zip(delivered, sent, strict=True))]


def test_metadata_names_every_brokers_kafka_endpoint(kafka_cluster: BrokerCluster, topic_name: str) -> None:
    make_topic(kafka_cluster, topic_name, partitions=3)
    producer = CKProducer({"bootstrap.servers": kafka_cluster.brokers[2].kafka_address})
    metadata = producer.list_topics(topic_name, timeout=10)
    assert {b.id: f"{b.host}:{b.port}" for b in metadata.brokers.values()} == {
        node: broker.kafka_address for node, broker in kafka_cluster.brokers.items()}
    partitions = metadata.topics[topic_name].partitions
    assert sorted(partitions) == [0, 1, 2]
    assert all(p.leader in kafka_cluster.brokers and sorted(p.replicas) == [1, 2, 3] for p in partitions.values())
