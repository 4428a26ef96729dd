"""Produce and consume through a real broker: offsets, keys, replay by offset and by timestamp."""

from __future__ import annotations

import threading
import time

import pytest
from logbroker_client import Admin, Consumer, Producer, TopicPartition
from logbroker_client.errors import UnknownTopicOrPartitionError
from logbroker_client.partitioner import partition_for_key

from tests.support.brokers import InProcessBroker


def consume_all(bootstrap: str, tp: TopicPartition, start: int, expected: int, timeout_s: float = 10.0) -> list:
    with Consumer(bootstrap) as consumer:
        consumer.assign([tp])
        consumer.seek(tp, start)
        records: list = []
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            records.extend(consumer.poll(timeout=0.5))
        return records


def test_records_come_back_at_their_acknowledged_offsets(bootstrap: str) -> None:
    Admin(bootstrap).create_topic("orders", partitions=1)
    with Producer(bootstrap, acks=1, linger_ms=1) as producer:
        futures = [producer.send("orders", value=b"v%d" % i, key=b"k", headers=[("h", b"x")]) for i in range(500)]
        producer.flush()
    metas = [f.result(timeout=5) for f in futures]
    first = metas[0].offset
    assert [m.offset for m in metas] == list(range(first, first + 500))
    records = consume_all(bootstrap, TopicPartition("orders", 0), 0, 500)  # from 0: the leader's no-op is skipped
    assert [(r.offset, r.value, r.key, r.headers) for r in records] == [
        (first + i, b"v%d" % i, b"k", [("h", b"x")]) for i in range(500)
    ]
    assert [r.timestamp for r in records] == [m.timestamp for m in metas]


def test_consuming_from_an_offset_returns_exactly_the_records_from_there_on(bootstrap: str) -> None:
    Admin(bootstrap).create_topic("replay", partitions=1)
    with Producer(bootstrap, acks=1, batch_size=2000) as producer:  # many small batches
        first = producer.send("replay", value=b"0")
        for i in range(1, 300):
            producer.send("replay", value=b"%d" % i)
    start = first.result(timeout=5).offset
    records = consume_all(bootstrap, TopicPartition("replay", 0), start + 137, 300 - 137)
    assert [r.offset for r in records] == list(range(start + 137, start + 300))
    assert [r.value for r in records] == [b"%d" % i for i in range(137, 300)]


def test_a_key_lands_on_the_partition_kafka_would_choose(bootstrap: str) -> None:
    Admin(bootstrap).create_topic("keyed", partitions=6)
    keys = [b"user-%d" % i for i in range(40)]
    with Producer(bootstrap, acks=1) as producer:
        futures = {key: producer.send("keyed", value=b"x", key=key) for key in keys}
    for key, future in futures.items():
        assert future.result(timeout=5).partition == partition_for_key(key, 6)


def test_offsets_for_times_finds_the_first_record_at_or_after_the_time(bootstrap: str) -> None:
    Admin(bootstrap).create_topic("timed", partitions=1)
    base = 1_700_000_000_000
    with Producer(bootstrap, acks=1, batch_size=500) as producer:
        futures = [producer.send("timed", value=b"%d" % i, timestamp_ms=base + i * 10) for i in range(100)]
    first = futures[0].result(timeout=5).offset
    tp = TopicPartition("timed", 0)
    with Consumer(bootstrap) as consumer:
        consumer.assign([tp])
        found = consumer.offsets_for_times({tp: base + 555})
        assert found[tp] is not None
        assert (found[tp].offset, found[tp].timestamp) == (first + 56, base + 560)
        assert consumer.offsets_for_times({tp: base + 10_000})[tp] is None
        assert consumer.offsets_for_times({tp: 0})[tp].offset == first


def test_seek_to_beginning_and_end_and_position(bootstrap: str) -> None:
    Admin(bootstrap).create_topic("ends", partitions=1)
    with Producer(bootstrap, acks=1) as producer:
        futures = [producer.send("ends", value=b"%d" % i) for i in range(10)]
    last = futures[-1].result(timeout=5).offset
    tp = TopicPartition("ends", 0)
    with Consumer(bootstrap) as consumer:
        consumer.assign([tp])
        consumer.seek_to_end(tp)
        assert consumer.position(tp) == last + 1
        assert consumer.poll(timeout=0.05) == []
        consumer.seek_to_beginning(tp)
        assert consumer.position(tp) == 0
        got = []
        while len(got) < 10:
            got.extend(consumer.poll(timeout=1.0))
        assert [r.value for r in got] == [b"%d" % i for i in range(10)]
        assert consumer.position(tp) == last + 1


def test_a_waiting_fetch_returns_as_soon_as_a_record_arrives(bootstrap: str) -> None:
    Admin(bootstrap).create_topic("longpoll", partitions=1)
    tp = TopicPartition("longpoll", 0)
    result: list = []
    with Consumer(bootstrap, fetch_max_wait_ms=20_000) as consumer:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        polling = threading.Thread(target=lambda: result.extend(consumer.poll(timeout=20)))
        polling.start()
        with Producer(bootstrap, acks=1) as producer:
            producer.send("longpoll", value=b"wake up").result(timeout=5)
        polling.join(timeout=15)
        assert not polling.is_alive(), "the long poll did not return after a record arrived"
    assert [r.value for r in result] == [b"wake up"]


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_acks_and_compression_settings_all_deliver(bootstrap: str, compression: str) -> None:
    Admin(bootstrap).create_topic("settings", partitions=2)
    for acks in ("all", 1, 0):
        with Producer(bootstrap, acks=acks, compression=compression) as producer:
            futures = [producer.send("settings", value=b"%s-%d" % (str(acks).encode(), i), partition=1)
                       for i in range(50)]
        offsets = [f.result(timeout=5).offset for f in futures]
        assert offsets == ([-1] * 50 if acks == 0 else list(range(offsets[0], offsets[0] + 50)))
    records = consume_all(bootstrap, TopicPartition("settings", 1), 0, 150)
    assert [r.value for r in records] == [b"%s-%d" % (str(a).encode(), i) for a in ("all", 1, 0) for i in range(50)]


def test_sending_to_an_unknown_topic_names_it(bootstrap: str) -> None:
    with Producer(bootstrap) as producer, pytest.raises(UnknownTopicOrPartitionError, match="'nope' does not exist"):
        producer.send("nope", value=b"x")


def test_records_survive_a_clean_restart(tmp_path) -> None:
    first = InProcessBroker(tmp_path / "data").start()
    Admin(first.address).create_topic("durable", partitions=2, configs={"retention.ms": "86400000"})
    with Producer(first.address, acks=1) as producer:
        for i in range(100):
            producer.send("durable", value=b"%d" % i, partition=i % 2)
    first.stop()
    second = InProcessBroker(tmp_path / "data").start()
    try:
        described = Admin(second.address).describe_topics(["durable"])[0]
        assert described.configs["retention.ms"] == "86400000"
        assert all(p.high_watermark > 50 for p in described.partitions)  # 50 records after no-op batches
        records = consume_all(second.address, TopicPartition("durable", 1), 0, 50)
        assert [r.value for r in records] == [b"%d" % i for i in range(1, 100, 2)]
    finally:
        second.stop()
