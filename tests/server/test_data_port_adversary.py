"""The data port under attack: hostile or broken clients against the broker, hostile or broken brokers against
the client (logbroker_client/data_channel.py). After each attack the broker must still serve a well-behaved
producer and consumer, and say in its log why it refused what it refused.

Seven weaknesses this file found were fixed (the in-flight cap, unbounded answer buffering, the frame deadline
running while the broker itself paused reading, unbounded partitions per Produce and ListOffsets, a client taking
a too-short answer, a client blocked writing past its timeout); their tests assert the fixed behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from logbroker_client import Admin, Consumer, Producer, TopicPartition
from logbroker_client import data_wire as wire
from logbroker_client import records as rec
from logbroker_client.data_channel import DataChannel
from logbroker_client.errors import (
    BrokerUnavailableError,
    LogbrokerError,
    RequestTimedOutError,
    TopicAlreadyExistsError,
)
from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.server import data_port as dpm
from tests.support.brokers import InProcessBroker, wait_until
from tests.support.sockets import data_port_hello, read_data_answer, read_exactly

OK = 0
STATUS = {code: code.value[0] for code in grpc.StatusCode}
DATA_LOG = "logbroker.data_port"


# ---------------------------------------------------------------------------------------------- fixtures


class Brokers:
    """Starts in-process brokers for one test (after the test's monkeypatching) and stops them after it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.running: list[InProcessBroker] = []

    def start(self, **settings: Any) -> InProcessBroker:
        broker = InProcessBroker(self.root / f"data{len(self.running)}", **settings).start()
        self.running.append(broker)
        return broker

    def stop(self, broker: InProcessBroker) -> None:
        self.running.remove(broker)
        broker.stop()


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[Brokers]:
    started = Brokers(tmp_path)
    try:
        yield started
    finally:
        for broker in list(started.running):
            started.stop(broker)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=DATA_LOG)
    caplog.set_level(logging.INFO, logger="logbroker_client")
    return caplog


def logged(caplog: pytest.LogCaptureFixture, text: str, logger: str = DATA_LOG) -> bool:
    return any(text in record.getMessage() for record in caplog.records if record.name.startswith(logger))


# ---------------------------------------------------------------------------------------------- raw wire


def dport(broker: InProcessBroker) -> dpm.DataPort:
    assert broker.server is not None and broker.server.data_port is not None
    return broker.server.data_port


def raw(broker: InProcessBroker, timeout_s: float = 5.0) -> socket.socket:
    port = dport(broker).port
    assert port is not None
    return socket.create_connection(("127.0.0.1", port), timeout=timeout_s)


def greet(sock: socket.socket, client_id: str = "adversary") -> int:
    return data_port_hello(sock, client_id)


def connect(broker: InProcessBroker, timeout_s: float = 5.0) -> socket.socket:
    sock = raw(broker, timeout_s)
    greet(sock)
    return sock


def frame(correlation_id: int, method: int, request: Any) -> bytes:
    body = request if isinstance(request, bytes) else request.SerializeToString()
    return wire.encode_frame(correlation_id, method, body)


answer = read_data_answer


def closed_by_peer(sock: socket.socket, timeout_s: float) -> bytes:
    """Read until the broker closes the connection (EOF or reset); what came before; fails after timeout_s."""
    deadline = time.monotonic() + timeout_s
    received = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return received
        except TimeoutError:
            raise AssertionError(f"the broker did not close the connection within {timeout_s}s") from None
        if not chunk:
            return received
        received += chunk


def rst_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def latest_offsets(topic: str, partition: int = 0, timestamp_ms: int = -1) -> pb.ListOffsetsRequest:
    return pb.ListOffsetsRequest(partitions=[pb.ListOffsetsPartition(topic=topic, partition=partition,
                                                                     timestamp_ms=timestamp_ms)])


def list_offset(sock: socket.socket, topic: str, timestamp_ms: int = -1, correlation_id: int = 77) -> int:
    sock.sendall(frame(correlation_id, wire.Method.LIST_OFFSETS, latest_offsets(topic, 0, timestamp_ms)))
    got_id, status, body = answer(sock)
    assert (got_id, status) == (correlation_id, OK), body
    result = pb.ListOffsetsResponse.FromString(body).results[0]
    assert result.error_code == pb.ErrorCode.NONE, result.error_message
    return int(result.offset)


def data_tasks(broker: InProcessBroker) -> int:
    """The data port's request tasks alive on the broker's loop (connections' sets and the loop's own view)."""
    async def count() -> int:
        return sum(1 for task in asyncio.all_tasks() if "DataConnection._serve" in repr(task.get_coro()))
    return int(broker.run(count()))  # type: ignore[call-overload]


def in_flight(broker: InProcessBroker) -> int:
    return int(broker.call(lambda: sum(len(c.tasks) for c in dport(broker).connections)))  # type: ignore[call-overload]


def create_topic(broker: InProcessBroker, name: str, partitions: int = 1, **configs: str) -> None:
    admin = Admin(broker.address)
    try:
        admin.create_topic(name, partitions=partitions, configs=configs or None)
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()


# ---------------------------------------------------------------------------------------------- well-behaved


