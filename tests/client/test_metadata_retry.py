"""The client's first lookup of a topic (the threaded and the asyncio client's alike) asks again while the
broker's answer is retriable ("still loading the cluster metadata": a broker that has just started), within its
request timeout, and fails at once on an answer that is not (the topic does not exist)."""

from __future__ import annotations

import asyncio

import pytest
from logbroker_client.aio import AsyncMetadata
from logbroker_client.errors import LeaderNotAvailableError, UnknownTopicOrPartitionError
from logbroker_client.metadata import ClusterMetadata
from logbroker_client.proto import logbroker_pb2 as pb

LOADING = "broker 1 is still loading the cluster metadata and does not know topic 'orders' yet; retry shortly"


def answer(error: int = pb.ErrorCode.NONE, message: str = "") -> pb.MetadataResponse:
    response = pb.MetadataResponse(brokers=[pb.BrokerInfo(node_id=1, host="127.0.0.1", port=1)])
    topic = response.topics.add(name="orders", error_code=error, error_message=message)
    if not error:
        topic.partitions.add(partition=0, leader_id=1, replicas=[1], isr=[1])
    return response


class Scripted:
    """Answers Metadata from a script instead of a broker (the last answer repeats), and counts the asks; mixed
    into the threaded and the asyncio client's metadata alike."""

    def __init__(self, answers: list[pb.MetadataResponse], request_timeout_ms: int = 5_000) -> None:
        super().__init__("127.0.0.1:1", request_timeout_ms)  # type: ignore[call-arg]
        self.answers = answers
        self.asked = 0

    def next_answer(self) -> pb.MetadataResponse:
        response = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        self.apply(response)  # type: ignore[attr-defined]
        return response


class ScriptedMetadata(Scripted, ClusterMetadata):
    def refresh(self, topics: object = ()) -> pb.MetadataResponse:
        return self.next_answer()


def test_a_loading_broker_is_asked_again_until_it_knows_the_topic() -> None:
    loading = answer(pb.ErrorCode.LEADER_NOT_AVAILABLE, LOADING)
    metadata = ScriptedMetadata([loading, loading, answer()])
    assert metadata.partitions_for("orders") == 1
    assert metadata.asked == 3


def test_a_broker_still_loading_past_the_request_timeout_is_reported() -> None:
    metadata = ScriptedMetadata([answer(pb.ErrorCode.LEADER_NOT_AVAILABLE, LOADING)], request_timeout_ms=500)
    with pytest.raises(LeaderNotAvailableError, match="still loading"):
        metadata.partitions_for("orders")
    assert 2 <= metadata.asked <= 4


def test_a_topic_that_does_not_exist_fails_at_once() -> None:
    metadata = ScriptedMetadata([answer(pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, "topic 'orders' does not exist")])
    with pytest.raises(UnknownTopicOrPartitionError, match="does not exist"):
        metadata.partitions_for("orders")
    assert metadata.asked == 1


class ScriptedAsyncMetadata(Scripted, AsyncMetadata):
    async def refresh(self, topics: object = ()) -> pb.MetadataResponse:
        return self.next_answer()


def test_the_asyncio_client_asks_a_loading_broker_again_too() -> None:
    loading = answer(pb.ErrorCode.LEADER_NOT_AVAILABLE, LOADING)
    metadata = ScriptedAsyncMetadata([loading, loading, answer()])
    assert asyncio.run(metadata.partitions_for("orders")) == 1
    assert metadata.asked == 3


def test_the_asyncio_client_fails_at_once_on_a_topic_that_does_not_exist() -> None:
    metadata = ScriptedAsyncMetadata([answer(pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, "topic 'orders' does not exist")])
    with pytest.raises(UnknownTopicOrPartitionError, match="does not exist"):
        asyncio.run(metadata.partitions_for("orders"))
    assert metadata.asked == 1
