"""A topic is its ID, not its name: nothing done to an old topic touches a newer one of the same name.

Over three real brokers: delete and re-create, then restart everything (the controller replays its whole
log at start-up, old create and delete included); concurrent creates of one name; a long name.
"""

from __future__ import annotations

import threading

import pytest
from logbroker_client import Admin
from logbroker_client.errors import TopicAlreadyExistsError

from logbroker.server.controller_client import OPEN_PARTITIONS_AT_ONCE
from logbroker.storage.filenames import PARTITION_METADATA_FILE, partition_dir_name
from logbroker.storage.partition_metadata import read_identity
from tests.support.brokers import wait_until
from tests.support.checker import AckLog, assert_clean, produce_acked, read_log
from tests.support.cluster import BrokerCluster

TOPIC = "recreated"
OLD_RECORDS = 100
NEW_RECORDS = 240
CONCURRENT_CREATES = 5


def topic_id(cluster: BrokerCluster, topic: str) -> str:
    view = cluster.partition_view(1, topic, 0)
    assert view is not None and view.topic_id, f"broker 1 does not describe {topic}"
    return view.topic_id


def test_a_recreated_topic_keeps_its_acknowledged_records_through_a_restart_of_every_broker(
        cluster: BrokerCluster) -> None:
    with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic(TOPIC, partitions=1, replication_factor=3)
        old_id = topic_id(cluster, TOPIC)
        produce_acked(cluster.bootstrap, TOPIC, OLD_RECORDS, AckLog(), b"old")
        admin.delete_topic(TOPIC)
        admin.create_topic(TOPIC, partitions=1, replication_factor=3)
    new_id = topic_id(cluster, TOPIC)
    assert new_id != old_id
    acks = AckLog()
    produce_acked(cluster.bootstrap, TOPIC, NEW_RECORDS, acks, b"new")
    cluster.wait_caught_up(TOPIC, 0)
    for broker in cluster.brokers.values():
        identity = read_identity(broker.data_dir / partition_dir_name(TOPIC, 0))
        assert identity is not None and identity.topic_id == new_id, f"broker {broker.node_id}: {identity}"
    marks = {node: len(broker.log_text()) for node, broker in cluster.brokers.items()}
    for node in cluster.brokers:  # every broker down at once, then all back: the whole log is replayed
        cluster.kill(node)
    for node in cluster.brokers:
        cluster.restart(node, wait=False)
    cluster.wait_serving()
    cluster.leader_of(TOPIC, 0)
    views = cluster.wait_caught_up(TOPIC, 0)
    assert all(view.topic_id == new_id for view in views.values())
    log = read_log(cluster.bootstrap, TOPIC, [0], timeout_s=60)
    assert_clean(acks.snapshot(), log)
    assert len(log[0]) == NEW_RECORDS, f"{len(log[0])} records stored, {NEW_RECORDS} acknowledged"
    for node, broker in cluster.brokers.items():
        replayed = broker.log_text()[marks[node]:]
        assert f"deleted topic {TOPIC}" not in replayed, f"broker {node} deleted a topic while replaying"


def test_a_delete_removes_only_the_directories_of_the_deleted_topic(cluster: BrokerCluster) -> None:
    with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic(TOPIC, partitions=2, replication_factor=3)
        directories = [cluster.brokers[1].data_dir / partition_dir_name(TOPIC, p) for p in range(2)]
        assert all((d / PARTITION_METADATA_FILE).exists() for d in directories)
        admin.delete_topic(TOPIC)
    wait_until(lambda: not any(d.exists() for d in directories), 10, "the deleted topic's directories to go")


def test_a_big_topic_opened_off_the_event_loop_gets_leaders_and_its_delete_leaves_no_directories(
        cluster: BrokerCluster) -> None:
    # More replicas per broker than ControllerClient opens at once: these open in the opening threads, in chunks.
    partitions = OPEN_PARTITIONS_AT_ONCE + 8
    with Admin(cluster.bootstrap, request_timeout_ms=60_000) as admin:
        admin.create_topic(TOPIC, partitions=partitions, replication_factor=3)
        for partition in range(partitions):
            wait_until(lambda p=partition: all(  # type: ignore[misc]
                (view := cluster.partition_view(node, TOPIC, p)) is not None and view.leader_id > 0
                for node in cluster.brokers), 60, f"{TOPIC}-{partition} to have a leader on every broker")
        directories = [broker.data_dir / partition_dir_name(TOPIC, p)
                       for broker in cluster.brokers.values() for p in range(partitions)]
        assert all(read_identity(d) is not None for d in directories)
        admin.delete_topic(TOPIC)
    wait_until(lambda: not any(d.exists() for d in directories), 20, "the deleted topic's directories to go")


def test_concurrent_creates_of_one_name_leave_one_winner_and_tell_the_others(cluster: BrokerCluster) -> None:
    name = "contested"
    outcomes: dict[int, BaseException | None] = {}

    def create(partitions: int) -> None:
        try:
            with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
                admin.create_topic(name, partitions=partitions, replication_factor=3)
            outcomes[partitions] = None
        except BaseException as exc:  # noqa: BLE001 - every outcome is checked below
            outcomes[partitions] = exc

    threads = [threading.Thread(target=create, args=(n,)) for n in range(1, CONCURRENT_CREATES + 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    winners = [n for n, exc in outcomes.items() if exc is None]
    assert len(outcomes) == CONCURRENT_CREATES
    assert len(winners) == 1, f"told 'created': {winners}; errors {outcomes}"
    losers = [exc for exc in outcomes.values() if exc is not None]
    assert all(isinstance(exc, TopicAlreadyExistsError) for exc in losers), losers
    with Admin(cluster.bootstrap) as admin:
        assert len(admin.describe_topics([name])[0].partitions) == winners[0]


@pytest.mark.parametrize("length", [244, 249])
def test_a_topic_with_a_long_name_holds_records(cluster: BrokerCluster, length: int) -> None:
    name = "t" * length
    with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic(name, partitions=1, replication_factor=3)
    acks = AckLog()
    produce_acked(cluster.bootstrap, name, 10, acks, b"long")
    assert_clean(acks.snapshot(), read_log(cluster.bootstrap, name, [0], timeout_s=30))


def test_a_topic_created_while_a_broker_is_down_elects_every_leader(cluster: BrokerCluster) -> None:
    # Placement makes the down broker the preferred leader of one of the partitions; new groups wait
    # quietly for their preferred leader to call, so a live replica must stand in for it.
    cluster.kill(1)
    with Admin(cluster.bootstrap_of(2, 3), request_timeout_ms=20_000) as admin:
        admin.create_topic("born-degraded", partitions=3, replication_factor=3)
    for partition in range(3):
        assert cluster.leader_of("born-degraded", partition, timeout_s=15) in (2, 3)
        acks = AckLog()
        produce_acked(cluster.bootstrap_of(2, 3), "born-degraded", 5, acks, partition=partition)
