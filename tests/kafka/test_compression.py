"""Compressed batches from Kafka clients: gzip, snappy (xerial and raw), lz4 and zstd are stored as sent
and read back by Kafka clients and by logbroker's own consumer; bombs are refused before they expand."""

from __future__ import annotations

import time

import cramjam
import pytest
from confluent_kafka import Producer as CKProducer
from kafka import KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KPTopicPartition
from logbroker_client import Consumer, TopicPartition
from logbroker_client import compression as codecs
from logbroker_client import records as rec

from tests.kafka.conftest import make_topic
from tests.support.cluster import BrokerCluster

CODECS = ["gzip", "snappy", "lz4", "zstd"]
KAFKA_PYTHON_CODECS = {"gzip", "zstd"}


@pytest.mark.parametrize("codec", [codecs.GZIP, codecs.SNAPPY, codecs.LZ4])
def test_sections_round_trip_and_bombs_are_refused(codec: int) -> None:
    data = b"".join(b"record %d " % i for i in range(5000))
    packed = codecs.compress(codec, data)
    assert codecs.decompress(codec, packed, len(data)) == data
    with pytest.raises(codecs.DecompressionError, match="limit|over"):
        codecs.decompress(codec, packed, len(data) - 1)
    with pytest.raises(codecs.DecompressionError):
        codecs.decompress(codec, packed[: len(packed) // 2], len(data))


def test_raw_snappy_as_librdkafka_writes_it() -> None:
    data = b"abc" * 1000
    assert codecs.decompress(codecs.SNAPPY, bytes(cramjam.snappy.compress_raw(data)), len(data)) == data


@pytest.mark.parametrize("codec", CODECS)
def test_kafka_clients_produce_compressed_batches_read_everywhere(kafka_cluster: BrokerCluster, topic_name: str,
                                                                  codec: str) -> None:
    make_topic(kafka_cluster, topic_name)
    producer = CKProducer({"bootstrap.servers": kafka_cluster.kafka_bootstrap, "enable.idempotence": True,
                           "compression.type": codec, "linger.ms": 20})
    sent = [(b"k%d" % i, (b"value %d " % i) * 20) for i in range(300)]
    errors: list = []
    for key, value in sent:
        producer.produce(topic_name, key=key, value=value, on_delivery=lambda err, msg: errors.append(err))
    assert producer.flush(20) == 0 and set(errors) == {None}
    if codec in KAFKA_PYTHON_CODECS:  # kafka-python needs extra packages for snappy and lz4
        kp = KafkaProducer(bootstrap_servers=kafka_cluster.kafka_bootstrap, compression_type=codec, linger_ms=20)
        kp.send(topic_name, key=b"kp", value=b"from kafka-python " * 10).get(10)
        kp.close()
        sent.append((b"kp", b"from kafka-python " * 10))
        consumer = KafkaConsumer(bootstrap_servers=kafka_cluster.kafka_bootstrap, auto_offset_reset="earliest",
                                 enable_auto_commit=False)
        consumer.assign([KPTopicPartition(topic_name, 0)])
        got: list = []
        deadline = time.monotonic() + 15
        while len(got) < len(sent) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=300).values():
                got.extend((m.key, m.value) for m in batch)
        consumer.close()
        assert got == sent
    from tests.kafka.test_clients import _ck_consume
    assert [(m.key(), m.value()) for m in _ck_consume(kafka_cluster.kafka_bootstrap, topic_name, 1, len(sent))] == sent
    tp = TopicPartition(topic_name, 0)
    with Consumer(kafka_cluster.bootstrap) as native:  # logbroker's consumer decodes the same bytes
        native.assign([tp])
        native.seek(tp, 0)
        records: list = []
        deadline = time.monotonic() + 15
        while len(records) < len(sent) and time.monotonic() < deadline:
            records.extend(native.poll(timeout=0.5))
    assert [(r.key, r.value) for r in records] == sent
    stored = kafka_cluster_batch_codecs(kafka_cluster, topic_name)
    # Stored as sent, never recompressed (a client may send a batch that compression would not shrink plain).
    assert rec.COMPRESSION_CODECS[codec] in stored and stored <= {rec.COMPRESSION_CODECS[codec], 0}


def kafka_cluster_batch_codecs(cluster: BrokerCluster, topic: str) -> set[int]:
    from kio.schema.fetch.v12 import request as f

    from tests.kafka.wire import WireClient

    leader = next(p.leader for p in CKProducer({"bootstrap.servers": cluster.kafka_bootstrap})
                  .list_topics(topic, timeout=10).topics[topic].partitions.values())
    with WireClient(cluster.brokers[leader].kafka_address) as client:
        from datetime import timedelta
        answer = client.call(f.FetchRequest(
            max_wait=timedelta(milliseconds=10), min_bytes=1, max_bytes=1 << 24, forgotten_topics_data=(),
            rack_id="", topics=(f.FetchTopic(topic=topic, partitions=(f.FetchPartition(
                partition=0, current_leader_epoch=-1, fetch_offset=0, last_fetched_epoch=-1, log_start_offset=-1,
                partition_max_bytes=1 << 24),)),)))
    data = answer.responses[0].partitions[0].records
    return {h.compression for _, h in rec.iter_batch_headers(data) if not h.is_control}
