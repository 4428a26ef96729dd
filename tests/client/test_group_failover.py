"""A group member over a three-broker cluster keeps consuming and committing while its coordinator's broker is
SIGKILLed: it finds the new coordinator, keeps its partitions, and no committed offset is lost."""

from __future__ import annotations

import time
from pathlib import Path

from logbroker_client import Admin, Consumer, Producer, TopicPartition

from tests.support.cluster import BrokerCluster

SESSION_MS = 3_000


def produce(bootstrap: str, numbers: range) -> set[bytes]:
    values = {b"v-%d" % n for n in numbers}
    with Producer(bootstrap, acks="all") as producer:
        for value in sorted(values):
            producer.send("payments", value=value, key=value)
        assert producer.flush() == 0
    return values


def test_a_member_survives_its_coordinators_broker_being_killed(tmp_path: Path) -> None:
    config = {"group_session_timeout_ms": SESSION_MS, "group_heartbeat_interval_ms": 300}
    with BrokerCluster(tmp_path, broker_config=config) as cluster:
        admin = Admin(cluster.bootstrap)
        admin.create_topic("payments", partitions=4, replication_factor=3)
        expected = produce(cluster.bootstrap, range(100))
        seen: list[bytes | None] = []
        with Consumer(cluster.bootstrap, group_id="settle", auto_offset_reset="earliest", enable_auto_commit=False,
                      session_timeout_ms=SESSION_MS) as member:
            member.subscribe(["payments"])

            def consume_until(count: int, what: str) -> None:
                deadline = time.monotonic() + 20
                while len(seen) < count:
                    assert time.monotonic() < deadline, f"timed out waiting for {what}"
                    batch = member.poll(timeout=0.2, max_records=10)
                    seen.extend(r.value for r in batch)
                    if batch:
                        member.commit()

            consume_until(50, "half of the first records")
            coordinator = admin.describe_groups(["settle"])[0].coordinator_id
            owned = member.assignment()
            cluster.kill(coordinator)
            survivors = [node for node in cluster.brokers if node != coordinator]
            expected |= produce(cluster.bootstrap_of(*survivors), range(100, 200))
            consume_until(200, "every record after the coordinator's broker died")
            assert member.assignment() == owned == {TopicPartition("payments", p) for p in range(4)}
            positions = {tp: member.position(tp) for tp in owned}
            member.commit()
            moved = Admin(cluster.bootstrap_of(*survivors)).describe_groups(["settle"])[0]
            assert moved.coordinator_id != coordinator
            assert {TopicPartition(p.topic, p.partition): p.committed for p in moved.partitions} == positions
            assert moved.total_lag == 0
        assert sorted(seen) == sorted(expected)  # every record, each once: every commit landed
