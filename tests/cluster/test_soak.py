"""Soak: repeated faults on random brokers under acks=all load (`make test-slow`).

Each round picks a broker at random (seeded, printed) and a fault: SIGKILL and restart, SIGSTOP and
SIGCONT, or SIGTERM and restart; a network cut; a full disk on a partition's leader or follower; or
topic deletes and re-creates with the controller leader killed. The load keeps running throughout; at
the end every acknowledged record must be back exactly once, in order, at its offset.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable

import pytest
from logbroker_client import Admin
from logbroker_client.errors import LogbrokerError, TopicAlreadyExistsError, UnknownTopicOrPartitionError

from tests.cluster.test_failover import PARTITIONS, TOPIC, check_everything, create_topic
from tests.support.checker import AckLog, ProducerLoad, assert_clean, produce_acked, read_log
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


CHURN_NAMES = ("churn-a", "churn-b")
CHURN_RECORDS = 200
ADMIN_DEADLINE_S = 60.0


def admin_until_done(cluster: BrokerCluster, what: str, call: Callable[[Admin], None],
                     done_on: tuple[type[BaseException], ...] = ()) -> None:
    """Retry an admin call through controller failover until it succeeds (or answers one of done_on)."""
    deadline = time.monotonic() + ADMIN_DEADLINE_S
    while True:
        try:
            with Admin(cluster.bootstrap_of(*cluster.live()), request_timeout_ms=10_000) as admin:
                call(admin)
            return
        except done_on:
            return
        except LogbrokerError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not succeed within {ADMIN_DEADLINE_S}s: {exc!r}") from exc
            time.sleep(0.2)


def controller_leader(cluster: BrokerCluster) -> int | None:
    for node in cluster.live():
        with contextlib.suppress(LogbrokerError), Admin(cluster.address(node), request_timeout_ms=2000) as admin:
            leader = admin.describe_cluster().controller_id
            if leader > 0:
                return int(leader)
    return None


@pytest.mark.slow
def test_topic_churn_with_the_controller_leader_killed_loses_nothing(cluster: BrokerCluster) -> None:
    """Delete and re-create topics of the same names while the controller leader is killed and restarted,
    under a steady load on another topic; then restart every broker at once. The last incarnation of each
    name keeps every record acknowledged to it, and no old command touches it."""
    rng = random.Random(SEED)
    print(f"churn soak seed {SEED}, {ROUNDS} rounds")
    create_topic(cluster)
    acks = AckLog()
    load = ProducerLoad(cluster.bootstrap, TOPIC, PARTITIONS, acks).start()
    current: dict[str, AckLog] = {}
    for round_number in range(ROUNDS):
        victim = controller_leader(cluster)
        kill_at = rng.randrange(2 * len(CHURN_NAMES))
        step = 0
        for name in CHURN_NAMES:
            for op in ("delete", "create"):
                if step == kill_at and victim is not None:
                    print(f"round {round_number}: kill controller leader {victim} before {op} {name}")
                    cluster.kill(victim)
                step += 1
                if op == "delete":
                    admin_until_done(cluster, f"delete {name}", lambda a, n=name: a.delete_topic(n),
                                     done_on=(UnknownTopicOrPartitionError,))
                else:
                    admin_until_done(cluster, f"create {name}",
                                     lambda a, n=name: a.create_topic(n, partitions=1, replication_factor=3),
                                     done_on=(TopicAlreadyExistsError,))
            current[name] = AckLog()
            cluster.leader_of(name, 0, timeout_s=30)
            produce_acked(cluster.bootstrap_of(*cluster.live()), name, CHURN_RECORDS, current[name],
                          b"%d" % round_number)
        if victim is not None and not cluster.brokers[victim].running:
            cluster.restart(victim)
        load.wait_acked(acks.count() + ACKED_PER_ROUND // 2, 90, f"round {round_number}: after the churn")
    load.stop()
    for node in cluster.brokers:
        cluster.kill(node)
    for node in cluster.brokers:
        cluster.restart(node, wait=False)
    cluster.wait_serving()
    check_everything(cluster, acks)
    for name, name_acks in current.items():
        cluster.wait_caught_up(name, 0)
        log = read_log(cluster.bootstrap, name, [0], timeout_s=60)
        assert_clean(name_acks.snapshot(), log, context=f"{name}: ")
        assert len(log[0]) == CHURN_RECORDS, f"{name}: {len(log[0])} records, {CHURN_RECORDS} acknowledged"


@pytest.mark.slow
def test_full_disks_on_leaders_and_followers_under_load_lose_nothing(disk_cluster: BrokerCluster) -> None:
    """Each round fills the disk of a partition's leader or of one of its followers, then frees it."""
    cluster = disk_cluster
    rng = random.Random(SEED)
    print(f"disk soak seed {SEED}, {ROUNDS} rounds")
    create_topic(cluster)
    acks = AckLog()
    load = ProducerLoad(cluster.bootstrap, TOPIC, PARTITIONS, acks).start()
    load.wait_acked(ACKED_PER_ROUND, 60, "before the first fault")
    for round_number in range(ROUNDS):
        partition = rng.randrange(PARTITIONS)
        leader = cluster.leader_of(TOPIC, partition)
        role = rng.choice(["leader", "follower"])
        node = leader if role == "leader" else rng.choice([n for n in sorted(cluster.brokers) if n != leader])
        print(f"round {round_number}: fill the disk of broker {node}, {role} of {TOPIC}-{partition}")
        cluster.disks[node].fill()
        load.wait_acked(acks.count() + ACKED_PER_ROUND, 90, f"round {round_number}: broker {node}'s disk full")
        cluster.disks[node].free()
        load.wait_acked(acks.count() + ACKED_PER_ROUND // 2, 90, f"round {round_number}: after freeing space")
    load.stop()
    check_everything(cluster, acks)
    assert acks.failed == 0, acks.summary()
