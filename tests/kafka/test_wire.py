"""The Kafka listener at the wire: version negotiation, acks=0, long-poll fetch, oversized batches, ids."""

from __future__ import annotations

import struct
import time

from kio.index import load_request_schema
from kio.schema.errors import ErrorCode
from logbroker_client import records as rec

from tests.kafka.wire import WireClient, encode_request
from tests.support.brokers import InProcessBroker


def req(key: int, version: int, **fields: object) -> object:
    return load_request_schema(key, version)(**fields)


def _produce(client: WireClient, topic: str, batch: bytes, acks: int = -1, version: int = 9,
             correlation_id: int = 1) -> object:
    mod = __import__(f"kio.schema.produce.v{version}.request", fromlist=["x"])
    request = mod.ProduceRequest(transactional_id=None, acks=acks, timeout=__import__("datetime").timedelta(seconds=5),
                                 topic_data=(mod.TopicProduceData(name=topic, partition_data=(
                                     mod.PartitionProduceData(index=0, records=batch),)),))
    if acks == 0:
        client.send_bytes(encode_request(request, correlation_id))
        return None
    return client.call(request, correlation_id)


def _fetch(client: WireClient, topic: str, offset: int, max_wait_ms: int, max_bytes: int = 1 << 20,
           min_bytes: int = 1) -> object:
    from datetime import timedelta

    from kio.schema.fetch.v12 import request as f
    request = f.FetchRequest(max_wait=timedelta(milliseconds=max_wait_ms), min_bytes=min_bytes, max_bytes=max_bytes,
                             topics=(f.FetchTopic(topic=topic, partitions=(f.FetchPartition(
                                 partition=0, current_leader_epoch=-1, fetch_offset=offset, last_fetched_epoch=-1,
                                 log_start_offset=-1, partition_max_bytes=max_bytes),)),),
                             forgotten_topics_data=(), rack_id="")
    return client.call(request)


def _create(client: WireClient, topic: str) -> None:
    from kio.schema.metadata.v12 import request as m
    client.call(m.MetadataRequest(topics=(m.MetadataRequestTopic(topic_id=None, name=topic),),
                                  allow_auto_topic_creation=True, include_topic_authorized_operations=False))


def test_api_versions_lists_our_ranges_and_refuses_a_too_new_version_in_v0(kafka_broker: InProcessBroker) -> None:
    with WireClient(kafka_broker.kafka_address) as client:  # type: ignore[attr-defined]
        answer = client.call(req(18, 3, client_software_name="t", client_software_version="1"))
        ranges = {a.api_key: (a.min_version, a.max_version) for a in answer.api_keys}
        assert answer.error_code == ErrorCode.none
        assert ranges[18] == (0, 4) and ranges[0] == (0, 9) and ranges[1] == (4, 12)
        # ApiVersions v9 does not exist yet: answered in v0 (header v0) with UNSUPPORTED_VERSION and our ranges.
        frame = struct.pack(">hhih", 18, 9, 77, 1) + b"x" + b"\x00\x00\x00"
        client.send_bytes(struct.pack(">i", len(frame)) + frame)
        payload = client.read_frame()
        correlation_id, code, count = struct.unpack_from(">ihi", payload, 0)
        assert (correlation_id, code) == (77, ErrorCode.unsupported_version.value)
        assert count == len(ranges)


def test_produce_v0_is_advertised_but_answered_unsupported_version(kafka_broker: InProcessBroker) -> None:
    with WireClient(kafka_broker.kafka_address) as client:  # type: ignore[attr-defined]
        body = struct.pack(">hi", -1, 5000) + struct.pack(">i", 1) + struct.pack(">h", 1) + b"t" + \
            struct.pack(">i", 1) + struct.pack(">ii", 0, 3) + b"abc"
        frame = struct.pack(">hhih", 0, 0, 5, 1) + b"x" + body
        client.send_bytes(struct.pack(">i", len(frame)) + frame)
        payload = client.read_frame()
        assert struct.unpack_from(">ii", payload, 0) == (5, 1)
        assert payload[8:11] == b"\x00\x01t"
        assert struct.unpack_from(">iihq", payload, 11) == (1, 0, ErrorCode.unsupported_version.value, -1)


