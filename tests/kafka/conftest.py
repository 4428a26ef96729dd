"""Fixtures for the Kafka protocol tests: a real three-broker cluster with Kafka listeners (shared by the
tests of a session; each test uses topics and groups of its own), and an in-process broker."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from logbroker_client import Admin

from tests.support.brokers import InProcessBroker, free_port
from tests.support.cluster import BrokerCluster

RAFT_TICK_MS = 20
_names = itertools.count()


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerCluster]:
    cluster = BrokerCluster(tmp_path_factory.mktemp("kafka") / "cluster", size=3, raft_tick_ms=RAFT_TICK_MS,
                            kafka=True, broker_config={"kafka_auto_create_topics": True,
                                                       "group_session_timeout_ms": 10_000})
    cluster.start()
    try:
        yield cluster
    finally:
        tails = cluster.log_tails()
        cluster.stop_all()
        if "Traceback" in tails:
            print(f"broker logs:\n{tails}")


@pytest.fixture
def kafka_bootstrap(kafka_cluster: BrokerCluster) -> str:
    return kafka_cluster.kafka_bootstrap


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    return f"k{next(_names)}-{request.node.name[5:40].replace('[', '-').replace(']', '')}"


def make_topic(cluster: BrokerCluster, name: str, partitions: int = 1, replication_factor: int = 3) -> str:
    Admin(cluster.bootstrap).create_topic(name, partitions=partitions, replication_factor=replication_factor)
    return name


@pytest.fixture
def kafka_broker(tmp_path: Path) -> Iterator[InProcessBroker]:
    """One in-process broker with a Kafka listener (kafka_address set on it), for wire-level tests."""
    port = free_port()
    broker = InProcessBroker(tmp_path / "data", kafka_listen=f"127.0.0.1:{port}", kafka_auto_create_topics=True)
    broker.kafka_address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
