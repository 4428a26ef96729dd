"""Admin over the Kafka port (confluent-kafka's AdminClient): create, describe, delete topics; cluster;
topic auto-creation on Metadata."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaException
from confluent_kafka import Producer as CKProducer
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)
from logbroker_client import Admin

from tests.support.cluster import BrokerCluster

ADMIN_TIMEOUT_S = 45  # controller changes forwarded between brokers: generous on a loaded 2-core machine


def test_create_describe_and_delete_topics(kafka_cluster: BrokerCluster, topic_name: str) -> None:
    admin = AdminClient({"bootstrap.servers": kafka_cluster.brokers[3].kafka_address})
    created = admin.create_topics([NewTopic(topic_name, num_partitions=3, replication_factor=2,
                                            config={"retention.ms": "3600000"})], request_timeout=15)
    created[topic_name].result(15)
    described = {t.name: t for t in Admin(kafka_cluster.bootstrap).describe_topics([topic_name])}[topic_name]
    assert (len(described.partitions), described.replication_factor) == (3, 2)
    again = admin.create_topics([NewTopic(topic_name, num_partitions=1, replication_factor=1)])[topic_name]
    try:
        again.result(15)
        raise AssertionError("a second create of the same name succeeded")
    except KafkaException as exc:
        assert exc.args[0].name() == "TOPIC_ALREADY_EXISTS"
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic_name)
    configs = admin.describe_configs([resource])[resource].result(15)
    assert configs["retention.ms"].value == "3600000" and not configs["retention.ms"].is_default
    assert configs["segment.bytes"].is_default
    admin.delete_topics([topic_name], request_timeout=15)[topic_name].result(15)
    assert topic_name not in admin.list_topics(timeout=10).topics


def test_partitions_are_added_and_configs_altered_through_the_controller(kafka_cluster: BrokerCluster,
                                                                        topic_name: str) -> None:
    admin = AdminClient({"bootstrap.servers": kafka_cluster.brokers[2].kafka_address,
                         "socket.timeout.ms": ADMIN_TIMEOUT_S * 1000})
    admin.create_topics([NewTopic(topic_name, num_partitions=2, replication_factor=3)],
                        request_timeout=ADMIN_TIMEOUT_S)[topic_name].result(ADMIN_TIMEOUT_S)
    admin.create_partitions([NewPartitions(topic_name, 4)], validate_only=True)[topic_name].result(ADMIN_TIMEOUT_S)
    assert len(admin.list_topics(topic_name, timeout=20).topics[topic_name].partitions) == 2  # only validated
    grown = admin.create_partitions([NewPartitions(topic_name, 4)], request_timeout=ADMIN_TIMEOUT_S)[topic_name]
    grown.result(ADMIN_TIMEOUT_S)
    assert len(admin.list_topics(topic_name, timeout=20).topics[topic_name].partitions) == 4
    fewer = admin.create_partitions([NewPartitions(topic_name, 3)])[topic_name]
    assert error_of(fewer).name() == "INVALID_PARTITIONS"

    resource = incremental(topic_name, "retention.ms", "60000")
    admin.incremental_alter_configs([resource])[resource].result(ADMIN_TIMEOUT_S)
    assert described_configs(admin, topic_name)["retention.ms"] == ("60000", False)
    bad = incremental(topic_name, "retention.ms", "soon")
    problem = error_of(admin.incremental_alter_configs([bad])[bad])
    assert problem.name() == "INVALID_CONFIG" and "retention.ms" in problem.str()
    assert described_configs(admin, topic_name)["retention.ms"] == ("60000", False)  # nothing applied
    replaced = ConfigResource(ConfigResource.Type.TOPIC, topic_name, set_config={"segment.ms": "3600000"})
    with pytest.warns(DeprecationWarning):  # confluent-kafka's warning: the older call is still served
        admin.alter_configs([replaced])[replaced].result(ADMIN_TIMEOUT_S)  # and replaces every override
    after = described_configs(admin, topic_name)
    assert after["segment.ms"] == ("3600000", False) and after["retention.ms"][1]


def incremental(topic: str, name: str, value: str) -> ConfigResource:
    return ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[
        ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)])


def error_of(future: object) -> Any:
    try:
        future.result(ADMIN_TIMEOUT_S)  # type: ignore[attr-defined]
    except KafkaException as exc:
        return exc.args[0]
    raise AssertionError("the change was accepted")


def described_configs(admin: AdminClient, topic: str) -> dict[str, tuple[str, bool]]:
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    return {name: (entry.value, entry.is_default) for name, entry in admin.describe_configs([resource])[resource]
            .result(ADMIN_TIMEOUT_S).items()}


def test_describe_cluster_names_every_broker(kafka_cluster: BrokerCluster) -> None:
    admin = AdminClient({"bootstrap.servers": kafka_cluster.kafka_bootstrap})
    cluster = admin.describe_cluster(request_timeout=10).result(10)
    assert sorted(f"{n.host}:{n.port}" for n in cluster.nodes) == sorted(
        b.kafka_address for b in kafka_cluster.brokers.values())
    assert cluster.controller.id in kafka_cluster.brokers


def test_metadata_creates_a_topic_when_the_broker_setting_allows(kafka_cluster: BrokerCluster,
                                                                 topic_name: str) -> None:
    producer = CKProducer({"bootstrap.servers": kafka_cluster.kafka_bootstrap})
    delivered: list = []
    producer.produce(topic_name, value=b"first", on_delivery=lambda err, msg: delivered.append(err))
    deadline = time.monotonic() + 15
    while not delivered and time.monotonic() < deadline:
        producer.poll(0.1)
    assert delivered == [None]
    assert topic_name in set(Admin(kafka_cluster.bootstrap).list_topics())


def test_auto_creation_is_off_by_default(tmp_path: Path) -> None:
    from kio.schema.errors import ErrorCode
    from kio.schema.metadata.v12 import request as m

    from tests.kafka.wire import WireClient
    from tests.support.brokers import InProcessBroker, free_port, wait_until

    port = free_port()
    broker = InProcessBroker(tmp_path / "data", kafka_listen=f"127.0.0.1:{port}").start()
    try:
        assert broker.server is not None
        controller_client = broker.server.broker.controller_client
        # Until the broker has loaded the cluster metadata it answers "not yet" (retriable), not "no such topic".
        wait_until(controller_client.metadata_loaded, 10, "the broker to load the cluster metadata")
        with WireClient(f"127.0.0.1:{port}") as client:
            answer = client.call(m.MetadataRequest(topics=(m.MetadataRequestTopic(topic_id=None, name="nope"),),
                                                   allow_auto_topic_creation=True,
                                                   include_topic_authorized_operations=False))
        assert answer.topics[0].error_code == ErrorCode.unknown_topic_or_partition
        assert "nope" not in set(Admin(broker.address).list_topics())
    finally:
        broker.stop()
