"""A broker that has not loaded the cluster metadata yet (just started, replaying the controller's log, or with
no controller leader) answers a topic it does not know with a retriable "still loading", not "no such topic":
a client told the topic does not exist would give up on one that does."""

from __future__ import annotations

from pathlib import Path

import pytest
from logbroker_client import Admin, Producer
from logbroker_client.error_codes import spec_for_code
from logbroker_client.errors import UnknownTopicOrPartitionError
from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.server import errors
from logbroker.server.broker import Broker
from logbroker.server.config import BrokerConfig
from tests.support.brokers import InProcessBroker, wait_until


def test_a_broker_still_loading_says_so_and_the_error_is_retriable(tmp_path: Path) -> None:
    broker = Broker(BrokerConfig(data_dir=tmp_path, listen="127.0.0.1:0"))  # not opened: nothing replayed yet
    try:
        with pytest.raises(errors.LeaderNotAvailable, match="still loading the cluster metadata"):
            broker.controller_client.topic("orders")
    finally:
        broker.executor.shutdown()
    assert spec_for_code(pb.ErrorCode.LEADER_NOT_AVAILABLE).retriable


def test_a_loaded_broker_says_the_topic_does_not_exist(broker: InProcessBroker) -> None:
    # Serving means a controller leader is known; loaded also means its committed commands are applied.
    controller_client = broker.server.broker.controller_client  # type: ignore[union-attr]
    wait_until(lambda: bool(broker.call(controller_client.metadata_loaded)), 10, "the broker to load the metadata")
    with Producer(broker.address, request_timeout_ms=5_000) as producer, \
            pytest.raises(UnknownTopicOrPartitionError, match="does not exist"):
        producer.send("never-created", b"x").result(timeout=10)
    with Admin(broker.address) as admin:
        admin.create_topic("orders", partitions=1)
        assert admin.describe_topics(["orders"])[0].partitions

