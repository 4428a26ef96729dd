"""The broker's one Raft ticker drives every group's elections and heartbeats: a tick that raises (a bug) is
logged and ticking goes on; before, the ticker task ended silently and every group on the broker stopped."""

from __future__ import annotations

import pytest

from logbroker.server.replica_manager import ReplicaManager
from tests.support.brokers import InProcessBroker, wait_until

FAILING_TICKS = 3


def test_a_failing_tick_is_logged_once_and_ticking_goes_on(broker: InProcessBroker,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    assert broker.server is not None
    replicas: ReplicaManager = broker.server.broker.replicas
    real_tick = replicas.tick_once
    failed: list[int] = []

    def tick_once() -> None:
        if len(failed) < FAILING_TICKS:
            failed.append(replicas._ticks)
            raise RuntimeError("a bug in a tick")
        real_tick()

    with caplog.at_level("ERROR", logger="logbroker.broker"):
        broker.call(lambda: setattr(replicas, "tick_once", tick_once))
        wait_until(lambda: len(failed) == FAILING_TICKS, 10, "the failing ticks")
        ticks_after_failures = broker.call(lambda: replicas._ticks)
        wait_until(lambda: broker.call(lambda: replicas._ticks) > ticks_after_failures + 5, 10,  # type: ignore[operator]
                   "ticks after the failing ones")
    logged = [r for r in caplog.records if "a Raft tick failed" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]  # the first of the three, not each
    assert "broker 1" in logged[0].getMessage() and logged[0].exc_info is not None