def assert_serves(broker: InProcessBroker, topic: str = "after-attack", via_data_port: bool = True) -> int:
    """A well-behaved acks=all producer gets a record in, and a consumer reads it back; returns its offset."""
    create_topic(broker, topic)
    value = os.urandom(12).hex().encode()
    producer = Producer(broker.address, acks="all", linger_ms=0, request_timeout_ms=4000,
                        delivery_timeout_ms=8000, client_id="well-behaved")
    try:
        offset = producer.send(topic, value, partition=0).result(timeout=9).offset
        channels = producer._metadata._data_channels
        assert bool(channels) == via_data_port, f"expected data port use: {via_data_port}, channels: {channels}"
    finally:
        producer.close(5)
    consumer = Consumer(broker.address, fetch_max_wait_ms=100, request_timeout_ms=4000)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            for record in consumer.poll(timeout=0.5):
                if record.offset == offset:
                    assert record.value == value
                    return offset
        raise AssertionError(f"the consumer did not read back offset {offset} of {topic}")
    finally:
        consumer.close()


# ---------------------------------------------------------------------------------------------- handshake


def test_foreign_protocol_is_closed_and_named_in_the_log_without_flooding_it(
        brokers: Brokers, logs: pytest.LogCaptureFixture) -> None:
    broker = brokers.start()
    sock = raw(broker)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed_by_peer(sock, 3) == b"", "the broker answered an HTTP request"
    wait_until(lambda: logged(logs, "they look like HTTP"), 3, "the refusal in the log")
    for _ in range(50):  # a flood of garbage: every connection closed, the log a line a second
        sock = raw(broker)
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        closed_by_peer(sock, 3)
    lines = [r for r in logs.records if r.name == DATA_LOG and "closed a connection" in r.getMessage()]
    assert 1 <= len(lines) <= 4, f"{len(lines)} log lines for 51 garbage connections"
    assert not dport(broker).connections
    assert_serves(broker)
    other = brokers.start()  # a fresh limiter: the next refusal of the kind is logged
    sock = raw(other)
    sock.sendall(struct.pack(">8sH", wire.MAGIC, 300) + b"x" * 300)  # a client id longer than 255 bytes
    closed_by_peer(sock, 3)
    wait_until(lambda: logged(logs, "client id of 300 bytes"), 3, "the client-id refusal in the log")


def test_hello_dribbled_a_byte_at_a_time_is_cut_at_the_handshake_deadline(
        brokers: Brokers, logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "HANDSHAKE_TIMEOUT_S", 0.6)
    broker = brokers.start()
    sock = raw(broker)
    hello = struct.pack(">8sH", wire.MAGIC, 255) + b"s" * 255  # valid, but sent one byte per 50 ms
    started = time.monotonic()
    cut = False
    for byte in hello:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            cut = True
            break
        if select_readable(sock, 0.05):
            cut = True
            break
    assert cut, "the whole HELLO was dribbled in without being cut"
    closed_by_peer(sock, 2)
    assert time.monotonic() - started < 3
    wait_until(lambda: logged(logs, "no HELLO within"), 3, "the handshake refusal in the log")
    assert not dport(broker).connections
    assert_serves(broker)


def select_readable(sock: socket.socket, timeout_s: float) -> bool:
    readable, _, _ = select.select([sock], [], [], timeout_s)
    return bool(readable)


def test_request_frame_dribbled_a_byte_at_a_time_is_cut_at_the_frame_deadline(
        brokers: Brokers, logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "FRAME_DEADLINE_S", 0.8)
    monkeypatch.setattr(dpm, "IDLE_SWEEP_INTERVAL_S", 0.1)
    broker = brokers.start()
    sock = connect(broker)
    sock.sendall(wire.frame_head(1, wire.Method.PRODUCE, 1_000_000))  # declares a 1 MB body...
    started = time.monotonic()
    cut = False
    while time.monotonic() - started < 4:  # ...and sends it a byte every 20 ms: never idle, never whole
        try:
            sock.sendall(b"\x00")
        except OSError:
            cut = True
            break
        if select_readable(sock, 0.02):
            cut = True
            break
    assert cut, "a frame dribbled for 4 s was never cut"
    assert closed_by_peer(sock, 2) == b"", "an unfinished frame got an answer"
    assert 0.7 < time.monotonic() - started < 3
    wait_until(lambda: logged(logs, "left unfinished"), 3, "the frame-deadline refusal in the log")
    assert_serves(broker)


# ---------------------------------------------------------------------------------------------- framing


@pytest.mark.parametrize("declared", [2**32 - 1, "max+1"])
def test_oversized_declared_length_is_answered_resource_exhausted_then_closed(
        brokers: Brokers, logs: pytest.LogCaptureFixture, declared: int | str) -> None:
    broker = brokers.start(max_request_bytes=100_000)
    sock = raw(broker)
    max_frame = greet(sock)
    assert max_frame == dport(broker).max_frame_bytes
    length = max_frame + 1 if declared == "max+1" else int(declared)
    sock.sendall(struct.pack(">IIB", length, 4242, wire.Method.PRODUCE) + b"\x00" * 1000)
    rest = closed_by_peer(sock, 3)
    got_length, correlation_id, status = wire.FRAME_HEAD.unpack_from(rest)
    assert (correlation_id, status) == (4242, STATUS[grpc.StatusCode.RESOURCE_EXHAUSTED])
    assert b"larger than max" in rest[wire.FRAME_HEAD.size:4 + got_length]
    wait_until(lambda: logged(logs, f"a {length}-byte request frame"), 3, "the refusal in the log")
    assert_serves(broker)


def test_frame_shorter_than_its_own_head_closes_the_connection(
        brokers: Brokers, logs: pytest.LogCaptureFixture) -> None:
    broker = brokers.start()
    sock = connect(broker)
    sock.sendall(struct.pack(">IIB", 3, 9, 1))
    assert closed_by_peer(sock, 3) == b""
    wait_until(lambda: logged(logs, "a frame of length 3"), 3, "the refusal in the log")
    assert_serves(broker)


