"""kafka-python 2.0.2, still common in applications, against the Kafka port: produce, then consume in a classic
consumer group and commit. It is installed beside the venv by `make install` (`pip install --target
.venv/kafka-python-2.0.2 kafka-python==2.0.2`), since it cannot share a path with the 3.x the other tests use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kafka.conftest import make_topic
from tests.support.cluster import BrokerCluster

LEGACY_DIR = Path(__file__).resolve().parents[2] / ".venv" / "kafka-python-2.0.2"
COUNT = 300
RUN_TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(not (LEGACY_DIR / "kafka").is_dir(), reason=(
    f"kafka-python 2.0.2 is not installed in {LEGACY_DIR}: `make install` puts it there (it needs the package "
    "registry), or run: .venv/bin/python -m pip install --target .venv/kafka-python-2.0.2 kafka-python==2.0.2"))


def test_kafka_python_2_0_2_produces_and_consumes_in_a_group(kafka_cluster: BrokerCluster, topic_name: str) -> None:
    make_topic(kafka_cluster, topic_name, partitions=3)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(LEGACY_DIR), str(Path(__file__).resolve().parents[2])])}
    run = subprocess.run([sys.executable, "-m", "tests.kafka.legacy_kafka_python", kafka_cluster.kafka_bootstrap,
                          topic_name, f"{topic_name}-group", str(COUNT)], env=env, capture_output=True, text=True,
                         timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["version"] == "2.0.2"
    assert result["received"] == result["sent"] and len(result["sent"]) == COUNT
    assert result["values"] == sorted(f"v{i}" for i in range(COUNT))
    ends: dict[int, int] = {}
    for partition, offset in result["sent"]:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    assert {int(p): c for p, c in result["committed"].items() if c is not None} == ends
