"""Fixtures for the real-process cluster tests: three brokers on loopback, their logs shown on failure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from logbroker.server.config import DEFAULT_RAFT_TICK_MS
from tests.support.cluster import BrokerCluster
from tests.support.disk import SizeLimitedDir, mount_problem

RAFT_TICK_MS = 20
DISK_BYTES = 96 << 20


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


def _cluster(request: pytest.FixtureRequest, tmp_path: Path, proxied: bool,
             disk_bytes: int | None = None, raft_tick_ms: int = RAFT_TICK_MS, size: int = 3,
             broker_config: dict[str, int | str | bool] | None = None,
             metrics: bool = False) -> Iterator[BrokerCluster]:
    cluster = BrokerCluster(tmp_path / "cluster", size=size, raft_tick_ms=raft_tick_ms, proxied=proxied,
                            broker_config=broker_config, metrics=metrics)
    failed_before = request.session.testsfailed
    try:
        if disk_bytes is not None:  # each broker's data directory on a size-limited file system of its own
            cluster.disks = {node: SizeLimitedDir(broker.data_dir, disk_bytes)
                             for node, broker in cluster.brokers.items()}
            for disk in cluster.disks.values():
                disk.mount()
            for broker in cluster.brokers.values():  # these tests fill the disk for real: no free-space floor
                broker.extra_args += ["--min-free-disk-bytes", "0"]
        cluster.start()
        yield cluster
    finally:
        try:
            _show_logs_on_failure(request, cluster, failed_before)
        finally:
            cluster.stop_all()
            for disk in cluster.disks.values():
                disk.unmount()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerCluster]:
    yield from _cluster(request, tmp_path, proxied=False)


@pytest.fixture
def metered_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerCluster]:
    """Like `cluster`, each broker serving its Prometheus metrics: a test asks a broker what it did."""
    yield from _cluster(request, tmp_path, proxied=False, metrics=True)


@pytest.fixture
def cluster_at_default_ticks(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerCluster]:
    """Like `cluster`, at the broker's default Raft tick: a broker is declared down after 400 ms of silence,
    as in production, rather than 160 ms."""
    yield from _cluster(request, tmp_path, proxied=False, raft_tick_ms=DEFAULT_RAFT_TICK_MS)


@pytest.fixture
def proxied_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerCluster]:
    yield from _cluster(request, tmp_path, proxied=True)


@pytest.fixture
def proxied_cluster_of_five(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerCluster]:
    """Five brokers: the metadata log keeps a majority of intact voters with one broker down and one disk
    replaced, so a replaced disk's broker replays the metadata and opens its replicas during such a fault."""
    yield from _cluster(request, tmp_path, proxied=True, size=5)


@pytest.fixture
def disk_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerCluster]:
    """Three brokers, each with its data on a tmpfs of DISK_BYTES (cluster.disks[node].fill() fills it)."""
    problem = mount_problem()
    if problem is not None:
        pytest.skip(f"disk-full test skipped: {problem}")
    yield from _cluster(request, tmp_path, proxied=False, disk_bytes=DISK_BYTES, metrics=True)