def test_unknown_methods_and_unparsable_bodies_are_answered_and_the_connection_lives_on(brokers: Brokers) -> None:
    broker = brokers.start()
    create_topic(broker, "t")
    sock = connect(broker)
    sock.sendall(frame(1, 0, b"") + frame(2, 4, b"abc") + frame(3, 255, b"\xff" * 100)
                 + frame(4, wire.Method.PRODUCE, b"\xff\xff\xff\xff") + frame(5, wire.Method.FETCH, b"\x0a\xff")
                 + frame(6, wire.Method.LIST_OFFSETS, b"\x08"))
    answers = {}
    for _ in range(6):
        correlation_id, status, body = answer(sock)
        answers[correlation_id] = (status, body)
    unimplemented, invalid = STATUS[grpc.StatusCode.UNIMPLEMENTED], STATUS[grpc.StatusCode.INVALID_ARGUMENT]
    assert [answers[i][0] for i in (1, 2, 3)] == [unimplemented] * 3
    assert [answers[i][0] for i in (4, 5, 6)] == [invalid] * 3
    assert b"does not parse" in answers[4][1]
    assert list_offset(sock, "t") >= 0  # the same connection still serves
    assert_serves(broker)


def test_edge_and_duplicate_correlation_ids_are_each_answered_with_their_own_id(brokers: Brokers) -> None:
    broker = brokers.start()
    create_topic(broker, "t")
    sock = connect(broker)
    ids = [0, wire.MAX_CORRELATION_ID, 7, 7, 7]
    sock.sendall(b"".join(frame(i, wire.Method.LIST_OFFSETS, latest_offsets("t")) for i in ids))
    got = sorted(answer(sock)[:2] for _ in ids)
    assert got == sorted((i, OK) for i in ids)
    assert_serves(broker)


def test_thousands_of_pipelined_requests_are_each_answered_exactly_once(brokers: Brokers) -> None:
    broker = brokers.start()
    create_topic(broker, "t")
    sock = connect(broker, timeout_s=10)
    count = 5000
    request = latest_offsets("t")
    sender = threading.Thread(target=lambda: sock.sendall(b"".join(
        frame(i, wire.Method.LIST_OFFSETS, request) for i in range(1, count + 1))))
    sender.start()
    seen: dict[int, int] = {}
    for _ in range(count):
        correlation_id, status, _ = answer(sock)
        assert status == OK
        seen[correlation_id] = seen.get(correlation_id, 0) + 1
    sender.join(5)
    assert seen == dict.fromkeys(range(1, count + 1), 1)
    assert_serves(broker)


# ---------------------------------------------------------------------------------------------- bad requests


def test_random_bodies_for_every_method_are_each_answered_and_the_connection_lives_on(brokers: Brokers) -> None:
    broker = brokers.start(max_fetch_wait_ms=100)
    create_topic(broker, "t")
    sock = connect(broker, timeout_s=10)
    rnd = random.Random(20240607)
    bodies = [b"\x0b" * 100_000, b"\x0a\x80\x80\x80\x80\x10", b"\xff" * 11]  # deep groups, bad varints
    bodies += [rnd.randbytes(rnd.randrange(1, 64)) for _ in range(300)]
    frames = [frame(i, method, body) for i, (method, body) in enumerate(
        ((m, b) for b in bodies for m in wire.Method), start=1)]
    sock.sendall(b"".join(frames))
    statuses = {}
    for _ in frames:
        correlation_id, status, _ = answer(sock)
        statuses[correlation_id] = status
    assert sorted(statuses) == list(range(1, len(frames) + 1))
    assert set(statuses.values()) <= {OK, STATUS[grpc.StatusCode.INVALID_ARGUMENT]}
    assert list_offset(sock, "t") >= 0
    assert_serves(broker)



def test_bad_produce_requests_are_refused_per_partition_and_write_nothing(brokers: Brokers) -> None:
    broker = brokers.start()
    create_topic(broker, "t", **{"max.message.bytes": "10000"})
    sock = connect(broker)
    before = list_offset(sock, "t")
    good = rec.build_batch([(1000, None, b"v", [])])
    bad_crc = bytearray(good)
    bad_crc[-1] ^= 0xFF
    too_big = rec.build_batch([(1000, None, b"x" * 50_000, [])])
    parts = [
        pb.PartitionRecords(topic="t", partition=0, records=bytes(bad_crc)),
        pb.PartitionRecords(topic="nope", partition=0, records=good),
        pb.PartitionRecords(topic="t", partition=99, records=good),
        pb.PartitionRecords(topic="t", partition=0, records=too_big),
        pb.PartitionRecords(topic="t", partition=0, records=good[:30]),  # truncated
        pb.PartitionRecords(topic="t", partition=0, records=b""),
    ]
    # One request naming t-0 several times is refused as a whole (a partition may be named once per Produce).
    sock.sendall(frame(1, wire.Method.PRODUCE, pb.ProduceRequest(acks=-1, timeout_ms=3000, partitions=parts)))
    correlation_id, status, body = answer(sock)
    assert (correlation_id, status) == (1, STATUS[grpc.StatusCode.INVALID_ARGUMENT])
    assert b"named more than once" in body
    codes = []
    for number, part in enumerate(parts, start=10):  # each on its own: refused per partition
        sock.sendall(frame(number, wire.Method.PRODUCE, pb.ProduceRequest(acks=-1, timeout_ms=3000, partitions=[part])))
        correlation_id, status, body = answer(sock)
        assert (correlation_id, status) == (number, OK)
        codes += [r.error_code for r in pb.ProduceResponse.FromString(body).results]
    assert codes[:4] == [pb.ErrorCode.CORRUPT_BATCH, pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                         pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, pb.ErrorCode.RECORD_TOO_LARGE]
    assert all(code != pb.ErrorCode.NONE for code in codes[4:]), codes
    for acks in (2, -2, 1 << 30):  # acks the broker does not know: the call as a whole is refused
        sock.sendall(frame(2, wire.Method.PRODUCE, pb.ProduceRequest(acks=acks, partitions=[
            pb.PartitionRecords(topic="t", partition=0, records=good)])))
        assert answer(sock)[:2] == (2, STATUS[grpc.StatusCode.INVALID_ARGUMENT])
    assert list_offset(sock, "t") == before, "a refused produce wrote something"
    assert_serves(broker)


