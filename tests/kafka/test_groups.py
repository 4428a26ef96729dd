"""Kafka consumer groups (classic protocol) on three real brokers: sharing, commits, a leave, a restart."""

from __future__ import annotations

import logging
import time

import pytest
from confluent_kafka import Consumer as CKConsumer
from confluent_kafka import KafkaError
from confluent_kafka import Producer as CKProducer
from kafka import KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KPTopicPartition

from tests.kafka.conftest import make_topic
from tests.support.cluster import BrokerCluster

# metadata_max_age_ms: kafka-python loses a metadata update asked for while an older request is in flight (a
# case its ClusterMetadata.set_topics leaves unhandled): a consumer whose request sent before it subscribed (for
# no topic, its metadata_request() then) was still out takes that answer as up to date, and a group leader
# assigns without the topic until the next refresh, five minutes later by default (seen as one member owning
# every partition). Refreshed every 2 s instead.
FAST = {"heartbeat_interval_ms": 300, "session_timeout_ms": 6000, "max_poll_interval_ms": 20000,
        "metadata_max_age_ms": 2000}


def _produce(bootstrap: str, topic: str, count: int, start: int = 0) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for i in range(start, start + count):
        producer.send(topic, key=b"k%d" % i, value=b"v%d" % i)
    producer.flush(15)
    producer.close()


def _consumer(bootstrap: str, topic: str, group: str) -> KafkaConsumer:
    return KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
                         enable_auto_commit=False, **FAST)


# Long enough for a JoinGroup and SyncGroup round to finish inside one poll() on a loaded machine. kafka-python
# 3.0.12 loses a rebalance that outlives the poll() that started it when the member leads the group and the rejoin
# came from a metadata change: the assignment it computed meanwhile makes need_rejoin() False, so no later poll()
# collects the finished join, and its heartbeat, disabled for the join, never resumes. The coordinator then waits
# out the rebalance timeout (20 s) for it on the next member's join and drops it: in make test-slow one member
# ended with all four partitions and the other with none (twice today), never when run alone.
POLL_TIMEOUT_MS = 1000


