"""Soak: repeated faults on random brokers under acks=all load (`make test-slow`).

Each round picks a broker at random (seeded, printed) and a fault: SIGKILL and restart, SIGSTOP and
SIGCONT, or SIGTERM and restart. The load keeps running throughout; at the end every acknowledged
record must be back exactly once, in order, at its offset.
"""

from __future__ import annotations

import os
import random

import pytest

from tests.cluster.test_failover import PARTITIONS, TOPIC, check_everything, create_topic
from tests.support.checker import AckLog, ProducerLoad
from tests.support.cluster import BrokerCluster

ROUNDS = int(os.environ.get("LOGBROKER_SOAK_ROUNDS", "12"))
SEED = int(os.environ.get("LOGBROKER_SOAK_SEED", "1"))
ACKED_PER_ROUND = 1500


@pytest.mark.slow
def test_repeated_faults_under_load_lose_nothing(cluster: BrokerCluster) -> None:
    rng = random.Random(SEED)
    print(f"soak seed {SEED}, {ROUNDS} rounds (LOGBROKER_SOAK_SEED / LOGBROKER_SOAK_ROUNDS to change)")
    create_topic(cluster)
    acks = AckLog()
    load = ProducerLoad(cluster.bootstrap, TOPIC, PARTITIONS, acks).start()
    load.wait_acked(ACKED_PER_ROUND, 60, "before the first fault")
    for round_number in range(ROUNDS):
        node = rng.choice(sorted(cluster.brokers))
        fault = rng.choice(["kill", "pause", "terminate"])
        print(f"round {round_number}: {fault} broker {node}")
        if fault == "kill":
            cluster.kill(node)
        elif fault == "pause":
            cluster.pause(node)
        else:
            assert cluster.terminate(node) == 0
        load.wait_acked(acks.count() + ACKED_PER_ROUND, 90, f"round {round_number}: {fault} of broker {node}")
        if fault == "pause":
            cluster.resume(node)
        else:
            cluster.restart(node)
        load.wait_acked(acks.count() + ACKED_PER_ROUND // 2, 90, f"round {round_number}: after broker {node} is back")
    load.stop()
    check_everything(cluster, acks)
    # Retries ride out every fault here (no broker stays down past the delivery timeout): a record the
    # producer gave up on means the client or the broker refused something it should have taken.
    assert acks.failed == 0, acks.summary()


@pytest.mark.slow
def test_repeated_network_partitions_under_load_lose_nothing(proxied_cluster: BrokerCluster) -> None:
    """Each round cuts one broker off from its peers (clients still reach it), then heals."""
    cluster = proxied_cluster
    rng = random.Random(SEED)
    print(f"partition soak seed {SEED}, {ROUNDS} rounds")
    create_topic(cluster)
    acks = AckLog()
    load = ProducerLoad(cluster.bootstrap, TOPIC, PARTITIONS, acks).start()
    load.wait_acked(ACKED_PER_ROUND, 60, "before the first partition")
    for round_number in range(ROUNDS):
        node = rng.choice(sorted(cluster.brokers))
        print(f"round {round_number}: isolate broker {node}")
        cluster.isolate(node, blackhole=rng.random() < 0.5)
        load.wait_acked(acks.count() + ACKED_PER_ROUND, 90, f"round {round_number}: broker {node} cut off")
        cluster.heal()
        load.wait_acked(acks.count() + ACKED_PER_ROUND // 2, 90, f"round {round_number}: after healing")
    load.stop()
    check_everything(cluster, acks)
    assert acks.failed == 0, acks.summary()