def test_absurd_fetch_limits_are_capped_or_refused(brokers: Brokers) -> None:
    broker = brokers.start(max_fetch_wait_ms=400, max_fetch_bytes=64 * 1024, max_partition_fetch_bytes=64 * 1024)
    create_topic(broker, "t")
    sock = connect(broker)
    producer_sock = connect(broker)
    start = list_offset(producer_sock, "t")
    for _ in range(4):  # 4 x 40 KB in the log, more than max_fetch_bytes
        producer_sock.sendall(frame(1, wire.Method.PRODUCE, pb.ProduceRequest(acks=1, partitions=[
            pb.PartitionRecords(topic="t", partition=0, records=rec.build_batch([(1, None, b"y" * 40_000, [])]))])))
        assert answer(producer_sock)[1] == OK
    # A wait of 24 days, for more bytes than the log will ever hold: the broker's max_fetch_wait_ms caps it.
    started = time.monotonic()
    sock.sendall(frame(1, wire.Method.FETCH, pb.FetchRequest(max_wait_ms=2**31 - 1, min_bytes=2**31 - 1,
                                                             max_bytes=2**31 - 1, partitions=[
        pb.FetchPartition(topic="t", partition=0, fetch_offset=start, partition_max_bytes=2**31 - 1)])))
    correlation_id, status, body = answer(sock)
    assert (correlation_id, status) == (1, OK)
    assert time.monotonic() - started < 3
    result = pb.FetchResponse.FromString(body).results[0]
    assert result.error_code == pb.ErrorCode.NONE
    assert 0 < len(result.records) <= 64 * 1024 + 41_000  # capped (the first batch always comes whole)
    # Negative waits and offsets, too many partitions, a partition named twice.
    sock.sendall(frame(2, wire.Method.FETCH, pb.FetchRequest(max_wait_ms=-5, min_bytes=-5, max_bytes=-5, partitions=[
        pb.FetchPartition(topic="t", partition=0, fetch_offset=-(2**62), partition_max_bytes=-1)])))
    correlation_id, status, body = answer(sock)
    assert (correlation_id, status) == (2, OK)
    assert pb.FetchResponse.FromString(body).results[0].error_code == pb.ErrorCode.OFFSET_OUT_OF_RANGE
    many = pb.FetchRequest(partitions=[pb.FetchPartition(topic="t", partition=i) for i in range(10_001)])
    twice = pb.FetchRequest(partitions=[pb.FetchPartition(topic="t", partition=0)] * 2)
    sock.sendall(frame(3, wire.Method.FETCH, many) + frame(4, wire.Method.FETCH, twice))
    answers = {answer(sock)[:2] for _ in range(2)}
    assert answers == {(3, STATUS[grpc.StatusCode.INVALID_ARGUMENT]), (4, STATUS[grpc.StatusCode.INVALID_ARGUMENT])}
    assert_serves(broker)


def _loop_stall_during(broker: InProcessBroker, action: Callable[[], None]) -> float:
    """The longest the broker's event loop took to run a no-op while action() ran."""
    worst = [0.0]
    done = threading.Event()

    def ping() -> None:
        while not done.is_set():
            began = time.monotonic()
            broker.run(asyncio.sleep(0))
            worst[0] = max(worst[0], time.monotonic() - began)
            time.sleep(0.005)

    pinger = threading.Thread(target=ping, daemon=True)
    pinger.start()
    try:
        action()
    finally:
        done.set()
        pinger.join(35)
    return worst[0]


def test_one_produce_naming_a_hundred_thousand_partitions_does_not_stall_the_broker(brokers: Brokers) -> None:
    broker = brokers.start()
    create_topic(broker, "t")
    sock = connect(broker, timeout_s=30)
    request = pb.ProduceRequest(acks=1, partitions=[pb.PartitionRecords(topic="u", partition=i)
                                                    for i in range(150_000)])

    def attack() -> None:
        sock.sendall(frame(1, wire.Method.PRODUCE, request))
        correlation_id, _, _ = answer(sock)
        assert correlation_id == 1
    stall = _loop_stall_during(broker, attack)
    assert stall < 0.5, f"one Produce blocked the broker's event loop for {stall:.2f} s"


def test_one_list_offsets_naming_300k_partitions_does_not_stall_the_broker(brokers: Brokers) -> None:
    broker = brokers.start()
    create_topic(broker, "t")
    sock = connect(broker, timeout_s=30)
    request = pb.ListOffsetsRequest(partitions=[pb.ListOffsetsPartition(topic="t", partition=0, timestamp_ms=-1)]
                                    * 300_000)

    def attack() -> None:
        sock.sendall(frame(1, wire.Method.LIST_OFFSETS, request))
        assert answer(sock)[0] == 1
    stall = _loop_stall_during(broker, attack)
    assert stall < 0.5, f"one ListOffsets blocked the broker's event loop for {stall:.2f} s"


