"""The metrics endpoint of one in-process broker: what it serves and refuses, a port already taken, brokers of one
process keeping apart registries, and the counting helpers (answers' error codes, Kafka answers' error codes)."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from kio.schema.errors import ErrorCode
from logbroker_client import Admin, Consumer, Producer, TopicPartition
from logbroker_client import records as rec
from logbroker_client.connection import Connection
from logbroker_client.proto import logbroker_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

from logbroker.server.app import BrokerServer
from logbroker.server.config import BrokerConfig
from logbroker.server.metrics import count_records, kafka_error_names, response_error_codes
from logbroker.server.replica_manager import STALL_LOG_INTERVAL_S
from tests.support.brokers import InProcessBroker, free_port, wait_until


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[InProcessBroker]:
    running = InProcessBroker(tmp_path / "data", metrics_listen=f"127.0.0.1:{free_port()}").start()
    try:
        yield running
    finally:
        running.stop()


def url_of(broker: InProcessBroker, path: str = "/metrics") -> str:
    return f"http://{broker.config.metrics_listen}{path}"


def samples(broker: InProcessBroker) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url_of(broker), timeout=5) as answer:
        text = answer.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_are_served_on_get_and_follow_produce_and_fetch(metered: InProcessBroker) -> None:
    with Admin(metered.address) as admin:
        admin.create_topic("counted", partitions=1, replication_factor=1)
    with Producer(metered.address) as producer:
        for i in range(25):
            producer.send("counted", value=b"x" * i)
        assert producer.flush() == 0
    tp = TopicPartition("counted", 0)
    with Consumer(metered.address) as consumer:
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        got: list[object] = []
        wait_until(lambda: got.extend(consumer.poll(0.2)) or len(got) >= 25, 10, "25 records consumed")
    labels = frozenset({("topic", "counted"), ("partition", "0")})
    scraped = samples(metered)
    assert scraped[("logbroker_partition_produced_records_total", labels)] == 25
    assert scraped[("logbroker_partition_fetched_records_total", labels)] == 25
    assert scraped[("logbroker_partition_leader", labels)] == 1
    assert scraped[("logbroker_controller_active", frozenset())] == 1
    assert scraped[("logbroker_partition_offline", labels)] == 0
    fetches = frozenset({("protocol", "data"), ("api", "Fetch")})  # the consumer fetches on the data port
    assert scraped[("logbroker_request_duration_seconds_count", fetches)] >= 1
    with urllib.request.urlopen(urllib.request.Request(url_of(metered), method="HEAD"), timeout=5) as head:
        assert head.status == 200 and head.read() == b""


@pytest.mark.parametrize("native_fsync", [True, False], ids=["native threads", "thread pool only"])
def test_the_native_fsync_threads_are_counted_and_shown_off_when_turned_off(tmp_path: Path,
                                                                           native_fsync: bool) -> None:
    broker = InProcessBroker(tmp_path / "data", metrics_listen=f"127.0.0.1:{free_port()}", native_fsync=native_fsync)
    broker.start()
    try:
        with Admin(broker.address) as admin:
            admin.create_topic("synced", partitions=1, replication_factor=1)
        with Producer(broker.address, linger_ms=0) as producer:
            for i in range(20):  # one at a time: each is a small append of its own, fsynced before its answer
                producer.send("synced", value=b"%d" % i).result(timeout=10)
        scraped = samples(broker)
    finally:
        broker.stop()
    threads = scraped[("logbroker_native_fsync_threads", frozenset())]
    ran = scraped[("logbroker_native_fsyncs_total", frozenset({("result", "ok")}))]
    assert scraped[("logbroker_native_fsyncs_total", frozenset({("result", "failed")}))] == 0
    if native_fsync:
        assert threads == broker.config.flush_threads
        assert ran >= 20, f"{ran} native fsyncs for 20 records appended one at a time"
    else:
        assert (threads, ran) == (0, 0)


def test_a_request_refused_as_a_whole_is_counted_by_its_status(metered: InProcessBroker) -> None:
    twice = pb.FetchPartition(topic="any", partition=0, fetch_offset=0)
    conn = Connection(metered.address)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            conn.broker.Fetch(pb.FetchRequest(partitions=[twice, twice]), timeout=5)
    finally:
        conn.close()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    key = ("logbroker_request_errors_total",
           frozenset({("protocol", "grpc"), ("api", "Fetch"), ("error", "INVALID_ARGUMENT")}))
    # The count is taken as the handler's abort unwinds, which may be just after the client has its answer.
    wait_until(lambda: key in samples(metered), 10, "the refused Fetch to be counted")
    assert samples(metered)[key] == 1


def test_other_paths_and_methods_are_refused(metered: InProcessBroker) -> None:
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url_of(metered, "/nothing"), timeout=5)
    assert missing.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as posted:
        urllib.request.urlopen(urllib.request.Request(url_of(metered), data=b"x", method="POST"), timeout=5)
    assert posted.value.code == 405
    host, port = metered.config.metrics_listen.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b"not http at all\r\n\r\n")
        assert raw.recv(100) == b""  # closed without an answer; the broker carries on
    assert samples(metered)


def test_brokers_of_one_process_keep_their_own_metrics(tmp_path: Path) -> None:
    first = InProcessBroker(tmp_path / "one").start()
    second = InProcessBroker(tmp_path / "two").start()
    try:
        assert first.server is not None and second.server is not None
        one, two = first.server.broker.metrics, second.server.broker.metrics
        assert one.registry is not two.registry
        one.record_produced("t", 0, [(b"abc", 3)])
        assert one.produced == {("t", 0): [3, 3]} and two.produced == {}
    finally:
        first.stop()
        second.stop()


def test_a_metrics_port_in_use_stops_the_start_and_names_it(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = f"127.0.0.1:{squatter.getsockname()[1]}"
        config = BrokerConfig(data_dir=tmp_path / "data", listen=f"127.0.0.1:{free_port()}", metrics_listen=taken)
        with pytest.raises(OSError, match=f"cannot serve metrics on {taken}.*--metrics-listen"):
            asyncio.run(BrokerServer(config).start())


def test_answers_error_codes_are_found_at_the_top_and_one_level_down() -> None:
    produce = pb.ProduceResponse(results=[pb.PartitionProduceResult(topic="t", partition=0),
                                          pb.PartitionProduceResult(topic="t", partition=1,
                                                                    error_code=pb.ErrorCode.NOT_LEADER)])
    assert list(response_error_codes(produce)) == [pb.ErrorCode.NOT_LEADER]
    refused = pb.AlterGroupConfigsResponse(error_code=pb.ErrorCode.INVALID_REQUEST)
    assert list(response_error_codes(refused)) == [pb.ErrorCode.INVALID_REQUEST]
    assert list(response_error_codes(pb.MetadataResponse())) == []


@dataclass(frozen=True)
class KafkaPartition:
    partition_index: int
    error_code: ErrorCode


@dataclass(frozen=True)
class KafkaTopic:
    name: str
    partitions: tuple[KafkaPartition, ...]


@dataclass(frozen=True)
class KafkaAnswer:
    error_code: ErrorCode
    responses: tuple[KafkaTopic, ...]


def test_kafka_answers_error_codes_are_found_in_topics_and_partitions() -> None:
    answer = KafkaAnswer(ErrorCode.none, (KafkaTopic("t", (
        KafkaPartition(0, ErrorCode.none), KafkaPartition(1, ErrorCode.not_leader_or_follower))),))
    assert list(kafka_error_names(answer)) == ["NOT_LEADER_OR_FOLLOWER"]


def test_fetched_records_are_counted_from_batch_headers_without_control_batches() -> None:
    def batch(values: int, attributes: int = 0) -> bytes:
        builder = rec.BatchBuilder()
        for i in range(values):
            builder.append(0, None, b"v%d" % i, [])
        return builder.build(attributes_extra=attributes)

    data = batch(5) + batch(1, rec.CONTROL_FLAG) + batch(3)
    assert count_records(data) == 8
    assert count_records(data[:-1]) == 5  # a partial batch at the end is not counted
    assert count_records(b"") == 0


def test_a_held_up_event_loop_is_measured_and_logged_for_the_operator(
        metered: InProcessBroker, caplog: pytest.LogCaptureFixture) -> None:
    """A callback that holds the broker's loop for 0.5 s delays its Raft ticks as long: the stall histogram
    counts one stall between 0.4 and 0.8 s, and one WARNING names the broker, the stall and the metric."""
    def stalls_between(scrape: dict[tuple[str, frozenset[tuple[str, str]]], float], low: str, high: str) -> float:
        bucket = "logbroker_event_loop_stall_seconds_bucket"
        return scrape[(bucket, frozenset({("le", high)}))] - scrape[(bucket, frozenset({("le", low)}))]

    before = samples(metered)
    assert before[("logbroker_event_loop_stall_seconds_count", frozenset())] >= 1  # every tick is measured
    def hold_loop() -> None:
        replicas = metered.server.broker.replicas  # type: ignore[union-attr]
        replicas._stall_logged_at = -STALL_LOG_INTERVAL_S  # a stall at start-up was logged: forget it
        replicas._stalls_unlogged, replicas._longest_stall_s = 0, 0.0
        time.sleep(0.5)

    with caplog.at_level("WARNING", logger="logbroker.broker"):
        metered.loop.call_soon_threadsafe(hold_loop)
        wait_until(lambda: stalls_between(samples(metered), "0.4", "+Inf") > stalls_between(before, "0.4", "+Inf"),
                   10, "the stall to be measured")
        wait_until(lambda: any("held up" in r.getMessage() for r in caplog.records), 5, "the stall warning")
    after = samples(metered)
    assert stalls_between(after, "0.4", "0.8") == stalls_between(before, "0.4", "0.8") + 1
    warning = next(r.getMessage() for r in caplog.records if "held up" in r.getMessage())
    assert "broker 1" in warning and "logbroker_event_loop_stall_seconds" in warning
    held_ms = int(warning.split("held up for ")[1].split(" ms")[0])
    assert 400 <= held_ms < 800
