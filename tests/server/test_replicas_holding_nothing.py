"""A replica that opens holding nothing while its broker replays the metadata log at start-up cannot tell a
group it never took part in from one whose data it lost (a replaced disk): it neither votes nor campaigns
until the whole metadata log is here. Then, if its group never had a leader, it takes part as any new
replica; if it had one, it catches up from that leader first (the wiped-disk tests in tests/cluster)."""

from __future__ import annotations

import threading

import pytest
from logbroker_client import Admin

from logbroker.server.replica_manager import HISTORY_CHECK_INTERVAL_TICKS, ReplicaManager
from tests.support.brokers import InProcessBroker, wait_until

TOPIC = "replayed"
HELD_FOR_TICKS = 10 * HISTORY_CHECK_INTERVAL_TICKS


def test_a_replica_opened_during_the_replay_waits_for_the_metadata_then_elects(
        broker: InProcessBroker, caplog: pytest.LogCaptureFixture) -> None:
    assert broker.server is not None
    replicas: ReplicaManager = broker.server.broker.replicas
    controller_client = broker.server.broker.controller_client
    replaying = threading.Event()
    replaying.set()
    real_history_known = controller_client.history_known
    broker.call(lambda: setattr(controller_client, "history_known",
                                lambda: not replaying.is_set() and real_history_known()))
    created: list[BaseException | None] = []

    def create() -> None:
        try:
            with Admin(broker.address, request_timeout_ms=60_000) as admin:
                admin.create_topic(TOPIC, partitions=1)
            created.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            created.append(exc)

    creator = threading.Thread(target=create)
    with caplog.at_level("DEBUG", logger="logbroker.replica"):
        creator.start()
        wait_until(lambda: broker.call(lambda: replicas.hosted_replica(TOPIC, 0)) is not None, 20,
                   "the replica to open")
        replica = broker.call(lambda: replicas.hosted_replica(TOPIC, 0))
        assert replica.waiting_for_history and replica.node.catching_up  # type: ignore[union-attr]
        start = broker.call(lambda: replicas._ticks)
        wait_until(lambda: broker.call(lambda: replicas._ticks) >= start + HELD_FOR_TICKS, 20,  # type: ignore[operator]
                   f"{HELD_FOR_TICKS} ticks")
        assert broker.call(lambda: replica.leader_id) is None  # type: ignore[union-attr]
        assert broker.call(lambda: replica.term) == 0  # type: ignore[union-attr]
        replaying.clear()  # the whole metadata log is here: the group never had a leader
        wait_until(lambda: broker.call(lambda: replica.is_leader), 20, "the group's first leader")  # type: ignore[union-attr]
        creator.join(60)
    assert created == [None]
    assert not replica.waiting_for_history and not replica.node.catching_up  # type: ignore[union-attr]
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "holds no Raft state" in r.getMessage()]
