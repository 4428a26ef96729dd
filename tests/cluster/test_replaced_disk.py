"""A broker whose disk was replaced must not vote in a partition's election before it has caught up, also when the
metadata log does not name the partition's leader (its leader died before its election was recorded): the disk's
registration in the metadata log tells partitions older than the disk from new ones (disk_identity.py)."""

from __future__ import annotations

import time

from logbroker_client import Admin, Producer

from tests.cluster.test_metadata import metadata_answer
from tests.support.brokers import wait_until
from tests.support.checker import AckLog, assert_clean, make_value, read_log
from tests.support.cluster import BrokerCluster

TOPIC = "unrecorded"
PARTITIONS = 3  # at RF3 on three brokers, each broker is the preferred leader of one partition
LEADER_TIMEOUT_S = 20.0
WATCH_S = 4.0  # how long the survivors get to elect a leader lacking the acknowledged records


def produce(bootstrap: str, partition: int, first_seq: int, count: int, acks: AckLog) -> None:
    before = acks.count()
    with Producer(bootstrap, acks="all", linger_ms=2, request_timeout_ms=5000) as producer:
        for seq in range(first_seq, first_seq + count):
            value = make_value(seq, size=100)
            producer.send(TOPIC, value=value, partition=partition).add_done_callback(acks.callback(value))
        producer.flush(timeout=LEADER_TIMEOUT_S)
    assert acks.count() == before + count, acks.summary()


def test_a_replaced_disk_does_not_vote_for_a_lagging_replica_when_no_leader_was_recorded(
        proxied_cluster: BrokerCluster) -> None:
    """Leader L's reports to the controller leader C are cut off, so the metadata never names L as the partition's
    leader. Records are acknowledged by L and C while the third broker B is cut off; then C's disk is replaced and
    L is killed. B and the empty C are a majority, but C acknowledged records B lacks: C must not vote until it
    has caught up, and no leader may be elected without them before L returns."""
    cluster = proxied_cluster
    wait_until(lambda: metadata_answer(cluster, 1, TOPIC).controller_id > 0, 20, "a controller leader")
    controller = metadata_answer(cluster, 1, TOPIC).controller_id
    leader, lagging = [n for n in sorted(cluster.brokers) if n != controller]
    cluster.proxies[(leader, controller)].cut()  # L's gRPC calls to C, its leader reports among them; Raft flows

    with Admin(cluster.address(controller), request_timeout_ms=int(LEADER_TIMEOUT_S * 1000)) as admin:
        admin.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=3)
        placement = [list(p.replicas) for p in admin.describe_topics([TOPIC])[0].partitions]
    partition = next(i for i, replicas in enumerate(placement) if replicas[0] == leader)
    assert cluster.leader_of(TOPIC, partition, timeout_s=LEADER_TIMEOUT_S) == leader
    acks = AckLog()
    produce(cluster.bootstrap, partition, 0, 20, acks)
    cluster.wait_caught_up(TOPIC, partition)

    # Cut off rather than frozen: a frozen broker finds the appends in its socket buffers when it resumes.
    cluster.isolate(lagging)
    produce(cluster.bootstrap_of(leader, controller), partition, 20, 50, acks)  # held by L and C only
    acked_end = max(offset for _, offset in acks.snapshot().values())
    cluster.brokers[controller].replace_disk()
    cluster.kill(leader)
    cluster.heal()  # L's reports never reached C, and L is gone
    cluster.brokers[controller].launch()
    cluster.wait_serving(controller)  # its disk is registered: it has replayed the metadata from B

    deadline = time.monotonic() + WATCH_S
    while time.monotonic() < deadline:
        for node, view in cluster.views(TOPIC, partition, [controller, lagging]).items():
            assert not (view.leader_id == node and view.local_replica and view.log_end_offset <= acked_end), (
                f"broker {node} leads {TOPIC}-{partition} with log end {view.log_end_offset}, lacking acknowledged "
                f"offset {acked_end}: the replaced disk voted before it caught up")
        time.sleep(0.1)

    cluster.brokers[leader].launch()
    cluster.wait_serving(leader)
    cluster.wait_caught_up(TOPIC, partition, timeout_s=LEADER_TIMEOUT_S)
    assert_clean(acks.snapshot(), read_log(cluster.bootstrap, TOPIC, [partition], timeout_s=LEADER_TIMEOUT_S),
                 f"leader {leader}, replaced {controller}, lagging {lagging}: ")
