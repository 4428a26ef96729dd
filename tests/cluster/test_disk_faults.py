"""A full disk takes a replica out of its group until it can write again, and nothing acknowledged is lost.

Each broker's data lives on a tmpfs of its own (the disk_cluster fixture), filled for real with a filler
file while a producer runs acks=all, then freed as an operator would.
"""

from __future__ import annotations

import pytest
from logbroker_client import Admin

from tests.cluster.test_failover import check_everything
from tests.support.brokers import wait_until
from tests.support.checker import AckLog, ProducerLoad
from tests.support.cluster import BrokerCluster
from tests.support.metrics_scrape import native_fsyncs

TOPIC = "filling"
ACKED_BEFORE = 1000
ACKED_DURING = 1500
TAKEOVER_TIMEOUT_S = 20.0
REPAIR_TIMEOUT_S = 30.0


def start_load(cluster: BrokerCluster) -> tuple[ProducerLoad, AckLog]:
    with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic(TOPIC, partitions=1, replication_factor=3)
    cluster.leader_of(TOPIC, 0)
    acks = AckLog()
    load = ProducerLoad(cluster.bootstrap, TOPIC, 1, acks, value_size=256).start()
    load.wait_acked(ACKED_BEFORE, 30, "before the disk fills")
    return load, acks


def test_a_leader_whose_disk_fills_gives_up_leadership_until_it_can_write(disk_cluster: BrokerCluster) -> None:
    cluster = disk_cluster
    load, acks = start_load(cluster)
    full = cluster.leader_of(TOPIC, 0)
    # The disk fills under appends written on the event loop and fsynced by the native threads.
    assert native_fsyncs(cluster, full) > 0, f"broker {full}'s native fsync threads ran no fsync"
    cluster.disks[full].fill()
    at_fill = acks.count()
    new_leader = cluster.leader_of(TOPIC, 0, exclude=(full,), timeout_s=TAKEOVER_TIMEOUT_S)
    load.wait_acked(at_fill + ACKED_DURING, 60, f"through broker {new_leader} while broker {full}'s disk is full")
    view = cluster.partition_view(full, TOPIC, 0)
    assert view is not None and view.leader_id != full, f"broker {full} took leadership back with a full disk"
    assert "cannot write this replica's log" in cluster.brokers[full].log_text()
    cluster.disks[full].free()
    load.wait_acked(acks.count() + ACKED_BEFORE, 30, "after space was freed")
    load.stop()
    cluster.wait_caught_up(TOPIC, 0, timeout_s=REPAIR_TIMEOUT_S)
    check_everything(cluster, acks, partitions=1, topic=TOPIC)


@pytest.mark.parametrize("restart", [False, True], ids=["reopened", "restarted"])
def test_a_follower_whose_disk_filled_catches_up_once_space_is_freed(disk_cluster: BrokerCluster,
                                                                     restart: bool) -> None:
    cluster = disk_cluster
    load, acks = start_load(cluster)
    leader = cluster.leader_of(TOPIC, 0)
    full = next(n for n in sorted(cluster.brokers) if n != leader)
    assert native_fsyncs(cluster, full) > 0, f"broker {full}'s native fsync threads ran no fsync"
    cluster.disks[full].fill()
    at_fill = acks.count()
    load.wait_acked(at_fill + ACKED_DURING, 60, f"while follower {full}'s disk is full")
    wait_until(lambda: full not in (cluster.partition_view(leader, TOPIC, 0) or cluster.views(TOPIC, 0)[leader]).isr,
               15, f"broker {full} to leave the in-sync set")
    cluster.disks[full].free()
    if restart:
        cluster.kill(full)
        cluster.restart(full)
    load.wait_acked(acks.count() + ACKED_BEFORE, 30, "after space was freed")
    load.stop()
    cluster.wait_caught_up(TOPIC, 0, timeout_s=REPAIR_TIMEOUT_S)
    check_everything(cluster, acks, partitions=1, topic=TOPIC)