# ---------------------------------------------------------------------------------------------- in flight


def _slow_fetch(wait_ms: int) -> pb.FetchRequest:
    """A fetch of no partition that wants a byte: it waits its whole max_wait_ms on the broker."""
    return pb.FetchRequest(max_wait_ms=wait_ms, min_bytes=1)


def test_requests_in_flight_per_connection_are_capped(brokers: Brokers) -> None:
    broker = brokers.start(max_fetch_wait_ms=700)
    sock = connect(broker, timeout_s=10)
    count = 600
    sock.sendall(b"".join(frame(i, wire.Method.FETCH, _slow_fetch(700)) for i in range(1, count + 1)))
    peak = 0
    received: set[int] = set()
    sock.settimeout(10)
    deadline = time.monotonic() + 9
    while len(received) < count and time.monotonic() < deadline:
        peak = max(peak, in_flight(broker))
        if select_readable(sock, 0.01):
            correlation_id, status, _ = answer(sock)
            assert status == OK
            received.add(correlation_id)
    assert peak <= wire.MAX_IN_FLIGHT_PER_CONNECTION, f"{peak} requests in flight on one connection"
    assert received == set(range(1, count + 1))


def test_a_client_that_never_reads_cannot_make_the_broker_buffer_without_bound(brokers: Brokers) -> None:
    broker = brokers.start()
    create_topic(broker, "t")
    sock = connect(broker, timeout_s=10)
    start = list_offset(sock, "t")
    sock.sendall(frame(1, wire.Method.PRODUCE, pb.ProduceRequest(acks=1, partitions=[
        pb.PartitionRecords(topic="t", partition=0, records=rec.build_batch([(1, None, b"z" * 32_000, [])]))])))
    assert answer(sock)[1] == OK
    fetch = pb.FetchRequest(max_wait_ms=0, partitions=[pb.FetchPartition(topic="t", partition=0, fetch_offset=start,
                                                                         partition_max_bytes=64 * 1024)])
    sock.sendall(frame(2, wire.Method.FETCH, fetch))
    answer_bytes = len(answer(sock)[2]) + wire.FRAME_HEAD.size
    assert answer_bytes > 32_000
    count = 1000
    sock.sendall(b"".join(frame(i, wire.Method.FETCH, fetch) for i in range(10, 10 + count)))  # and never read
    connection = next(iter(dport(broker).connections))
    # The broker stops reading, and either has answered all it read or holds the rest until the answers drain.
    wait_until(lambda: broker.call(lambda: connection._reading_paused and (
        not connection.tasks or connection._writing_paused)), 8, "the broker to stop reading and serving")
    buffered = int(broker.call(lambda: connection.transport.get_write_buffer_size()))  # type: ignore[union-attr]
    bound = wire.MAX_IN_FLIGHT_PER_CONNECTION * answer_bytes
    rst_close(sock)
    assert buffered <= bound, f"{buffered} unread answer bytes buffered for one connection (bound {bound})"


def test_frame_deadline_does_not_run_while_the_broker_itself_stopped_reading(
        brokers: Brokers, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "FRAME_DEADLINE_S", 0.8)
    monkeypatch.setattr(dpm, "IDLE_SWEEP_INTERVAL_S", 0.1)
    broker = brokers.start(max_fetch_wait_ms=2000)
    create_topic(broker, "t")
    sock = connect(broker, timeout_s=8)
    fill = wire.MAX_IN_FLIGHT_PER_CONNECTION
    tail = frame(999, wire.Method.LIST_OFFSETS, latest_offsets("t"))
    sock.sendall(b"".join(frame(i, wire.Method.FETCH, _slow_fetch(2000)) for i in range(1, fill + 1)) + tail[:5])
    connection = next(iter(dport(broker).connections))
    wait_until(lambda: broker.call(lambda: connection._reading_paused), 3, "the broker to pause reading")
    sock.sendall(tail[5:])  # the client finished its frame at once: the broker is not reading it
    received = set()
    try:
        while len(received) < fill + 1:
            correlation_id, status, _ = answer(sock)
            assert status == OK
            received.add(correlation_id)
    except (ConnectionError, TimeoutError) as exc:
        raise AssertionError(f"the broker dropped a well-formed client after {len(received)} answers: {exc}") from None
    assert received == set(range(1, fill + 1)) | {999}


# ---------------------------------------------------------------------------------------------- going away


def test_clients_vanishing_mid_request_leak_no_tasks_and_leave_the_log_whole(brokers: Brokers) -> None:
    broker = brokers.start(max_fetch_wait_ms=2000)
    create_topic(broker, "t")
    probe = connect(broker)
    start = list_offset(probe, "t")
    sent = set()
    for i in range(40):  # acks=all produces, and long-poll fetches, each connection reset right after sending
        sock = connect(broker)
        value = f"vanishing-{i}".encode()
        sent.add(value)
        sock.sendall(frame(1, wire.Method.PRODUCE, pb.ProduceRequest(acks=-1, timeout_ms=5000, partitions=[
            pb.PartitionRecords(topic="t", partition=0, records=rec.build_batch([(1, None, value, [])]))]))
            + frame(2, wire.Method.FETCH, _slow_fetch(2000)))
        if i % 2:
            wait_until(lambda: in_flight(broker) > 0, 3, "the long poll to start")
        rst_close(sock)
    wait_until(lambda: len(dport(broker).connections) == 1 and data_tasks(broker) == 0, 5,
               "every vanished client's connection and task to be gone")
    end = list_offset(probe, "t")
    probe.sendall(frame(5, wire.Method.FETCH, pb.FetchRequest(partitions=[
        pb.FetchPartition(topic="t", partition=0, fetch_offset=start, partition_max_bytes=1 << 20)])))
    correlation_id, status, body = answer(probe)
    assert (correlation_id, status) == (5, OK)
    records = pb.FetchResponse.FromString(body).results[0].records
    next_offset, values = start, []
    for header, batch in rec.iter_batches(records):  # contiguous, whole, each record at most once
        assert header.base_offset == next_offset
        next_offset = header.last_offset + 1
        values.extend(r.value for r in batch)
    assert next_offset == end
    assert len(values) == len(set(values)) and set(values) <= sent
    assert assert_serves(broker, "t") == end


