"""A batch damaged on a leader's disk, further back than recovery's tail check, costs nothing acknowledged.

The leader finds the damage when it reads the batch to send it to a follower that lags behind: it stops its
replica (handing leadership to a healthy one), reopens it with the log cut at the damaged batch, and
fetches the rest from the new leader. Before, it sent the bad batch on and the follower refused it forever.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from logbroker_client import Admin, Producer
from logbroker_client import records as rec

from logbroker.storage.filenames import partition_dir_name
from tests.cluster.conftest import RAFT_TICK_MS
from tests.cluster.test_failover import check_everything
from tests.support.brokers import wait_until
from tests.support.checker import AckLog, make_value
from tests.support.cluster import BrokerCluster

TOPIC = "bitrot"
VALUE_BYTES = 8_000
RECORDS_WHILE_DOWN = 600  # about 5 MB in one-record batches: far more than the leader keeps in memory here
ENTRY_CACHE_BYTES = 64 << 10


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[BrokerCluster]:
    """Three brokers that keep little in memory, so catching up a follower reads the leader's disk."""
    running = BrokerCluster(tmp_path / "cluster", size=3, raft_tick_ms=RAFT_TICK_MS,
                            broker_config={"raft_entry_cache_bytes": ENTRY_CACHE_BYTES})
    try:
        yield running.start()
    finally:
        print(running.log_tails())
        running.stop_all()


def flip_a_byte_at(path: object, offset: int) -> None:
    """Flip a byte inside the value of the batch holding offset (its CRC then fails)."""
    data = bytearray(path.read_bytes())  # type: ignore[attr-defined]
    for pos, header in rec.iter_batch_headers(bytes(data)):
        if header.base_offset <= offset <= header.base_offset + header.last_offset_delta:
            data[pos + header.size - 10] ^= 0xFF
            path.write_bytes(bytes(data))  # type: ignore[attr-defined]
            return
    raise AssertionError(f"offset {offset} is not in {path}")


def test_a_leader_that_finds_a_damaged_batch_hands_over_and_refetches(cluster: BrokerCluster) -> None:
    with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic(TOPIC, partitions=1, replication_factor=3)
    leader = cluster.leader_of(TOPIC, 0)
    follower = next(n for n in sorted(cluster.brokers) if n != leader)
    acks = AckLog()
    cluster.kill(follower)
    with Producer(cluster.bootstrap, acks="all", linger_ms=0) as producer:
        for seq in range(RECORDS_WHILE_DOWN):
            value = make_value(seq, VALUE_BYTES)
            producer.send(TOPIC, value=value, partition=0).add_done_callback(acks.callback(value))
            if seq % 20 == 19:
                producer.flush(timeout=30)
        producer.flush(timeout=60)
    assert acks.count() == RECORDS_WHILE_DOWN, acks.summary()
    first_missed = min(offset for _, offset in acks.snapshot().values())
    segment = next((cluster.brokers[leader].data_dir / partition_dir_name(TOPIC, 0)).glob("*.log"))
    flip_a_byte_at(segment, first_missed + 5)
    # The follower comes back empty, so the leader must read its whole log from disk to send it (what it had
    # queued for the follower while it was down was read before the damage).
    shutil.rmtree(cluster.brokers[follower].data_dir / partition_dir_name(TOPIC, 0))
    cluster.restart(follower)
    wait_until(lambda: "is damaged on disk" in cluster.brokers[leader].log_text(), 30,
               f"broker {leader} to find the damaged batch")
    cluster.wait_caught_up(TOPIC, 0, timeout_s=60)
    check_everything(cluster, acks, partitions=1, topic=TOPIC)
