"""Damaged files on disk: the broker starts, keeps the valid prefix, and says what it lost, and where."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from logbroker_client import Admin, Consumer, Producer, TopicPartition
from logbroker_client.errors import CorruptBatchError

from logbroker.storage import filenames
from tests.support.brokers import InProcessBroker, wait_until


def test_a_flipped_byte_in_a_segment_keeps_the_records_before_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = InProcessBroker(tmp_path / "data").start()
    Admin(broker.address).create_topic("damaged", partitions=2)
    with Producer(broker.address, acks="all", batch_size=1000) as producer:  # many small batches
        futures = [producer.send("damaged", value=b"%04d" % i, partition=0) for i in range(400)]
        producer.send("damaged", value=b"untouched", partition=1)
    offsets = [f.result(timeout=10).offset for f in futures]
    broker.stop()

    segment = next((tmp_path / "data" / "damaged-0").glob("*.log"))
    data = bytearray(segment.read_bytes())
    damage_at = len(data) * 3 // 4
    data[damage_at] ^= 0xFF
    segment.write_bytes(bytes(data))
    # As after a crash: without the clean-shutdown marker, recovery checks every batch.
    (tmp_path / "data" / "damaged-0" / filenames.CLEAN_SHUTDOWN_FILE).unlink(missing_ok=True)

    caplog.set_level(logging.WARNING)
    restarted = InProcessBroker(tmp_path / "data").start()
    try:
        tp = TopicPartition("damaged", 0)
        with Consumer(restarted.address, auto_offset_reset="earliest") as consumer:
            consumer.assign([tp])
            records: list = []
            wait_until(lambda: bool(records.extend(consumer.poll(timeout=0.2))) or len(records) >= 100, 20,
                       "the surviving records")
            records.extend(consumer.poll(timeout=0.5))
        kept = [(r.offset, r.value) for r in records]
        assert 100 <= len(kept) < 400
        assert kept == [(offsets[i], b"%04d" % i) for i in range(len(kept))]  # exactly a prefix, unchanged
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("damaged-0" in m and "truncated" in m and "CRC" in m for m in errors), errors
        with Producer(restarted.address, acks="all") as producer:  # the partition takes writes again
            assert producer.send("damaged", value=b"after", partition=0).result(timeout=10).offset > kept[-1][0]
        with Consumer(restarted.address, auto_offset_reset="earliest") as consumer:  # the other is untouched
            consumer.assign([TopicPartition("damaged", 1)])
            other: list = []
            wait_until(lambda: bool(other.extend(consumer.poll(timeout=0.2))) or bool(other), 10, "partition 1")
        assert [r.value for r in other] == [b"untouched"]
    finally:
        restarted.stop()


def test_a_consumer_refuses_a_batch_damaged_after_a_clean_shutdown(tmp_path: Path) -> None:
    """Bit rot after a clean shutdown skips recovery, which checks only the log's tail; further back, the
    consumer's CRC check still catches it."""
    broker = InProcessBroker(tmp_path / "data").start()
    Admin(broker.address).create_topic("rot")
    with Producer(broker.address, acks="all") as producer:
        first = producer.send("rot", value=b"A" * 200).result(timeout=10)
        for i in range(100):  # a batch each, pushing the damaged one behind the last index entry
            producer.send("rot", value=b"%04d" % i).result(timeout=10)
    broker.stop()
    segment = next((tmp_path / "data" / "rot-0").glob("*.log"))
    data = bytearray(segment.read_bytes())
    data[data.index(b"A" * 200) + 100] ^= 0x01  # inside the record's value, covered by the CRC
    segment.write_bytes(bytes(data))
    restarted = InProcessBroker(tmp_path / "data").start()
    try:
        tp = TopicPartition("rot", 0)
        with Consumer(restarted.address) as consumer, pytest.raises(CorruptBatchError) as caught:
            consumer.assign([tp])
            consumer.seek(tp, first.offset)
            for _ in range(20):
                consumer.poll(timeout=0.5)
        assert "rot-0" in str(caught.value) and f"offset {first.offset}" in str(caught.value)
    finally:
        restarted.stop()


def test_a_batch_damaged_in_the_tail_after_a_clean_shutdown_is_cut_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The tail is CRC-checked even after a clean shutdown: the damaged batch is cut before anything reads it.
    Alone, the broker loses that record; a replica with peers fetches it again from the leader."""
    broker = InProcessBroker(tmp_path / "data").start()
    Admin(broker.address).create_topic("tail")
    with Producer(broker.address, acks="all") as producer:
        offsets = [producer.send("tail", value=b"%d" % i * 200).result(timeout=10).offset for i in range(5)]
    broker.stop()
    segment = next((tmp_path / "data" / "tail-0").glob("*.log"))
    data = bytearray(segment.read_bytes())
    data[data.index(b"4" * 200) + 100] ^= 0x01  # inside the last batch, under its CRC
    segment.write_bytes(bytes(data))

    caplog.set_level(logging.WARNING)
    restarted = InProcessBroker(tmp_path / "data").start()
    try:
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("tail-0" in m and "truncated" in m and "CRC mismatch" in m for m in errors), errors
        with Consumer(restarted.address, auto_offset_reset="earliest") as consumer:
            consumer.assign([TopicPartition("tail", 0)])
            records: list = []
            wait_until(lambda: bool(records.extend(consumer.poll(timeout=0.2))) or len(records) >= 4, 20,
                       "the records before the damaged batch")
            records.extend(consumer.poll(timeout=0.5))
        assert [(r.offset, r.value) for r in records] == [(offsets[i], b"%d" % i * 200) for i in range(4)]
        with Producer(restarted.address, acks="all") as producer:  # the partition takes writes again
            assert producer.send("tail", value=b"after").result(timeout=10).offset > offsets[3]
    finally:
        restarted.stop()
