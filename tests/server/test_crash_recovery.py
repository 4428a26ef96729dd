"""A broker killed with SIGKILL in the middle of producing keeps every acknowledged record.

The checker reads the whole partition back after the restart and demands that every acknowledged
record is there exactly once, at the offset it was acknowledged with, in the order it was sent.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

from logbroker_client import Admin, Consumer, Producer, TopicPartition
from logbroker_client.producer import RecordFuture

from tests.support.brokers import BrokerProcess, wait_until

PARTITIONS = 2
ACKED_BEFORE_KILL = 3000


class AckLog:
    """What the producer was told: value -> (partition, offset), in acknowledgement order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[bytes, tuple[int, int]] = {}

    def callback(self, value: bytes):  # noqa: ANN201 - a closure per record is fine in a test
        def on_done(future: RecordFuture) -> None:
            if future.exception() is None:
                meta = future.result()
                with self.lock:
                    self.acked[value] = (meta.partition, meta.offset)
        return on_done

    def count(self) -> int:
        with self.lock:
            return len(self.acked)


def produce_until(address: str, stop: threading.Event, acks: AckLog) -> None:
    with Producer(address, acks=1, linger_ms=1, batch_size=8192, request_timeout_ms=2000,
                  delivery_timeout_ms=2000) as producer:
        i = 0
        while not stop.is_set():
            value = b"record-%08d" % i
            producer.send("crash", value=value, partition=i % PARTITIONS).add_done_callback(acks.callback(value))
            i += 1
            if i % 500 == 0:
                producer.flush(timeout=10)


def read_everything(address: str) -> dict[int, list]:
    out: dict[int, list] = {}
    with Consumer(address, auto_offset_reset="earliest") as consumer:
        tps = [TopicPartition("crash", p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
        records: list = []
        wait_until(lambda: (records.extend(consumer.poll(timeout=0.5)) or
                            all(consumer.position(tp) >= ends[tp] for tp in tps)), 30, "reading the log back")
    for record in records:
        out.setdefault(record.partition, []).append(record)
    return out


def test_sigkill_mid_produce_keeps_every_acknowledged_record(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "data").start()
    Admin(broker.address).create_topic("crash", partitions=PARTITIONS)
    acks = AckLog()
    stop = threading.Event()
    producing = threading.Thread(target=produce_until, args=(broker.address, stop, acks), daemon=True)
    producing.start()
    wait_until(lambda: acks.count() >= ACKED_BEFORE_KILL, 60, f"{ACKED_BEFORE_KILL} acknowledged records")
    broker.kill()
    stop.set()
    producing.join(timeout=30)
    assert not producing.is_alive()
    acked = dict(acks.acked)

    restarted = BrokerProcess(tmp_path / "data", port=broker.port).start()
    try:
        log = read_everything(restarted.address)
    finally:
        assert restarted.terminate() == 0
    for partition, records in log.items():  # control batches (leader no-ops) take offsets between records
        offsets = [r.offset for r in records]
        assert offsets == sorted(set(offsets)), f"duplicate or reordered offsets in partition {partition}"
    stored = {(r.partition, r.offset): r.value for records in log.values() for r in records}
    missing = {v: where for v, where in acked.items() if stored.get(where) != v}
    assert not missing, f"{len(missing)} acknowledged records lost or moved, e.g. {list(missing.items())[:3]}"
    copies = Counter(r.value for records in log.values() for r in records)
    assert all(copies[v] == 1 for v in acked), "an acknowledged record was stored twice"
    for partition in range(PARTITIONS):  # sent order == offset order within a partition
        sent = sorted((v for v, (p, _) in acked.items() if p == partition))
        assert [acked[v][1] for v in sent] == sorted(acked[v][1] for v in sent)
    assert len(acked) >= ACKED_BEFORE_KILL


def test_sigterm_shuts_down_cleanly_and_restart_skips_recovery(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "data").start()
    Admin(broker.address).create_topic("crash", partitions=PARTITIONS)
    with Producer(broker.address, acks=1) as producer:
        for i in range(1000):
            producer.send("crash", value=b"%d" % i, partition=i % PARTITIONS)
    assert broker.terminate() == 0
    assert "closed every partition cleanly" in broker.log_text()
    restarted = BrokerProcess(tmp_path / "data", port=broker.port).start()
    try:
        log = read_everything(restarted.address)
    finally:
        restarted.terminate()
    assert sum(len(records) for records in log.values()) == 1000
