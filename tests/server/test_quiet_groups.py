"""Idle Raft groups go quiet (no ticks, no heartbeats) and wake for the next write."""

from __future__ import annotations

from logbroker_client import Admin, Producer

from tests.support.brokers import InProcessBroker, wait_until


def replicas(broker: InProcessBroker) -> list:
    assert broker.server is not None
    return broker.server.broker.replicas.all_replicas()


def test_idle_groups_go_quiet_and_a_write_wakes_its_group(broker: InProcessBroker) -> None:
    Admin(broker.address).create_topic("calm", partitions=4)
    wait_until(lambda: all(r.quiet for r in replicas(broker)), 10, "every group, the controller's too, to go quiet")
    with Producer(broker.address, acks="all") as producer:
        meta = producer.send("calm", value=b"wake", partition=2).result(timeout=10)
    assert meta.offset >= 0
    wait_until(lambda: all(r.quiet for r in replicas(broker)), 10, "the written group to go quiet again")
    woken = broker.call(lambda: broker.server.broker.replicas.replica("calm", 2))  # type: ignore[union-attr]
    assert woken.high_watermark == meta.offset + 1  # type: ignore[attr-defined]