def test_half_closed_client_gets_the_answers_in_flight_at_its_eof_and_leaks_nothing(brokers: Brokers) -> None:
    broker = brokers.start(max_fetch_wait_ms=20_000)
    create_topic(broker, "t")
    sock = connect(broker)
    sock.sendall(frame(1, wire.Method.LIST_OFFSETS, latest_offsets("t")))
    assert answer(sock)[:2] == (1, OK)
    sock.sendall(frame(2, wire.Method.FETCH, _slow_fetch(20_000)))
    wait_until(lambda: in_flight(broker) == 1, 3, "the long poll to start")
    sock.sendall(frame(3, wire.Method.PRODUCE, pb.ProduceRequest(acks=-1, timeout_ms=3000, partitions=[
        pb.PartitionRecords(topic="t", partition=0, records=rec.build_batch([(1, None, b"landed", [])]))])))
    sock.shutdown(socket.SHUT_WR)
    # The broker answers what is in flight when the client's EOF arrives, then closes: the produce with its
    # result, the long poll at once with CANCELLED (not held 20 s for a client that may have closed for good).
    answers = {correlation_id: (status, body) for correlation_id, status, body in (answer(sock), answer(sock))}
    assert answers[3][0] == OK
    assert [r.error_code for r in pb.ProduceResponse.FromString(answers[3][1]).results] == [pb.ErrorCode.NONE]
    assert answers[2][0] == STATUS[grpc.StatusCode.CANCELLED] and b"not held open" in answers[2][1]
    closed_by_peer(sock, 2)
    wait_until(lambda: not dport(broker).connections and data_tasks(broker) == 0, 3, "the connection to go")
    assert_serves(broker)


def test_connection_limit_refuses_the_extra_ones_and_clients_fall_back_to_grpc(
        brokers: Brokers, logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dpm, "MAX_CONNECTIONS", 8)
    broker = brokers.start()
    held = [raw(broker) for _ in range(8)]  # silent: no HELLO, yet each holds a slot until the handshake deadline
    wait_until(lambda: len(dport(broker).connections) == 8, 3, "8 connections")
    extra = raw(broker)
    extra.sendall(wire.encode_hello("one-too-many"))
    assert closed_by_peer(extra, 3) == b""
    wait_until(lambda: logged(logs, "connections already open"), 3, "the refusal in the log")
    assert_serves(broker, via_data_port=False)  # the producer and consumer use gRPC instead
    assert logged(logs, "using its gRPC port instead", logger="logbroker_client")
    rst_close(held.pop())
    wait_until(lambda: len(dport(broker).connections) == 7, 3, "a slot to free up")
    greet(raw(broker))  # a new connection gets in
    for sock in held:
        sock.close()


def test_one_host_cannot_take_every_connection(
        brokers: Brokers, logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dpm, "MAX_CONNECTIONS_PER_HOST", 4)
    broker = brokers.start()
    port = dport(broker).port
    assert port is not None
    held = [raw(broker) for _ in range(4)]  # from 127.0.0.1
    wait_until(lambda: dport(broker).connections_per_host.get("127.0.0.1") == 4, 3, "4 connections from one host")
    extra = raw(broker)
    assert closed_by_peer(extra, 3) == b""
    wait_until(lambda: logged(logs, "connections from host 127.0.0.1 already open"), 3, "the refusal in the log")
    other_host = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
    greet(other_host)  # another host still gets in
    assert dport(broker).connections_per_host == {"127.0.0.1": 4, "127.0.0.2": 1}
    rst_close(held.pop())
    wait_until(lambda: dport(broker).connections_per_host.get("127.0.0.1") == 3, 3, "a slot to free up")
    admitted = raw(broker)
    greet(admitted)
    for sock in [*held, other_host]:
        sock.close()
    wait_until(lambda: dport(broker).connections_per_host == {"127.0.0.1": 1}, 3, "closed ones to be uncounted")
    admitted.close()


