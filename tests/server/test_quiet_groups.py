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



def test_the_ticker_visits_only_awake_groups_and_a_woken_group_again(broker: InProcessBroker) -> None:
    Admin(broker.address).create_topic("still", partitions=5)
    wait_until(lambda: all(r.quiet for r in replicas(broker)), 10, "every group to go quiet")
    assert broker.server is not None
    manager = broker.server.broker.replicas
    awake = lambda: broker.call(lambda: len(manager._awake))  # noqa: E731
    wait_until(lambda: awake() == 0, 10, "the ticker to drop every quiet group")
    target = broker.call(lambda: manager.replica("still", 3))
    ticks: list[int] = []
    original_tick = target.tick  # type: ignore[attr-defined]

    def counted_tick() -> None:
        ticks.append(1)
        original_tick()

    broker.call(lambda: setattr(target, "tick", counted_tick))
    with Producer(broker.address, acks="all") as producer:
        producer.send("still", value=b"wake", partition=3).result(timeout=10)
    # The write woke the group: it is ticked again until it has nothing left to do, then leaves the set.
    wait_until(lambda: len(ticks) > 0, 10, "the woken group to be ticked")
    wait_until(lambda: awake() == 0, 10, "the woken group to go quiet again")
    settled = len(ticks)
    rounds: list[int] = []
    original_round = manager.tick_once

    def counted_round() -> None:
        rounds.append(1)
        original_round()

    broker.call(lambda: setattr(manager, "tick_once", counted_round))
    wait_until(lambda: len(rounds) >= 5, 10, "five more rounds of the broker's ticker")
    assert broker.call(lambda: target.quiet) and len(ticks) == settled  # quiet: passed over by every round
