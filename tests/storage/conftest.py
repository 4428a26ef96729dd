"""Shared helpers for the storage tests: batches from the real codec, logs in tmp directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from logbroker_client.records import build_batch

from logbroker.storage.config import LogConfig
from logbroker.storage.log import PartitionLog

T0 = 1_700_000_000_000  # a fixed "now" in ms; tests move time by passing now_ms explicitly


def make_batch(records: int = 1, timestamp_ms: int = T0, value_size: int = 10, key: bytes | None = None,
               seed: int = 0) -> bytes:
    """A v2 batch (offset 0, epoch -1) of `records` records with distinct, recognisable values."""
    return build_batch([
        (timestamp_ms + i, key, bytes([(seed + i) % 251]) * value_size, [])
        for i in range(records)
    ])


def open_log(directory: Path, **config: Any) -> PartitionLog:
    """The partition orders-3 in directory, with config overrides."""
    return PartitionLog.open(directory, LogConfig(**config), "orders", 3)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "orders-3"
