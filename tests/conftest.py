"""Shared fixtures: a broker per test, in-process, on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.brokers import InProcessBroker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[InProcessBroker]:
    running = InProcessBroker(tmp_path / "data").start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def bootstrap(broker: InProcessBroker) -> str:
    return broker.address
