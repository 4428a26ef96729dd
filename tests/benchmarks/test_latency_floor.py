"""The latency floor benchmark, run small: its three servers answer every record, each exactly once, and the
JSON line carries percentiles in order and the servers' CPU."""

from __future__ import annotations

import json

import pytest

from benchmarks import latency_floor
from logbroker.cluster import fsync_threads


@pytest.mark.parametrize("fsync", ["thread", "inline", pytest.param("native", marks=pytest.mark.skipif(
    fsync_threads._NativeThreads is None, reason="the native fsync threads were not built (no C compiler)"))])
def test_every_record_is_answered_and_measured(fsync: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = latency_floor.main(["--records", "300", "--warmup", "20", "--rate", "1000", "--fsync", fsync])

    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["tool"], result["fsync"], result["records"]) == ("latency_floor", fsync, 300)
    latency = result["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["p999"] <= latency["max"]
    assert result["servers_cpu_percent_of_a_core"] > 0
