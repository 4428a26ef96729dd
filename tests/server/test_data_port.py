"""The data port: clients' Produce, Fetch and ListOffsets as plain frames (logbroker_client/data_wire.py).

What a client sees (its records land and read back, through the data port and not gRPC, and through gRPC
when the data port is off or gone) and what hostile bytes get (a clear refusal, a closed connection, and a
broker that goes on serving everyone else)."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from logbroker_client import Admin, Consumer, Producer
from logbroker_client import data_wire as wire
from logbroker_client import records as rec
from logbroker_client.aio import AsyncConsumer, AsyncProducer
from logbroker_client.data_channel import DataChannel
from logbroker_client.errors import BrokerUnavailableError, InvalidRequestError, LogbrokerError, RequestTimedOutError
from logbroker_client.metadata import ClusterMetadata
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.types import TopicPartition

from logbroker.server import data_port as server_data_port
from tests.support.brokers import InProcessBroker, free_port, wait_until
from tests.support.sockets import data_port_hello, read_data_answer

TOPIC = "jobs"
DEADLINE_S = 10.0


def requests_served(broker: InProcessBroker, protocol: str, api: str) -> float:
    """How many calls of `api` the broker timed on `protocol`, read from its own metrics registry."""
    assert broker.server is not None
    registry = broker.server.broker.metrics.registry

    async def read() -> float:
        value = registry.get_sample_value("logbroker_request_duration_seconds_count",
                                          {"protocol": protocol, "api": api})
        return float(value or 0.0)

    return broker.run(read())  # type: ignore[return-value]


def data_port_of(broker: InProcessBroker) -> int:
    assert broker.server is not None and broker.server.data_port is not None
    assert broker.server.data_port.port is not None
    return broker.server.data_port.port


def read_back(address: str, count: int) -> list[bytes]:
    with Consumer(address, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition(TOPIC, 0)])
        values: list[bytes] = []
        deadline = time.monotonic() + DEADLINE_S
        while len(values) < count and time.monotonic() < deadline:
            values += [r.value for r in consumer.poll(timeout=0.5)]
        return values


@pytest.fixture
def topic_broker(broker: InProcessBroker) -> InProcessBroker:
    with Admin(broker.address) as admin:
        admin.create_topic(TOPIC, partitions=1)
    return broker


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    sock.settimeout(DEADLINE_S)
    return sock


def handshake(port: int, client_id: str = "test-client") -> socket.socket:
    sock = connect(port)
    assert data_port_hello(sock, client_id) > 0
    return sock


read_answer = read_data_answer


def closed_by_broker(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def produce_request(value: bytes = b"x") -> pb.ProduceRequest:
    batch = rec.build_batch([(int(time.time() * 1000), None, value, ())])
    return pb.ProduceRequest(acks=-1, timeout_ms=5000, partitions=[pb.PartitionRecords(topic=TOPIC, partition=0,
                                                                                         records=batch)])


# ------------------------------------------------------------------------------ what clients see


def test_the_producer_sends_on_the_data_port_and_not_grpc(topic_broker: InProcessBroker) -> None:
    with Producer(topic_broker.address, linger_ms=0) as producer:
        offsets = [producer.send(TOPIC, f"job-{i}".encode()).result(DEADLINE_S).offset for i in range(20)]
    assert offsets == list(range(offsets[0], offsets[0] + 20))
    assert requests_served(topic_broker, "data", "Produce") >= 1
    assert requests_served(topic_broker, "grpc", "Produce") == 0
    assert read_back(topic_broker.address, 20) == [f"job-{i}".encode() for i in range(20)]


def test_the_consumer_fetches_on_the_data_port_and_not_grpc(topic_broker: InProcessBroker) -> None:
    with Producer(topic_broker.address, linger_ms=0) as producer:
        for i in range(5):
            producer.send(TOPIC, f"job-{i}".encode())
    assert read_back(topic_broker.address, 5) == [f"job-{i}".encode() for i in range(5)]
    assert requests_served(topic_broker, "data", "Fetch") >= 1
    assert requests_served(topic_broker, "grpc", "Fetch") == 0


def test_a_consumer_closed_during_a_long_poll_leaves_nothing_on_the_broker(topic_broker: InProcessBroker) -> None:
    port = topic_broker.server.data_port if topic_broker.server is not None else None
    assert port is not None
    consumer = Consumer(topic_broker.address, fetch_max_wait_ms=20_000)
    consumer.assign([TopicPartition(TOPIC, 0)])
    assert consumer.poll(timeout=0.3) == []  # the topic is empty: a fetch now waits up to 20 s on the broker
    wait_until(lambda: sum(len(c.fetches) for c in list(port.connections)) == 1, DEADLINE_S, "the long poll")
    consumer.close()
    # Its EOF ends the long poll at once: no connection, no task held for max_wait_ms.
    wait_until(lambda: not port.connections, 3, "the closed consumer's connection to go")


def test_the_asyncio_producer_and_consumer_use_the_data_port_too(topic_broker: InProcessBroker) -> None:
    async def produce_and_consume() -> list[bytes]:
        async with AsyncProducer(topic_broker.address, linger_ms=0) as producer:
            for i in range(10):
                await producer.send_and_wait(TOPIC, f"async-{i}".encode())
        async with AsyncConsumer(topic_broker.address, auto_offset_reset="earliest") as consumer:
            await consumer.assign([TopicPartition(TOPIC, 0)])
            values: list[bytes] = []
            deadline = time.monotonic() + DEADLINE_S
            while len(values) < 10 and time.monotonic() < deadline:
                values += [r.value for r in await consumer.poll(timeout=0.5)]
            return values

    assert asyncio.run(produce_and_consume()) == [f"async-{i}".encode() for i in range(10)]
    for api in ("Produce", "Fetch"):
        assert requests_served(topic_broker, "data", api) >= 1
        assert requests_served(topic_broker, "grpc", api) == 0


def test_the_asyncio_producer_falls_back_to_grpc_when_the_data_port_is_gone(topic_broker: InProcessBroker) -> None:
    assert topic_broker.server is not None and topic_broker.server.data_port is not None
    topic_broker.run(topic_broker.server.data_port.stop(0.0))

    async def produce() -> int:
        async with AsyncProducer(topic_broker.address, linger_ms=0) as producer:
            return (await producer.send_and_wait(TOPIC, b"fallback")).offset

    assert asyncio.run(produce()) >= 0
    assert requests_served(topic_broker, "grpc", "Produce") >= 1


def test_metadata_names_each_broker_data_port(topic_broker: InProcessBroker) -> None:
    metadata = ClusterMetadata(topic_broker.address)
    try:
        (info,) = metadata.refresh().brokers
    finally:
        metadata.close()
    assert info.port == topic_broker.port
    assert info.data_port == data_port_of(topic_broker)


def test_with_the_data_port_off_metadata_names_none_and_producers_use_grpc(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path / "data", data_listen="off").start()
    try:
        assert broker.server is not None and broker.server.data_port is None
        with Admin(broker.address) as admin:
            admin.create_topic(TOPIC, partitions=1)
        with Producer(broker.address, linger_ms=0) as producer:
            producer.send(TOPIC, b"over grpc").result(DEADLINE_S)
        assert requests_served(broker, "grpc", "Produce") >= 1
        assert requests_served(broker, "data", "Produce") == 0
        assert read_back(broker.address, 1) == [b"over grpc"]
    finally:
        broker.stop()


def test_a_producer_falls_back_to_grpc_when_the_data_port_cannot_be_reached(
        topic_broker: InProcessBroker, caplog: pytest.LogCaptureFixture) -> None:
    assert topic_broker.server is not None and topic_broker.server.data_port is not None
    port = data_port_of(topic_broker)
    topic_broker.run(topic_broker.server.data_port.stop(0.0))
    caplog.set_level(logging.WARNING, logger="logbroker_client.metadata")
    with Producer(topic_broker.address, linger_ms=0) as producer:
        producer.send(TOPIC, b"still lands").result(DEADLINE_S)
    assert requests_served(topic_broker, "grpc", "Produce") >= 1
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert f"127.0.0.1:{port}" in warning and "using its gRPC port instead" in warning


def test_refusals_read_the_same_as_on_grpc(topic_broker: InProcessBroker) -> None:
    request = produce_request()
    request.acks = 7
    answers: list[tuple[object, LogbrokerError | None]] = []
    done = threading.Event()
    channel = DataChannel(topic_broker.address, ("127.0.0.1", data_port_of(topic_broker)), "t")
    try:
        channel.call(wire.Method.PRODUCE, request, pb.ProduceResponse, DEADLINE_S,
                     lambda response, error: (answers.append((response, error)), done.set()))
        assert done.wait(DEADLINE_S)
    finally:
        channel.close()
    ((response, error),) = answers
    assert response is None and isinstance(error, InvalidRequestError)
    assert "acks must be -1 (all), 0 or 1, got 7" in str(error)


def test_an_unknown_topic_is_answered_per_partition(topic_broker: InProcessBroker) -> None:
    request = produce_request()
    request.partitions[0].topic = "no-such-topic"
    sock = handshake(data_port_of(topic_broker))
    with sock:
        sock.sendall(wire.encode_frame(5, wire.Method.PRODUCE, request.SerializeToString()))
        correlation_id, status, body = read_answer(sock)
    assert (correlation_id, status) == (5, 0)
    (result,) = pb.ProduceResponse.FromString(body).results
    assert result.error_code == pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION and "no-such-topic" in result.error_message


def test_answers_come_back_as_they_are_ready_not_in_request_order(topic_broker: InProcessBroker) -> None:
    """A long-polled Fetch does not hold up a Produce sent after it on the same connection."""
    fetch = pb.FetchRequest(max_wait_ms=1000, min_bytes=1_000_000,
                            partitions=[pb.FetchPartition(topic=TOPIC, partition=0, fetch_offset=0)])
    sock = handshake(data_port_of(topic_broker))
    with sock:
        sock.sendall(wire.encode_frame(1, wire.Method.FETCH, fetch.SerializeToString())
                     + wire.encode_frame(2, wire.Method.PRODUCE, produce_request(b"quick").SerializeToString()))
        first = read_answer(sock)
        second = read_answer(sock)
    assert [first[0], second[0]] == [2, 1]
    produced_at = pb.ProduceResponse.FromString(first[2]).results[0].base_offset
    (fetched,) = pb.FetchResponse.FromString(second[2]).results
    assert fetched.high_watermark == produced_at + 1


def test_hundreds_of_pipelined_requests_are_all_answered(topic_broker: InProcessBroker) -> None:
    """More than MAX_IN_FLIGHT_PER_CONNECTION at once: the broker stops reading, then takes the rest."""
    count = wire.MAX_IN_FLIGHT_PER_CONNECTION * 2 + 7
    sock = handshake(data_port_of(topic_broker))
    with sock:
        sock.sendall(b"".join(wire.encode_frame(i, wire.Method.PRODUCE, produce_request(str(i).encode())
                                                .SerializeToString()) for i in range(count)))
        answers = [read_answer(sock) for _ in range(count)]
    assert sorted(a[0] for a in answers) == list(range(count))
    assert all(status == 0 for _, status, _ in answers)
    offsets = sorted(pb.ProduceResponse.FromString(body).results[0].base_offset for _, _, body in answers)
    assert offsets == list(range(offsets[0], offsets[0] + count))


def test_a_request_past_its_deadline_fails_on_the_client_and_the_late_answer_is_dropped(
        topic_broker: InProcessBroker) -> None:
    fetch = pb.FetchRequest(max_wait_ms=1500, min_bytes=1_000_000,
                            partitions=[pb.FetchPartition(topic=TOPIC, partition=0, fetch_offset=0)])
    outcomes: list[tuple[object, LogbrokerError | None]] = []
    channel = DataChannel(topic_broker.address, ("127.0.0.1", data_port_of(topic_broker)), "t")
    try:
        channel.call(wire.Method.FETCH, fetch, pb.FetchResponse, 0.2, lambda r, e: outcomes.append((r, e)))
        wait_until(lambda: bool(outcomes), DEADLINE_S, "the client-side deadline")
        assert outcomes[0][0] is None and isinstance(outcomes[0][1], RequestTimedOutError)
        wait_until(lambda: requests_served(topic_broker, "data", "Fetch") >= 1, DEADLINE_S, "the broker's answer")
        after: list[tuple[object, LogbrokerError | None]] = []  # the channel still serves new requests
        channel.call(wire.Method.PRODUCE, produce_request(), pb.ProduceResponse, DEADLINE_S,
                     lambda r, e: after.append((r, e)))
        wait_until(lambda: bool(after), DEADLINE_S, "the produce answer")
    finally:
        channel.close()
    assert len(outcomes) == 1  # the Fetch's late answer was not delivered a second time
    assert after[0][1] is None


def test_a_broker_that_goes_away_fails_every_request_in_flight(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path / "data", shutdown_grace_ms=200).start()  # stops before the long polls end
    with Admin(broker.address) as admin:
        admin.create_topic(TOPIC, partitions=1)
    channel = DataChannel(broker.address, ("127.0.0.1", data_port_of(broker)), "t")
    outcomes: list[LogbrokerError | None] = []
    fetch = pb.FetchRequest(max_wait_ms=20_000, min_bytes=1_000_000,
                            partitions=[pb.FetchPartition(topic=TOPIC, partition=0, fetch_offset=0)])
    try:
        for _ in range(3):
            channel.call(wire.Method.FETCH, fetch, pb.FetchResponse, 60.0, lambda r, e: outcomes.append(e))
        wait_until(lambda: broker.server is not None and broker.server.data_port is not None
                   and sum(len(c.tasks) for c in broker.server.data_port.connections) == 3, DEADLINE_S,
                   "three fetches in flight at the broker")
    finally:
        broker.stop()
    wait_until(lambda: len(outcomes) == 3, DEADLINE_S, "every request in flight to fail")
    assert all(isinstance(e, BrokerUnavailableError) for e in outcomes), outcomes
    assert channel.closed
    later: list[LogbrokerError | None] = []
    channel.call(wire.Method.FETCH, fetch, pb.FetchResponse, 1.0, lambda r, e: later.append(e))
    assert isinstance(later[0], BrokerUnavailableError)


def test_a_request_larger_than_the_broker_takes_is_refused_before_it_is_sent(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path / "data", max_request_bytes=200_000).start()
    try:
        channel = DataChannel(broker.address, ("127.0.0.1", data_port_of(broker)), "t")
        errors: list[LogbrokerError | None] = []
        try:
            channel.call(wire.Method.PRODUCE, produce_request(b"v" * 400_000), pb.ProduceResponse, DEADLINE_S,
                         lambda r, e: errors.append(e))
        finally:
            channel.close()
        assert isinstance(errors[0], InvalidRequestError) and "max_request_bytes" in str(errors[0])
    finally:
        broker.stop()


# ------------------------------------------------------------------------------ hostile bytes


def still_serves(broker: InProcessBroker) -> None:
    sock = handshake(data_port_of(broker))
    with sock:
        sock.sendall(wire.encode_frame(9, wire.Method.LIST_OFFSETS, pb.ListOffsetsRequest(
            partitions=[pb.ListOffsetsPartition(topic=TOPIC, partition=0, timestamp_ms=-1)]).SerializeToString()))
        correlation_id, status, _ = read_answer(sock)
    assert (correlation_id, status) == (9, 0)


@pytest.mark.parametrize("first_bytes, named", [
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "gRPC / HTTP/2"),
    (b"GET /metrics HTTP/1.1\r\n\r\n", "HTTP"),
    (b"LBRAFT01" + bytes(32), "Raft port"),
    (b"\x00\x00\x00\x10\x00\x12\x00\x04garbage!", "first bytes"),
])
def test_a_client_of_another_protocol_is_closed_and_named_in_the_log(
        topic_broker: InProcessBroker, caplog: pytest.LogCaptureFixture, first_bytes: bytes, named: str) -> None:
    caplog.set_level(logging.WARNING, logger="logbroker.data_port")
    with connect(data_port_of(topic_broker)) as sock:
        sock.sendall(first_bytes)
        assert closed_by_broker(sock)
    wait_until(lambda: any(named in r.getMessage() for r in caplog.records), DEADLINE_S, "the refusal logged")
    still_serves(topic_broker)


def test_a_frame_over_the_limit_is_answered_and_the_connection_closed(topic_broker: InProcessBroker) -> None:
    sock = handshake(data_port_of(topic_broker))
    with sock:
        sock.sendall(struct.pack(">IIB", 1 << 30, 77, wire.Method.PRODUCE))
        correlation_id, status, body = read_answer(sock)
        assert correlation_id == 77 and status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert b"larger than max" in body
        assert closed_by_broker(sock)
    still_serves(topic_broker)


def test_an_unknown_method_and_a_request_that_does_not_parse_get_errors_and_the_connection_lives(
        topic_broker: InProcessBroker) -> None:
    sock = handshake(data_port_of(topic_broker))
    with sock:
        sock.sendall(wire.encode_frame(1, 99, b"") + wire.encode_frame(2, wire.Method.PRODUCE, b"\xff\xff\xff"))
        answers = {cid: (status, body) for cid, status, body in (read_answer(sock), read_answer(sock))}
        assert answers[1][0] == grpc.StatusCode.UNIMPLEMENTED.value[0] and b"method 99" in answers[1][1]
        assert answers[2][0] == grpc.StatusCode.INVALID_ARGUMENT.value[0] and b"ProduceRequest" in answers[2][1]
        sock.sendall(wire.encode_frame(3, wire.Method.PRODUCE, produce_request().SerializeToString()))
        assert read_answer(sock)[:2] == (3, 0)


def test_a_frame_shorter_than_its_head_closes_the_connection(topic_broker: InProcessBroker) -> None:
    sock = handshake(data_port_of(topic_broker))
    with sock:
        sock.sendall(struct.pack(">IIB", 2, 1, 1))
        assert closed_by_broker(sock)
    still_serves(topic_broker)


def test_a_hello_with_an_overlong_client_id_is_refused(topic_broker: InProcessBroker) -> None:
    with connect(data_port_of(topic_broker)) as sock:
        sock.sendall(struct.pack(">8sH", wire.MAGIC, 60_000) + b"x" * 100)
        assert closed_by_broker(sock)
    still_serves(topic_broker)


@pytest.fixture
def quick_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Limits in tenths of a second, so tests can watch them act (set before the broker starts)."""
    monkeypatch.setattr(wire, "HANDSHAKE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(wire, "FRAME_DEADLINE_S", 0.3)
    monkeypatch.setattr(wire, "IDLE_TIMEOUT_S", 0.6)
    monkeypatch.setattr(server_data_port, "IDLE_SWEEP_INTERVAL_S", 0.1)


@pytest.fixture
def quick_broker(quick_limits: None, tmp_path: Path) -> Iterator[InProcessBroker]:
    broker = InProcessBroker(tmp_path / "data").start()
    with Admin(broker.address) as admin:
        admin.create_topic(TOPIC, partitions=1)
    try:
        yield broker
    finally:
        broker.stop()


def test_a_connection_that_never_says_hello_is_closed(quick_broker: InProcessBroker) -> None:
    with connect(data_port_of(quick_broker)) as sock:
        assert closed_by_broker(sock)


def test_a_frame_left_unfinished_is_closed_after_its_deadline(quick_broker: InProcessBroker) -> None:
    sock = handshake(data_port_of(quick_broker))
    with sock:
        sock.sendall(struct.pack(">IIB", 1000, 1, 1) + b"only a little")
        started = time.monotonic()
        assert closed_by_broker(sock)
        assert time.monotonic() - started >= 0.2


def test_an_idle_connection_is_closed_and_the_client_reconnects(quick_broker: InProcessBroker) -> None:
    with Producer(quick_broker.address, linger_ms=0) as producer:
        first = producer.send(TOPIC, b"one").result(DEADLINE_S).offset
        assert quick_broker.server is not None and quick_broker.server.data_port is not None
        data_port = quick_broker.server.data_port
        wait_until(lambda: not data_port.connections, DEADLINE_S, "the idle connection to be closed")
        assert producer.send(TOPIC, b"two").result(DEADLINE_S).offset == first + 1
    assert requests_served(quick_broker, "grpc", "Produce") == 0


def test_a_port_in_use_stops_the_start_naming_the_flag(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = InProcessBroker(tmp_path / "data", data_listen=f"127.0.0.1:{port}")
        with pytest.raises(Exception, match="--data-listen"):
            broker.start()
        broker.stop()


def test_the_default_data_port_is_the_client_port_plus_400(tmp_path: Path) -> None:
    for _ in range(20):
        port = free_port()
        if port + wire.DEFAULT_DATA_PORT_OFFSET < 65536:
            break
    broker = InProcessBroker(tmp_path / "data", data_listen="")
    broker.port, broker.address = port, f"127.0.0.1:{port}"
    broker.config.listen = broker.address
    broker.start()
    try:
        assert data_port_of(broker) == port + wire.DEFAULT_DATA_PORT_OFFSET
    finally:
        broker.stop()
