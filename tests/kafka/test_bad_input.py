"""Bad input on the Kafka port: each case closes (at most) its own connection; the broker keeps serving."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from kio.index import load_request_schema
from kio.schema.errors import ErrorCode

from tests.kafka.wire import WireClient, encode_request
from tests.support.brokers import InProcessBroker, wait_until

API_VERSIONS = load_request_schema(18, 3)(client_software_name="t", client_software_version="1")


def still_serving(broker: InProcessBroker) -> None:
    with WireClient(broker.kafka_address, timeout_s=5) as client:  # type: ignore[attr-defined]
        assert client.call(API_VERSIONS).error_code == ErrorCode.none


def closed_soon(client: WireClient, timeout_s: float = 5.0) -> bool:
    client.sock.settimeout(timeout_s)
    try:
        while True:
            data = client.sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_2_gb_frame_size_is_refused_without_reading_it(kafka_broker: InProcessBroker) -> None:
    with WireClient(kafka_broker.kafka_address) as client:  # type: ignore[attr-defined]
        started = time.monotonic()
        client.send_bytes(struct.pack(">i", 0x7FFFFFFF) + b"\x00\x12\x00\x03")
        assert closed_soon(client) and time.monotonic() - started < 2
    still_serving(kafka_broker)


@pytest.mark.parametrize("size", [-1, 0, 3])
def test_negative_and_tiny_frame_sizes_are_refused(kafka_broker: InProcessBroker, size: int) -> None:
    with WireClient(kafka_broker.kafka_address) as client:  # type: ignore[attr-defined]
        client.send_bytes(struct.pack(">i", size) + b"\x00" * 8)
        assert closed_soon(client)
    still_serving(kafka_broker)


def test_an_unknown_api_key_closes_only_that_connection(kafka_broker: InProcessBroker) -> None:
    with WireClient(kafka_broker.kafka_address) as client:  # type: ignore[attr-defined]
        frame = struct.pack(">hhih", 9999, 0, 1, -1)
        client.send_bytes(struct.pack(">i", len(frame)) + frame)
        assert closed_soon(client)
    still_serving(kafka_broker)


def test_garbage_bytes_are_refused(kafka_broker: InProcessBroker) -> None:
    rng = __import__("random").Random(7)
    for _ in range(20):
        with WireClient(kafka_broker.kafka_address) as client:  # type: ignore[attr-defined]
            client.send_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))))
            client.sock.shutdown(socket.SHUT_WR)
            assert closed_soon(client)
    still_serving(kafka_broker)


def test_a_body_that_does_not_decode_is_refused(kafka_broker: InProcessBroker) -> None:
    good = encode_request(load_request_schema(3, 12)(topics=None, allow_auto_topic_creation=False,
                                                     include_topic_authorized_operations=False))
    with WireClient(kafka_broker.kafka_address) as client:  # type: ignore[attr-defined]
        body = good[4:14] + os.urandom(3) + b"\xff\xff\xff\xff\x7f"  # header kept, body garbled
        client.send_bytes(struct.pack(">i", len(body)) + body)
        assert closed_soon(client)
    still_serving(kafka_broker)


def test_a_truncated_frame_holds_only_its_own_connection(kafka_broker: InProcessBroker) -> None:
    frame = encode_request(API_VERSIONS)
    with WireClient(kafka_broker.kafka_address) as stalled:  # type: ignore[attr-defined]
        stalled.send_bytes(frame[:len(frame) // 2])
        still_serving(kafka_broker)  # others are served while it waits for the rest
        stalled.send_bytes(frame[len(frame) // 2:])  # the rest arrives: it is answered
        assert struct.unpack_from(">i", stalled.read_frame(), 0)[0] == 1


def test_clients_that_disconnect_mid_request_or_before_the_answer(kafka_broker: InProcessBroker) -> None:
    frame = encode_request(API_VERSIONS)
    fetch = encode_request(load_request_schema(1, 12)(max_wait=__import__("datetime").timedelta(seconds=5),
                                                      min_bytes=1, topics=(), forgotten_topics_data=()))
    for payload in (frame[:3], frame[:len(frame) - 1], fetch, frame * 50):
        client = WireClient(kafka_broker.kafka_address)  # type: ignore[attr-defined]
        client.send_bytes(payload)
        client.close()
    still_serving(kafka_broker)
    listener = kafka_broker.server.kafka if kafka_broker.server is not None else None
    assert listener is not None
    # Every connection, the one still_serving used included, is let go once its client has gone (none leak).
    wait_until(lambda: kafka_broker.call(lambda: len(listener._connections)) == 0, 10,
               "the Kafka listener to let go of its disconnected clients' connections")


def test_many_pipelined_requests_are_answered_in_order(kafka_broker: InProcessBroker) -> None:
    with WireClient(kafka_broker.kafka_address) as client:  # type: ignore[attr-defined]
        client.send_bytes(b"".join(encode_request(API_VERSIONS, correlation_id=i) for i in range(100)))
        assert [struct.unpack_from(">i", client.read_frame(), 0)[0] for _ in range(100)] == list(range(100))


def _produce_naming(partitions: list[int]) -> bytes:
    from datetime import timedelta

    from kio.schema.produce.v9 import request as produce
    return encode_request(produce.ProduceRequest(
        transactional_id=None, acks=-1, timeout=timedelta(seconds=5), topic_data=(produce.TopicProduceData(
            name="t", partition_data=tuple(produce.PartitionProduceData(index=i, records=None) for i in partitions)),)))


def _list_offsets_naming(partitions: list[int]) -> bytes:
    from kio.schema.list_offsets.v6 import request as list_offsets
    return encode_request(list_offsets.ListOffsetsRequest(
        replica_id=-1, isolation_level=0, topics=(list_offsets.ListOffsetsTopic(name="t", partitions=tuple(
            list_offsets.ListOffsetsPartition(partition_index=i, current_leader_epoch=-1, timestamp=-1)
            for i in partitions)),)))


@pytest.mark.parametrize("frame", [
    pytest.param(_produce_naming(list(range(10_001))), id="produce-10001-partitions"),
    pytest.param(_produce_naming([0, 1, 0]), id="produce-a-partition-twice"),
    pytest.param(_list_offsets_naming(list(range(10_001))), id="list-offsets-10001-partitions"),
])
def test_a_request_naming_too_many_partitions_or_one_twice_is_refused(
        kafka_broker: InProcessBroker, frame: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="logbroker.kafka")
    with WireClient(kafka_broker.kafka_address) as client:  # type: ignore[attr-defined]
        client.send_bytes(frame)
        assert closed_soon(client)
    assert any("client 'wire-test'" in r.getMessage() and ("at most 10000 partitions" in r.getMessage()
               or "named more than once" in r.getMessage()) for r in caplog.records)
    still_serving(kafka_broker)
