"""After a broker's death its groups' picked successors campaign with a pre-vote round: when the others still hear
the leader (a link cut between two brokers only), no live leader may be deposed when the cut heals. (A successor
skipping the pre-vote round deposed it: 98fca3a; a version that skipped it only once the other voters confirmed
the death was built and withdrawn, see docs/raft.md.)"""

from __future__ import annotations

import time

from logbroker_client import Admin

from logbroker.server.replica_manager import pick_successor
from tests.support.cluster import BrokerCluster

TOPIC = "succession"
PARTITIONS = 6
LEADER_TIMEOUT_S = 20.0
CUT_S = 2.0  # many election timeouts (10 ticks of 20 ms) and liveness timeouts: the fault's length


def leaders_and_terms(cluster: BrokerCluster, nodes: list[int]) -> dict[int, tuple[int, int]]:
    """partition -> (leader, term) as the leader itself reports it, for the partitions led by one of `nodes`."""
    found = {}
    for partition in range(PARTITIONS):
        leader = cluster.leader_of(TOPIC, partition, timeout_s=LEADER_TIMEOUT_S)
        view = cluster.partition_view(leader, TOPIC, partition)
        assert view is not None and view.leader_id == leader, view
        if leader in nodes:
            found[partition] = (leader, view.leader_epoch)
    return found


def test_a_link_cut_between_two_brokers_deposes_no_live_leader(proxied_cluster: BrokerCluster) -> None:
    cluster = proxied_cluster
    with Admin(cluster.bootstrap, request_timeout_ms=int(LEADER_TIMEOUT_S * 1000)) as admin:
        admin.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=3)
    before = leaders_and_terms(cluster, list(cluster.brokers))
    leader = next(iter(before.values()))[0]
    led = {p: v for p, v in before.items() if v[0] == leader}
    # The broker that stops hearing `leader` (everyone else still does): one picked to succeed it in some group,
    # so that it campaigns.
    view = cluster.partition_view(leader, TOPIC, 0)
    assert view is not None
    deaf = pick_successor(f"{TOPIC}-{next(iter(led))}@{view.topic_id}", cluster.brokers, leader, lambda n: True)
    assert deaf is not None and deaf != leader
    cluster.cut_link(leader, deaf)
    time.sleep(CUT_S)  # the fault's duration: `deaf` takes `leader` for dead and its picked successors campaign
    cluster.heal()
    time.sleep(CUT_S)  # and the same again healed: a raised term would depose the leader now
    after = leaders_and_terms(cluster, list(cluster.brokers))
    assert {p: after[p] for p in led} == led, (
        f"broker {deaf} stopped hearing broker {leader} (the third broker still did): the partitions {leader} "
        f"led, (leader, term) before {led}, after {({p: after[p] for p in led})}")