def test_idle_sweeper_closes_idle_connections_spares_busy_ones_and_clients_reconnect(
        brokers: Brokers, logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "IDLE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(dpm, "IDLE_SWEEP_INTERVAL_S", 0.1)
    broker = brokers.start(max_fetch_wait_ms=1500)
    create_topic(broker, "t")
    idle, busy = connect(broker), connect(broker)
    started = time.monotonic()
    busy.sendall(frame(1, wire.Method.FETCH, _slow_fetch(1500)))
    assert closed_by_peer(idle, 3) == b""
    assert time.monotonic() - started < 1.4
    assert answer(busy)[:2] == (1, OK), "a connection with a request in flight was swept"
    wait_until(lambda: logged(logs, "idle for"), 3, "the idle close in the log")
    assert closed_by_peer(busy, 3) == b""  # idle once answered
    producer = Producer(broker.address, acks="all", linger_ms=0, request_timeout_ms=3000)
    try:
        producer.send("t", b"first", partition=0).result(5)
        first = producer._metadata._data_channels[broker.address]
        wait_until(lambda: first.closed, 3, "the sweeper to close the producer's idle connection")
        producer.send("t", b"second", partition=0).result(5)
        second = producer._metadata._data_channels[broker.address]
        assert second is not first and not second.closed, "the producer did not reconnect to the data port"
    finally:
        producer.close(5)


def test_stop_answers_the_requests_in_flight_then_closes(brokers: Brokers) -> None:
    broker = brokers.start(max_fetch_wait_ms=5000, shutdown_grace_ms=4000)
    sock = connect(broker, timeout_s=8)
    sock.sendall(frame(1, wire.Method.FETCH, _slow_fetch(1500)))
    wait_until(lambda: in_flight(broker) == 1, 3, "the long poll to start")
    stopping = threading.Thread(target=brokers.stop, args=(broker,))
    started = time.monotonic()
    stopping.start()
    try:
        assert answer(sock)[:2] == (1, OK), "the request in flight at the stop was not answered"
        assert closed_by_peer(sock, 5) == b""
    finally:
        stopping.join(20)
    assert not stopping.is_alive() and time.monotonic() - started < 8
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", dport_port_of(broker)), timeout=1)


def dport_port_of(broker: InProcessBroker) -> int:
    host, port = broker.config.data_listen_address() or ("", 0)
    return port


def test_producer_with_acks_0_on_the_data_port_finishes_promptly(brokers: Brokers) -> None:
    broker = brokers.start()
    create_topic(broker, "t")
    probe = connect(broker)
    start = list_offset(probe, "t")
    producer = Producer(broker.address, acks=0, linger_ms=0, request_timeout_ms=20_000)
    try:
        futures = [producer.send("t", f"a0-{i}".encode(), partition=0) for i in range(50)]
        began = time.monotonic()
        producer.flush(timeout=5)
        assert time.monotonic() - began < 3, "acks=0 flush waited on something"
        assert all(f.done() for f in futures)
        assert producer._metadata._data_channels, "acks=0 did not use the data port"
    finally:
        producer.close(5)
    wait_until(lambda: list_offset(probe, "t") >= start + 50, 5, "the acks=0 records to land")


def test_producer_request_larger_than_the_brokers_frame_fails_clearly(brokers: Brokers) -> None:
    broker = brokers.start(max_request_bytes=100_000)
    create_topic(broker, "t", **{"max.message.bytes": "10000000"})
    producer = Producer(broker.address, acks="all", linger_ms=0, max_request_bytes=4 << 20, batch_size=4 << 20,
                        request_timeout_ms=3000, delivery_timeout_ms=6000)
    try:
        future = producer.send("t", b"q" * 1_000_000, partition=0)
        with pytest.raises(LogbrokerError, match="max_request_bytes"):
            future.result(8)
    finally:
        producer.close(5)
    assert_serves(broker)


# ---------------------------------------------------------------------------------------------- client side


class FakeBroker:
    """A listener on 127.0.0.1 that runs serve(conn) for each connection in a thread of its own."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.address: tuple[str, int] = self.listener.getsockname()
        self.conns: list[socket.socket] = []
        self._serve = serve
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()

    def _serve_one(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self._serve(conn)

    def close(self) -> None:
        for sock in [self.listener, *self.conns]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def fakes() -> Iterator[list[FakeBroker]]:
    started: list[FakeBroker] = []
    yield started
    for fake in started:
        fake.close()


def fake(fakes: list[FakeBroker], serve: Callable[[socket.socket], None]) -> FakeBroker:
    server = FakeBroker(serve)
    fakes.append(server)
    return server


def welcome(conn: socket.socket, max_frame_bytes: int = 1 << 20) -> None:
    read_exactly(conn, wire.hello_length(read_exactly(conn, wire.HELLO_HEAD_BYTES)))
    conn.sendall(wire.encode_welcome(max_frame_bytes))


def read_request(conn: socket.socket) -> tuple[int, int, bytes]:
    return answer(conn)  # the same layout: length, correlation id, method, body


def channel_to(server: FakeBroker, connect_timeout_s: float = 2.0) -> DataChannel:
    return DataChannel("fake:1", server.address, "victim", connect_timeout_s)


LIST_ANSWER = pb.ListOffsetsResponse(results=[pb.ListOffsetsResult(topic="t", offset=42)])


def ask(channel: DataChannel, timeout_s: float = 2.0) -> Any:
    return channel.future(wire.Method.LIST_OFFSETS, latest_offsets("t"), pb.ListOffsetsResponse, timeout_s)


def test_client_refuses_a_port_that_answers_garbage_or_nothing(fakes: list[FakeBroker]) -> None:
    def http(conn: socket.socket) -> None:
        read_exactly(conn, 10)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        time.sleep(2)

    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match="look like HTTP"):
        channel_to(fake(fakes, http))
    silent_welcome = threading.Event()
    with pytest.raises(BrokerUnavailableError, match="did not answer as one"):
        channel_to(fake(fakes, lambda conn: silent_welcome.wait(5)), connect_timeout_s=0.5)
    silent_welcome.set()
    assert time.monotonic() - started < 2.5


def test_client_ignores_answers_to_unknown_or_finished_ids_and_strange_statuses(fakes: list[FakeBroker]) -> None:
    def serve(conn: socket.socket) -> None:
        welcome(conn)
        correlation_id, _, _ = read_request(conn)
        conn.sendall(wire.encode_frame(correlation_id + 1000, OK, b"\xff garbage")
                     + wire.encode_frame(0, OK, b"")
                     + wire.encode_frame(wire.MAX_CORRELATION_ID, 3, b"nope")
                     + wire.encode_frame(correlation_id, OK, LIST_ANSWER.SerializeToString())
                     + wire.encode_frame(correlation_id, 13, b"a duplicate, dropped"))
        correlation_id, _, _ = read_request(conn)
        conn.sendall(wire.encode_frame(correlation_id, 200, b"a status gRPC does not have"))
        correlation_id, _, _ = read_request(conn)
        conn.sendall(wire.encode_frame(correlation_id, OK, b"\xff\xff not a protobuf"))
        time.sleep(5)

    channel = channel_to(fake(fakes, serve))
    try:
        assert ask(channel).result(3).results[0].offset == 42
        with pytest.raises(LogbrokerError, match="a status gRPC does not have"):
            ask(channel).result(3)
        with pytest.raises(LogbrokerError, match="does not parse"):
            ask(channel).result(3)
        assert not channel.closed
    finally:
        channel.close()


def test_client_times_out_a_broker_that_never_answers_and_drops_the_late_answer(fakes: list[FakeBroker]) -> None:
    late = threading.Event()

    def serve(conn: socket.socket) -> None:
        welcome(conn)
        first, _, _ = read_request(conn)
        late.wait(5)
        conn.sendall(wire.encode_frame(first, OK, LIST_ANSWER.SerializeToString()))
        second, _, _ = read_request(conn)
        conn.sendall(wire.encode_frame(second, OK, LIST_ANSWER.SerializeToString()))
        time.sleep(5)

    channel = channel_to(fake(fakes, serve))
    try:
        started = time.monotonic()
        with pytest.raises(RequestTimedOutError):
            ask(channel, timeout_s=0.3).result(3)
        assert time.monotonic() - started < 1.5
        late.set()
        assert ask(channel).result(3).results[0].offset == 42  # the late answer did not land on this one
    finally:
        channel.close()


def test_client_fails_what_is_in_flight_when_the_broker_closes_mid_answer(fakes: list[FakeBroker]) -> None:
    def serve(conn: socket.socket) -> None:
        welcome(conn)
        correlation_id, _, _ = read_request(conn)
        read_request(conn)
        whole = wire.encode_frame(correlation_id, OK, LIST_ANSWER.SerializeToString())
        conn.sendall(whole[:len(whole) - 3])
        conn.close()

    channel = channel_to(fake(fakes, serve))
    first, second = ask(channel, 5), ask(channel, 5)
    started = time.monotonic()
    for future in (first, second):
        with pytest.raises(BrokerUnavailableError):
            future.result(3)
    assert time.monotonic() - started < 1.5
    assert channel.closed
    with pytest.raises(BrokerUnavailableError):  # and a request on the closed channel fails at once
        ask(channel).result(1)


def test_client_treats_an_answer_shorter_than_its_head_as_a_broken_connection(fakes: list[FakeBroker]) -> None:
    def serve(conn: socket.socket) -> None:
        welcome(conn)
        correlation_id, _, _ = read_request(conn)
        conn.sendall(struct.pack(">IIB", 0, correlation_id, OK))
        time.sleep(5)

    channel = channel_to(fake(fakes, serve))
    try:
        with pytest.raises(LogbrokerError):
            result = ask(channel).result(3)
            raise AssertionError(f"a 0-length answer was taken as a successful, empty {type(result).__name__}")
        wait_until(lambda: channel.closed, 2, "the client to drop the desynchronised connection")
    finally:
        channel.close()


def test_client_request_timeout_fires_even_when_the_broker_stops_reading(fakes: list[FakeBroker]) -> None:
    release = threading.Event()

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        welcome(conn, max_frame_bytes=64 << 20)
        release.wait(10)  # reads nothing more

    channel = channel_to(fake(fakes, serve))
    request = pb.ProduceRequest(acks=-1, partitions=[pb.PartitionRecords(topic="t", records=b"x" * (16 << 20))])
    outcome: dict[str, Any] = {}

    def call() -> None:
        future = channel.future(wire.Method.PRODUCE, request, pb.ProduceResponse, 0.5)
        outcome["returned_after_s"] = time.monotonic() - began
        try:
            future.result(5)
        except LogbrokerError as exc:
            outcome["error"] = exc

    began = time.monotonic()
    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(3)
    hung = caller.is_alive()
    release.set()
    channel.close()
    caller.join(5)
    assert not hung, "call() was still blocked writing 3 s after its 0.5 s timeout"
    assert isinstance(outcome.get("error"), LogbrokerError)


def test_client_falls_back_to_grpc_when_the_data_port_is_gone(brokers: Brokers, logs: pytest.LogCaptureFixture,
                                                              ) -> None:
    broker = brokers.start()
    assert_serves(broker)
    broker.run(dport(broker).stop(0.5))  # the port closes; Metadata still names it
    assert_serves(broker, "after-port-gone", via_data_port=False)
    assert logged(logs, "using its gRPC port instead", logger="logbroker_client")


def test_client_correlation_ids_wrap_past_2_32_against_a_real_broker(brokers: Brokers) -> None:
    broker = brokers.start()
    create_topic(broker, "t")
    channel = DataChannel(broker.address, ("127.0.0.1", dport(broker).port or 0), "wrapper")
    try:
        channel._next_id = wire.MAX_CORRELATION_ID - 1
        futures = [ask(channel, 3) for _ in range(3)]
        assert [f.correlation_id for f in futures] == [wire.MAX_CORRELATION_ID, 1, 2]  # 0 is never used
        assert {f.result(3).results[0].error_code for f in futures} == {pb.ErrorCode.NONE}
    finally:
        channel.close()
