"""A pipelined producer (one request per leader broker, up to 5 batches of a partition in flight) under leader
SIGKILLs, on three real broker processes: every acknowledged record is stored exactly once and each partition
keeps the order of its acknowledged records (tests.support.checker)."""

from __future__ import annotations

from tests.cluster.test_failover import check_everything, create_topic
from tests.support.checker import AckLog, ProducerLoad
from tests.support.cluster import BrokerCluster

TOPIC = "orders"
PARTITIONS = 6
# Small batches at a high rate, so several batches of each partition are in flight when a leader dies.
PIPELINED = {"batch_size": 2048, "linger_ms": 1, "max_in_flight_requests_per_connection": 5}


def test_a_pipelined_producer_loses_nothing_and_reorders_nothing_across_two_leader_kills(
    cluster: BrokerCluster,
) -> None:
    create_topic(cluster, partitions=PARTITIONS)
    acks = AckLog()
    load = ProducerLoad(cluster.bootstrap, TOPIC, PARTITIONS, acks, rate_per_s=20_000, max_outstanding=8000,
                        producer_args=PIPELINED).start()
    load.wait_acked(5000, 30, "before the first kill")
    for round_ in (1, 2):
        leader = cluster.leader_of(TOPIC, 0)
        at_kill = acks.count()
        cluster.kill(leader)
        load.wait_acked(at_kill + 4000, 60, f"after SIGKILL {round_} of broker {leader}")
        cluster.restart(leader)
        cluster.wait_serving(leader)
    load.wait_acked(acks.count() + 2000, 30, "after both restarts")
    load.stop()
    assert acks.failed == 0, acks.summary()
    check_everything(cluster, acks, partitions=PARTITIONS)
