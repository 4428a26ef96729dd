"""Client quotas on the Kafka port: the same per-client-id byte rates as on gRPC, answered with Kafka's
throttle_time (KIP-219), keyed by the client.id of the request header."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from kio.schema.errors import ErrorCode
from kio.schema.produce.v9 import request as produce
from logbroker_client import Admin
from logbroker_client import records as rec

from tests.kafka.wire import WireClient
from tests.support.brokers import InProcessBroker, free_port

QUOTA_BYTES_PER_S = 20_000
BATCH_BYTES = 15_000


@pytest.fixture
def quota_broker(tmp_path: Path) -> Iterator[InProcessBroker]:
    port = free_port()
    broker = InProcessBroker(tmp_path / "data", kafka_listen=f"127.0.0.1:{port}", kafka_auto_create_topics=True,
                             client_quotas={"kafka-slow": {"produce_bytes_per_s": QUOTA_BYTES_PER_S}})
    broker.kafka_address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def produce_as(client: WireClient, client_id: str, topic: str, correlation_id: int) -> Any:
    builder = rec.BatchBuilder()
    builder.append(1_700_000_000_000, None, b"x" * BATCH_BYTES)
    request = produce.ProduceRequest(transactional_id=None, acks=1, timeout=timedelta(seconds=5), topic_data=(
        produce.TopicProduceData(name=topic, partition_data=(
            produce.PartitionProduceData(index=0, records=builder.build()),)),))
    return client.call(request, correlation_id, client_id=client_id)


def test_a_client_id_over_its_quota_is_told_to_wait_and_another_is_not(quota_broker: InProcessBroker) -> None:
    Admin(quota_broker.address).create_topic("quota-kafka", partitions=1)
    with WireClient(quota_broker.kafka_address) as client:  # type: ignore[attr-defined]
        answers = [produce_as(client, "kafka-slow", "quota-kafka", i) for i in range(1, 4)]
        unlimited = [produce_as(client, "kafka-fast", "quota-kafka", i) for i in range(4, 7)]
    for answer in answers + unlimited:
        assert answer.responses[0].partition_responses[0].error_code == ErrorCode.none
    assert answers[-1].throttle_time.total_seconds() > 0  # 45 kB against a 20 kB/s quota with a one-second burst
    assert all(a.throttle_time.total_seconds() == 0 for a in unlimited)
