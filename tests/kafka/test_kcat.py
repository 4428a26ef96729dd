"""kcat (librdkafka's command-line client) against the Kafka port: metadata, produce, consume."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.kafka.conftest import make_topic
from tests.support.cluster import BrokerCluster

KCAT = shutil.which("kcat") or shutil.which("kafkacat")
pytestmark = pytest.mark.skipif(KCAT is None, reason="kcat is not installed (Debian: apt-get install kcat)")


def kcat(bootstrap: str, *args: str, stdin: bytes = b"") -> bytes:
    assert KCAT is not None
    done = subprocess.run([KCAT, "-b", bootstrap, *args], input=stdin, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def test_kcat_lists_produces_and_consumes(kafka_cluster: BrokerCluster, topic_name: str) -> None:
    bootstrap = kafka_cluster.kafka_bootstrap
    make_topic(kafka_cluster, topic_name, partitions=2)
    listing = kcat(bootstrap, "-L", "-t", topic_name).decode()
    assert f'topic "{topic_name}" with 2 partitions' in listing and "3 brokers" in listing
    lines = b"".join(b"key%d:value %d\n" % (i, i) for i in range(50))
    kcat(bootstrap, "-P", "-t", topic_name, "-K:", "-z", "snappy", stdin=lines)
    out = kcat(bootstrap, "-C", "-t", topic_name, "-e", "-q", "-o", "beginning", "-f", "%k=%s\n")
    assert sorted(out.splitlines()) == sorted(b"key%d=value %d" % (i, i) for i in range(50))
