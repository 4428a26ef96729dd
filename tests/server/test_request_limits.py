"""What one request may cost a broker (a real process): Fetch answers are capped by the broker's settings,
whatever limits the request names; a partition named twice is refused; a request over max_request_bytes
is refused before it is read. The broker's RSS stays bounded throughout.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from logbroker_client import Admin, Producer
from logbroker_client import records as rec
from logbroker_client.connection import Connection
from logbroker_client.errors import InvalidRequestError
from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.server.config import DEFAULT_MAX_FETCH_BYTES, DEFAULT_MAX_PARTITION_FETCH_BYTES
from tests.support.brokers import BrokerProcess
from tests.support.rss import peak_rss

UNLIMITED = (1 << 31) - 1
BATCH_VALUE_BYTES = 1_000_000
BATCHES_PER_REQUEST = 15
HOSTILE_PARTITION_BATCHES = 60  # the 60 MB partition
WIDE_PARTITIONS = 20
WIDE_BATCHES_PER_PARTITION = 3
RSS_LIMIT_MB = 300
ANSWER_LIMIT_S = 5.0
CALL_TIMEOUT_S = 30.0


@contextlib.contextmanager
def running_broker(data_dir: Path, config: str | None = None) -> Iterator[BrokerProcess]:
    extra_args = []
    if config is not None:
        config_path = data_dir.parent / "broker.toml"
        config_path.write_text(config)
        extra_args = ["--config", str(config_path)]
    broker = BrokerProcess(data_dir, extra_args=extra_args).start()
    try:
        yield broker
    finally:
        with contextlib.suppress(Exception):
            broker.kill()


def one_mb_batch() -> bytes:
    return rec.build_batch([(int(time.time() * 1000), None, os.urandom(BATCH_VALUE_BYTES), [])])


def fill(connection: Connection, topic: str, partition: int, batches: int, per_request: int) -> None:
    batch = one_mb_batch()
    for first in range(0, batches, per_request):
        records = batch * min(per_request, batches - first)
        request = pb.ProduceRequest(acks=1, partitions=[pb.PartitionRecords(topic=topic, partition=partition,
                                                                           records=records)])
        result = connection.broker.Produce(request, timeout=CALL_TIMEOUT_S).results[0]
        assert result.error_code == pb.ErrorCode.NONE, result.error_message


def fetch(connection: Connection, parts: list[tuple[str, int]]) -> pb.FetchResponse:
    request = pb.FetchRequest(max_wait_ms=0, min_bytes=1, max_bytes=UNLIMITED, partitions=[
        pb.FetchPartition(topic=topic, partition=index, fetch_offset=0, partition_max_bytes=UNLIMITED)
        for topic, index in parts])
    return connection.broker.Fetch(request, timeout=CALL_TIMEOUT_S)


@pytest.fixture(scope="module")
def loaded_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One broker holding a 60 MB partition ("hostile") and 20 partitions of 3 MB ("wide")."""
    with running_broker(tmp_path_factory.mktemp("limits") / "data") as broker:
        admin = Admin(broker.address)
        admin.create_topic("hostile", partitions=1)
        admin.create_topic("wide", partitions=WIDE_PARTITIONS)
        connection = Connection(broker.address)
        try:
            fill(connection, "hostile", 0, HOSTILE_PARTITION_BATCHES, BATCHES_PER_REQUEST)
            for partition in range(WIDE_PARTITIONS):
                fill(connection, "wide", partition, WIDE_BATCHES_PER_PARTITION, WIDE_BATCHES_PER_PARTITION)
        finally:
            connection.close()
        yield broker


@pytest.fixture
def connection(loaded_broker: BrokerProcess) -> Iterator[Connection]:
    conn = Connection(loaded_broker.address)
    try:
        yield conn
    finally:
        conn.close()


def pid_of(broker: BrokerProcess) -> int:
    assert broker.proc is not None
    return broker.proc.pid


def test_a_fetch_naming_one_partition_20_times_is_refused_at_once(loaded_broker: BrokerProcess,
                                                                  connection: Connection) -> None:
    began = time.monotonic()
    with peak_rss([pid_of(loaded_broker)]) as rss, pytest.raises(grpc.RpcError) as refused:
        fetch(connection, [("hostile", 0)] * 20)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hostile-0 is named more than once" in (refused.value.details() or "")
    assert time.monotonic() - began < ANSWER_LIMIT_S
    assert rss.peak_mb[pid_of(loaded_broker)] < RSS_LIMIT_MB


def test_unlimited_fetch_limits_are_capped_by_the_broker(loaded_broker: BrokerProcess, connection: Connection) -> None:
    parts = [("wide", p) for p in range(WIDE_PARTITIONS)]
    largest_batch = len(one_mb_batch())
    began = time.monotonic()
    with peak_rss([pid_of(loaded_broker)]) as rss:
        wide = fetch(connection, parts)
        single = fetch(connection, [("hostile", 0)])
    elapsed_s = time.monotonic() - began
    assert all(r.error_code == pb.ErrorCode.NONE for r in [*wide.results, *single.results])
    wide_bytes = [len(r.records) for r in wide.results]
    assert 0 < sum(wide_bytes) <= DEFAULT_MAX_FETCH_BYTES + largest_batch, wide_bytes
    assert max(wide_bytes) <= DEFAULT_MAX_PARTITION_FETCH_BYTES + largest_batch, wide_bytes
    assert 0 < len(single.results[0].records) <= DEFAULT_MAX_PARTITION_FETCH_BYTES + largest_batch
    assert elapsed_s < ANSWER_LIMIT_S
    assert rss.peak_mb[pid_of(loaded_broker)] < RSS_LIMIT_MB, f"peak RSS {rss.peak_mb} MiB"


def test_the_caps_are_broker_settings(tmp_path: Path) -> None:
    config = "max_request_bytes = 3000000\nmax_fetch_bytes = 2500000\nmax_partition_fetch_bytes = 1500000\n"
    with running_broker(tmp_path / "data", config) as broker:
        Admin(broker.address).create_topic("t", partitions=2)
        connection = Connection(broker.address)
        try:
            for partition in range(2):
                fill(connection, "t", partition, batches=4, per_request=2)
            with pytest.raises(grpc.RpcError) as refused:
                fill(connection, "t", 0, batches=5, per_request=5)
            response = fetch(connection, [("t", 0), ("t", 1)])
        finally:
            connection.close()
        with Producer(broker.address, max_request_bytes=5_000_000) as producer:
            too_large = producer.send("t", value=b"x" * 4_000_000, partition=0)
            producer.flush()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(InvalidRequestError, match="max_request_bytes"):
        too_large.result(timeout=CALL_TIMEOUT_S)
    data_batches = [sum(not header.is_control for _, header in rec.iter_batch_headers(r.records))
                    for r in response.results]
    assert data_batches == [1, 1]  # a second batch would pass a cap: per partition, then in all
