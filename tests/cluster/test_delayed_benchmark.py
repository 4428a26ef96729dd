"""The delayed-delivery benchmark, run small: parked records stay parked, and no probe arrives early."""

from __future__ import annotations

import json

import pytest

from benchmarks import delayed


def test_the_delayed_benchmark_parks_everything_and_delivers_no_probe_before_its_time(
        capsys: pytest.CaptureFixture[str]) -> None:
    delayed.main(["--pending", "3000", "--probes", "60", "--probe-rate", "100", "--min-delay-ms", "50",
                  "--max-delay-ms", "400"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["park"]["pending"] == 3000
    assert result["probe"]["received"] == 60 and result["probe"]["early"] == 0
    assert result["probe"]["lateness_ms"]["max"] is not None
