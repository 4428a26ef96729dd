"""A new partition's first election: its preferred leader campaigns and the other replicas wait quietly for it, but
not for ever. A preferred broker that is alive to one replica yet cut off from the controller leader never learns
of the partition, so never campaigns; after a deadline the other replicas elect among themselves."""

from __future__ import annotations

import time
from pathlib import Path

from logbroker_client import Admin, Producer
from logbroker_client.errors import LogbrokerError

from tests.cluster.test_metadata import metadata_answer
from tests.support.brokers import wait_until
from tests.support.cluster import BrokerCluster

TOPIC = "first"
PARTITIONS = 3  # at RF3 on three brokers, one partition's preferred leader is each broker
LEADER_TIMEOUT_S = 20.0


def test_a_new_partition_whose_preferred_broker_cannot_learn_of_it_still_gets_a_leader(
        proxied_cluster: BrokerCluster) -> None:
    cluster = proxied_cluster
    wait_until(lambda: metadata_answer(cluster, 1, TOPIC).controller_id > 0, 20, "a controller leader")
    controller = metadata_answer(cluster, 1, TOPIC).controller_id
    ordered = sorted(cluster.brokers)
    # Placement is consecutive brokers, so the partition `cut_off` prefers is placed [cut_off, third, controller]:
    # the controller leader takes cut_off for dead and waits for third, which hears cut_off and waits for it.
    cut_off = ordered[(ordered.index(controller) + 1) % len(ordered)]
    third = ordered[(ordered.index(controller) + 2) % len(ordered)]
    since = cluster.brokers[controller].log_size()  # a broker may have been silent a moment at start-up too
    cluster.cut_link(controller, cut_off)
    cluster.cut_link(cut_off, controller)
    wait_until(lambda: f"broker {cut_off} silent" in cluster.brokers[controller].log_since(since), 20,
               f"the controller leader (broker {controller}) to take broker {cut_off} for dead")

    with Admin(cluster.address(controller), request_timeout_ms=int(LEADER_TIMEOUT_S * 1000)) as admin:
        admin.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=3)
        placement = [list(p.replicas) for p in admin.describe_topics([TOPIC])[0].partitions]
    stranded = next(i for i, replicas in enumerate(placement) if replicas[0] == cut_off)
    assert placement[stranded] == [cut_off, third, controller], placement

    leader = cluster.leader_of(TOPIC, stranded, timeout_s=LEADER_TIMEOUT_S)
    assert leader in (controller, third)
    assert any("their preferred leader's broker never campaigned" in cluster.brokers[n].log_since(0)
               for n in (controller, third))
    with Producer(cluster.bootstrap_of(controller, third), acks="all") as producer:
        written = producer.send(TOPIC, value=b"while cut", partition=stranded).result(timeout=LEADER_TIMEOUT_S)

    # Healed, the preferred broker opens its replica late and catches up without deposing anyone's acknowledged
    # record.
    cluster.heal()
    cluster.wait_caught_up(TOPIC, stranded, timeout_s=LEADER_TIMEOUT_S)
    view = cluster.partition_view(cut_off, TOPIC, stranded)
    assert view is not None and view.local_replica and view.log_end_offset > written.offset, view


def test_a_topic_created_the_moment_a_new_cluster_answers_gets_its_leaders(tmp_path: Path) -> None:
    """Scripts start a cluster and create their topics at once. A topic created before its brokers had registered
    their disks in the metadata counted as older than every one of those disks, so each replica waited to catch
    up from a leader that none of them could become: the partitions never had a leader (4 of 4 runs on the dev
    cluster). The controller now places new partitions on a starting broker only once its disk is registered."""
    cluster = BrokerCluster(tmp_path)
    try:
        for broker in cluster.brokers.values():
            broker.launch()
        deadline = time.monotonic() + LEADER_TIMEOUT_S
        while True:
            try:
                with Admin(cluster.bootstrap, request_timeout_ms=2000) as admin:
                    admin.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=3)
                break
            except LogbrokerError:  # no broker answers yet, or no controller leader yet
                assert time.monotonic() < deadline, "the new cluster never accepted the topic"
                time.sleep(0.005)
        for partition in range(PARTITIONS):
            assert cluster.leader_of(TOPIC, partition, timeout_s=LEADER_TIMEOUT_S) in cluster.brokers
    finally:
        cluster.stop_all()
