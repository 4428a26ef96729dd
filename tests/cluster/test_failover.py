"""Three real broker processes (raft tick 20 ms), faults injected, every acknowledged record checked.

Each test runs a load of sequence-numbered acks=all records (tests.support.checker.ProducerLoad),
injects a fault (SIGKILL, SIGSTOP, a network cut through FaultProxy, restarts), reads every partition
back from offset 0 and runs the checker: no acknowledged record lost, moved, duplicated or reordered.
When a test fails, the fixture prints the tail of every broker's log.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from logbroker_client import Admin

from tests.support.checker import AckLog, ProducerLoad, assert_clean, read_log
from tests.support.cluster import BrokerCluster

RAFT_TICK_MS = 20
TOPIC = "orders"
PARTITIONS = 3
ACKED_AFTER_FAULT = 2000


def _show_logs_on_failure(request: pytest.FixtureRequest, cluster: BrokerCluster, failed_before: int) -> None:
    if request.session.testsfailed == failed_before:
        return
    capture = request.config.pluginmanager.getplugin("capturemanager")
    text = f"\n----- broker logs of {request.node.nodeid} (full logs under {cluster.root}) -----\n{cluster.log_tails()}"
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print(text, flush=True)
    else:
        print(text, flush=True)


def _cluster(request: pytest.FixtureRequest, tmp_path: Path, proxied: bool) -> Iterator[BrokerCluster]:
    cluster = BrokerCluster(tmp_path / "cluster", size=3, raft_tick_ms=RAFT_TICK_MS, proxied=proxied)
    failed_before = request.session.testsfailed
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            _show_logs_on_failure(request, cluster, failed_before)
        finally:
            cluster.stop_all()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerCluster]:
    yield from _cluster(request, tmp_path, proxied=False)


@pytest.fixture
def proxied_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerCluster]:
    yield from _cluster(request, tmp_path, proxied=True)


def create_topic(cluster: BrokerCluster, partitions: int = PARTITIONS, configs: dict[str, str] | None = None,
                 name: str = TOPIC) -> None:
    with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic(name, partitions=partitions, replication_factor=3, configs=configs)
    for partition in range(partitions):
        cluster.leader_of(name, partition)


def check_everything(cluster: BrokerCluster, acks: AckLog, partitions: int = PARTITIONS, topic: str = TOPIC) -> None:
    """Let every replica catch up, read every partition back, and run the checker."""
    for partition in range(partitions):
        cluster.wait_caught_up(topic, partition)
    log = read_log(cluster.bootstrap, topic, range(partitions), timeout_s=60)
    print(f"checking {acks.summary()}")
    assert_clean(acks.snapshot(), log, context=f"{acks.summary()}\n")
    stored = sum(len(records) for records in log.values())
    assert stored >= acks.count(), f"read {stored} records, fewer than the {acks.count()} acknowledged"


# ----------------------------------------------------------------------------------------- 1. SIGKILL


def test_sigkill_of_the_leader_under_load_loses_nothing(cluster: BrokerCluster) -> None:
    create_topic(cluster)
    acks = AckLog()
    load = ProducerLoad(cluster.bootstrap, TOPIC, PARTITIONS, acks).start()
    load.wait_acked(3000, 30, "before the kill")
    leader = cluster.leader_of(TOPIC, 0)
    at_kill = acks.count()
    cluster.kill(leader)
    load.wait_acked(at_kill + ACKED_AFTER_FAULT, 60, f"after SIGKILL of broker {leader}")
    new_leader = cluster.leader_of(TOPIC, 0, exclude=(leader,))
    cluster.restart(leader)
    load.wait_acked(acks.count() + 500, 30, f"after restarting broker {leader}")
    load.stop()
    assert new_leader != leader
    check_everything(cluster, acks)