def test_acks_0_gets_no_answer_and_the_next_request_is_answered(kafka_broker: InProcessBroker) -> None:
    with WireClient(kafka_broker.kafka_address) as client:  # type: ignore[attr-defined]
        _create(client, "quiet")
        _produce(client, "quiet", rec.build_batch([(0, None, b"fire-and-forget", [])]), acks=0, correlation_id=10)
        answer = _produce(client, "quiet", rec.build_batch([(0, None, b"second", [])]), correlation_id=11)
        part = answer.responses[0].partition_responses[0]
        assert part.error_code == ErrorCode.none
        fetched = _fetch(client, "quiet", 0, 100)
        values = [r.value for _, records in rec.iter_batches(fetched.responses[0].partitions[0].records)
                  for r in records]
        assert values == [b"fire-and-forget", b"second"]


def test_fetch_long_polls_until_data_or_max_wait(kafka_broker: InProcessBroker) -> None:
    with WireClient(kafka_broker.kafka_address) as client:  # type: ignore[attr-defined]
        _create(client, "polled")
        end = _fetch(client, "polled", 0, 50).responses[0].partitions[0].high_watermark
        started = time.monotonic()
        empty = _fetch(client, "polled", end, 600)
        assert 0.5 <= time.monotonic() - started < 3
        assert not empty.responses[0].partitions[0].records
        with WireClient(kafka_broker.kafka_address) as writer:  # type: ignore[attr-defined]
            from datetime import timedelta

            from kio.schema.fetch.v12 import request as f
            request = f.FetchRequest(max_wait=timedelta(seconds=10), min_bytes=1, max_bytes=1 << 20,
                                     topics=(f.FetchTopic(topic="polled", partitions=(f.FetchPartition(
                                         partition=0, current_leader_epoch=-1, fetch_offset=end,
                                         last_fetched_epoch=-1, log_start_offset=-1, partition_max_bytes=1 << 20),)),),
                                     forgotten_topics_data=(), rack_id="")
            client.send_bytes(encode_request(request, 3))
            time.sleep(0.2)
            started = time.monotonic()
            _produce(writer, "polled", rec.build_batch([(0, None, b"wake", [])]))
            client.sock.settimeout(5)
            client.read_frame()
            assert time.monotonic() - started < 2


def test_fetch_returns_a_whole_batch_larger_than_max_bytes(kafka_broker: InProcessBroker) -> None:
    with WireClient(kafka_broker.kafka_address) as client:  # type: ignore[attr-defined]
        _create(client, "big")
        batch = rec.build_batch([(0, None, b"x" * 5000, []), (0, None, b"y" * 5000, [])])
        base = _produce(client, "big", batch).responses[0].partition_responses[0].base_offset
        part = _fetch(client, "big", base + 1, 100, max_bytes=10).responses[0].partitions[0]
        assert part.error_code == ErrorCode.none
        assert part.high_watermark == part.last_stable_offset == base + 2
        header = rec.read_header(part.records)
        assert (header.base_offset, header.records_count, len(part.records)) == (base, 2, len(batch))


def test_producer_ids_are_unique_and_survive_a_restart(kafka_broker: InProcessBroker) -> None:
    from logbroker.kafka.producer_ids import ProducerIdAllocator

    with WireClient(kafka_broker.kafka_address) as client:  # type: ignore[attr-defined]
        ids = [client.call(req(22, 4, transactional_id=None, transaction_timeout=__import__("datetime").timedelta(0),
                               producer_id=-1, producer_epoch=-1)).producer_id for _ in range(5)]
    assert len(set(ids)) == 5 and all(i >= 1 << 62 for i in ids)
    again = ProducerIdAllocator(kafka_broker.config.data_dir, kafka_broker.config.node_id)  # a restarted broker
    assert again.next_id() > max(ids)
    other = ProducerIdAllocator(kafka_broker.config.data_dir / "elsewhere", 2)
    other.path.parent.mkdir(parents=True, exist_ok=True)
    assert other.next_id() >> 40 != ids[0] >> 40
