"""A full disk fails the write with a clear STORAGE_ERROR, acknowledges nothing, and loses nothing."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from logbroker_client import Admin, Consumer, Producer, TopicPartition
from logbroker_client.errors import StorageError

from logbroker.storage import segment
from tests.support.brokers import InProcessBroker, wait_until


def read_values(address: str, tp: TopicPartition) -> list[bytes | None]:
    with Consumer(address, auto_offset_reset="earliest") as consumer:
        consumer.assign([tp])
        end = consumer.end_offsets([tp])[tp]
        records: list = []
        wait_until(lambda: bool(records.extend(consumer.poll(timeout=0.2))) or consumer.position(tp) >= end, 20,
                   "reading the partition back")
    return [r.value for r in records]


def test_a_full_disk_fails_the_write_and_keeps_what_was_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = InProcessBroker(tmp_path / "data").start()
    tp = TopicPartition("full", 0)
    Admin(broker.address).create_topic("full")
    with Producer(broker.address, acks="all") as producer:
        for i in range(100):
            producer.send("full", value=b"%d" % i)

    real_write_all = segment.write_all

    def disk_full(fd: int, data: object, *fs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segment, "write_all", disk_full)
    with Producer(broker.address, acks="all", delivery_timeout_ms=3000, request_timeout_ms=2000) as producer:
        failed = producer.send("full", value=b"lost").exception(timeout=10)
    assert isinstance(failed, StorageError), f"{type(failed).__name__}: {failed}"
    assert "disk full" in str(failed) and "full-0" in str(failed) and "Free space" in str(failed)

    monkeypatch.setattr(segment, "write_all", real_write_all)  # the operator frees space and restarts
    broker.stop()
    restarted = InProcessBroker(tmp_path / "data").start()
    try:
        assert read_values(restarted.address, tp) == [b"%d" % i for i in range(100)]
        with Producer(restarted.address, acks="all") as producer:
            producer.send("full", value=b"after").result(timeout=10)
        assert read_values(restarted.address, tp)[-1] == b"after"
    finally:
        restarted.stop()


def test_once_space_is_freed_the_replica_reopens_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = InProcessBroker(tmp_path / "data").start()
    try:
        Admin(broker.address).create_topic("refill")
        with Producer(broker.address, acks="all") as producer:
            producer.send("refill", value=b"before").result(timeout=10)
        real_write_all = segment.write_all

        def disk_full(fd: int, data: object, *fs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(segment, "write_all", disk_full)
        with Producer(broker.address, acks="all", delivery_timeout_ms=3000, request_timeout_ms=2000) as producer:
            failed = producer.send("refill", value=b"refused").exception(timeout=10)
        assert isinstance(failed, StorageError), f"{type(failed).__name__}: {failed}"
        monkeypatch.setattr(segment, "write_all", real_write_all)  # space freed; no restart

        def accepted() -> bool:
            with Producer(broker.address, acks="all", delivery_timeout_ms=2000, request_timeout_ms=1000) as p:
                return p.send("refill", value=b"after").exception(timeout=10) is None

        wait_until(accepted, 20, "the replica to reopen once writes succeed")
        assert read_values(broker.address, TopicPartition("refill", 0))[0] == b"before"
        assert read_values(broker.address, TopicPartition("refill", 0))[-1] == b"after"
    finally:
        broker.stop()
