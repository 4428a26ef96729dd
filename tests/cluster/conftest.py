"""Fixtures for the real-process cluster tests: three brokers on loopback, their logs shown on failure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import BrokerCluster

RAFT_TICK_MS = 20


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