def _poll_until(consumers: list[KafkaConsumer], done: object, timeout_s: float = 15.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for consumer in consumers:
            for batch in consumer.poll(timeout_ms=POLL_TIMEOUT_MS).values():
                got.extend(batch)
        if done(got):  # type: ignore[operator]
            break
    return got


def _settled_at_end(*consumers: KafkaConsumer) -> bool:
    """Every partition is owned by one of them, and each has read its partitions to the end."""
    assigned = [c.assignment() for c in consumers]
    if sum(len(a) for a in assigned) != 4 or any(not a for a in assigned):
        return False
    for consumer, partitions in zip(consumers, assigned, strict=True):
        ends = consumer.end_offsets(list(partitions))
        if any(consumer.position(tp) != ends[tp] for tp in partitions):
            return False
    return True


# The longest test of the suite (25 s) and sensitive to a loaded machine (kafka-python's rebalance timing):
# it runs with the fault and soak tests in `make test-slow`.
@pytest.mark.slow
def test_two_kafka_python_consumers_share_commit_take_over_and_resume(kafka_cluster: BrokerCluster, topic_name: str,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    # It failed in `make test-slow` (never when run alone) with one member owning every partition (see FAST's
    # metadata_max_age_ms and POLL_TIMEOUT_MS for the two kafka-python races found): a failure shows kafka-python's
    # metadata and rebalance steps.
    caplog.set_level(logging.DEBUG, logger="kafka.coordinator")
    caplog.set_level(logging.DEBUG, logger="kafka.cluster")
    bootstrap = kafka_cluster.kafka_bootstrap
    make_topic(kafka_cluster, topic_name, partitions=4)
    _produce(bootstrap, topic_name, 100)
    group = f"{topic_name}-g"
    first, second = _consumer(bootstrap, topic_name, group), _consumer(bootstrap, topic_name, group)
    try:
        got = _poll_until([first, second], lambda g: _settled_at_end(first, second), timeout_s=25)
        assert len(first.assignment()) == len(second.assignment()) == 2
        assert not first.assignment() & second.assignment()
        assert {m.value for m in got} == {b"v%d" % i for i in range(100)}
        first.commit()
        second.commit()
        first.close()  # LeaveGroup: the other member takes every partition
        _poll_until([second], lambda _: len(second.assignment()) == 4)
        assert len(second.assignment()) == 4
        _produce(bootstrap, topic_name, 20, start=100)
        late = _poll_until([second], lambda g: len(g) >= 20)
        assert sorted(m.value for m in late) == sorted(b"v%d" % i for i in range(100, 120))
        second.commit()
    finally:
        first.close()
        second.close()
    _produce(bootstrap, topic_name, 5, start=120)
    resumed = _consumer(bootstrap, topic_name, group)  # a restart resumes from the committed offsets
    try:
        fresh = _poll_until([resumed], lambda g: len(g) >= 5, timeout_s=20)
        assert resumed.assignment() and fresh, (
            resumed.assignment(), [(resumed.committed(KPTopicPartition(topic_name, p)),
                                    resumed.position(KPTopicPartition(topic_name, p))) for p in range(4)])
        assert sorted(m.value for m in fresh) == sorted(b"v%d" % i for i in range(120, 125))
    finally:
        resumed.close()


def test_confluent_kafka_group_commits_and_a_new_consumer_resumes(kafka_cluster: BrokerCluster,
                                                                  topic_name: str) -> None:
    bootstrap = kafka_cluster.kafka_bootstrap
    make_topic(kafka_cluster, topic_name, partitions=3)
    producer = CKProducer({"bootstrap.servers": bootstrap})
    for i in range(60):
        producer.produce(topic_name, key=b"k%d" % i, value=b"c%d" % i)
    producer.flush(10)
    config = {"bootstrap.servers": bootstrap, "group.id": f"{topic_name}-g", "auto.offset.reset": "earliest",
              "enable.auto.commit": False, "session.timeout.ms": 6000, "heartbeat.interval.ms": 300}

    def consume(count: int) -> list[bytes]:
        consumer = CKConsumer(config)
        consumer.subscribe([topic_name])
        values: list[bytes] = []
        deadline = time.monotonic() + 20
        try:
            while len(values) < count and time.monotonic() < deadline:
                message = consumer.poll(0.2)
                if message is None or (message.error() and message.error().code() == KafkaError._PARTITION_EOF):
                    continue
                assert message.error() is None, message.error()
                values.append(message.value())
            consumer.commit(asynchronous=False)
        finally:
            consumer.close()
        return values

    assert sorted(consume(60)) == sorted(b"c%d" % i for i in range(60))
    for i in range(60, 70):
        producer.produce(topic_name, key=b"k%d" % i, value=b"c%d" % i)
    producer.flush(10)
    assert sorted(consume(10)) == sorted(b"c%d" % i for i in range(60, 70))


def test_admin_lists_describes_and_deletes_groups(kafka_cluster: BrokerCluster, topic_name: str) -> None:
    from confluent_kafka import ConsumerGroupTopicPartitions
    from confluent_kafka.admin import AdminClient

    bootstrap = kafka_cluster.kafka_bootstrap
    make_topic(kafka_cluster, topic_name, partitions=2)
    _produce(bootstrap, topic_name, 10)
    group = f"{topic_name}-g"
    consumer = _consumer(bootstrap, topic_name, group)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        _poll_until([consumer], lambda g: len(g) >= 10)
        consumer.commit()
        listed = admin.list_consumer_groups(request_timeout=10).result()
        assert group in [g.group_id for g in listed.valid]
        deadline = time.monotonic() + 20
        while True:  # the client may rejoin once more when the topic's metadata reaches it
            described = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
            if described.state.name == "STABLE" or time.monotonic() > deadline:
                break
            consumer.poll(timeout_ms=100)
        assert described.state.name == "STABLE" and len(described.members) == 1
        assert sorted(tp.partition for tp in described.members[0].assignment.topic_partitions) == [0, 1]
        offsets = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group].result()
        assert sum(tp.offset for tp in offsets.topic_partitions) >= 10  # past the records (and leader no-ops)
        refused = admin.delete_consumer_groups([group], request_timeout=10)[group]
        assert "NON_EMPTY_GROUP" in str(refused.exception(10))
        consumer.close()
        admin.delete_consumer_groups([group], request_timeout=10)[group].result()
        offsets = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group].result()
        assert [tp.offset for tp in offsets.topic_partitions] in ([], [-1001, -1001])
    finally:
        consumer.close()


def test_a_group_is_classic_or_kip848_at_a_time(kafka_cluster: BrokerCluster, topic_name: str) -> None:
    from logbroker_client import Consumer

    make_topic(kafka_cluster, topic_name)
    group = f"{topic_name}-g"
    native = Consumer(kafka_cluster.bootstrap, group_id=group)
    native.subscribe([topic_name])
    try:
        deadline = time.monotonic() + 10
        while not native.assignment() and time.monotonic() < deadline:
            native.poll(timeout=0.2)
        assert native.assignment()
        kafka = KafkaConsumer(bootstrap_servers=kafka_cluster.kafka_bootstrap, group_id=group, **FAST)
        kafka.subscribe([topic_name])
        try:
            kafka.poll(timeout_ms=3000)
            raise AssertionError("a classic member joined a KIP-848 group")
        except Exception as exc:
            assert "InconsistentGroupProtocol" in type(exc).__name__ or "INCONSISTENT" in str(exc).upper()
        finally:
            kafka.close()
        committed = KafkaConsumer(bootstrap_servers=kafka_cluster.kafka_bootstrap, group_id=group, **FAST)
        try:  # the offsets are the same table either way
            assert committed.committed(KPTopicPartition(topic_name, 0)) is None
        finally:
            committed.close()
    finally:
        native.close()
