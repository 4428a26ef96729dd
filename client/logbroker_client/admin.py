"""Admin: create, delete, list and describe topics (synchronous)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from logbroker_client.connection import DEFAULT_REQUEST_TIMEOUT_MS
from logbroker_client.errors import LogbrokerError, TopicAlreadyExistsError, error_for
from logbroker_client.metadata import DOWN, ClusterMetadata
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.types import PartitionInfo, TopicDescription

# DescribeTopics asks each partition's leader for 5 s at most; a broker slower than this is stuck, ask another.
DESCRIBE_ATTEMPT_TIMEOUT_S = 7.0


def partition_info(p: pb.PartitionDescription, states: Mapping[int, str] | None) -> PartitionInfo:
    """A partition as described, corrected by which brokers answer now: a leader that is down leads nothing
    (the partition is offline), and a replica that is down is not in sync."""
    def up(node: int) -> bool:
        return states is None or states.get(node, DOWN) != DOWN

    online = p.leader_id >= 0 and up(p.leader_id)
    return PartitionInfo(p.partition, p.leader_id if online else -1, list(p.replicas),
                         [node for node in p.isr if up(node)], p.log_start_offset, p.high_watermark, p.size_bytes,
                         offline=not online)


def topic_description(described: pb.TopicDescription, states: Mapping[int, str] | None = None) -> TopicDescription:
    return TopicDescription(
        name=described.name,
        replication_factor=described.replication_factor,
        configs=dict(described.configs),
        partitions=[partition_info(p, states) for p in described.partitions],
    )


def raise_topic_errors(results: Sequence[pb.TopicResult]) -> None:
    for result in results:
        if result.error_code:
            raise error_for(result.error_code, result.error_message, result.name)


def raise_described_errors(topics: Sequence[pb.TopicDescription]) -> None:
    for described in topics:
        if described.error_code:
            raise error_for(described.error_code, described.error_message, described.name)


class RetryNote:
    """Remembers that an attempt failed retriably: a create retried after the controller moved may find the
    topic made by its own first attempt, and the error should say so."""

    def __init__(self, check: Callable[[Any], None]) -> None:
        self._check = check
        self.retried = False

    def __call__(self, response: Any) -> None:
        try:
            self._check(response)
        except LogbrokerError as exc:
            self.retried = self.retried or exc.retriable
            raise

    def explain(self, exc: LogbrokerError) -> LogbrokerError:
        if self.retried and isinstance(exc, TopicAlreadyExistsError):
            return TopicAlreadyExistsError(f"{exc} (an earlier attempt of this request, answered while the "
                                           "controller moved, may have created it)", exc.topic)
        return exc


class Admin:
    def __init__(self, bootstrap: str | Sequence[str] | None = None,
                 request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS) -> None:
        self._metadata = ClusterMetadata(bootstrap, request_timeout_ms)
        self._timeout_s = request_timeout_ms / 1000

    def _call(self, method: str, request: object, check: Callable[[Any], None] | None = None,
              attempt_timeout_s: float | None = None) -> Any:
        """Any broker answers admin requests (it forwards changes to the controller): try each in turn, and
        again while the controller is moving."""
        return self._metadata.call(method, request, admin=True, check=check, attempt_timeout_s=attempt_timeout_s)

    def create_topic(self, name: str, partitions: int = 1, replication_factor: int = 1,
                     configs: Mapping[str, str] | None = None, validate_only: bool = False) -> None:
        topic = pb.NewTopic(name=name, partitions=partitions, replication_factor=replication_factor,
                            configs=dict(configs or {}))
        note = RetryNote(lambda response: raise_topic_errors(response.results))
        try:
            self._call("CreateTopics", pb.CreateTopicsRequest(
                topics=[topic], timeout_ms=int(self._timeout_s * 1000), validate_only=validate_only), note)
        except LogbrokerError as exc:
            raise note.explain(exc) from None

    def delete_topic(self, name: str) -> None:
        self._call("DeleteTopics", pb.DeleteTopicsRequest(names=[name]),
                   lambda response: raise_topic_errors(response.results))

    def list_topics(self) -> list[str]:
        response = self._call("DescribeTopics", pb.DescribeTopicsRequest(),
                              attempt_timeout_s=DESCRIBE_ATTEMPT_TIMEOUT_S)
        return sorted(t.name for t in response.topics)

    def describe_topics(self, names: Sequence[str] = (), *,
                        broker_states: Mapping[int, str] | None = None) -> list[TopicDescription]:
        """Partitions with leaders, replicas and offsets. A partition whose leader does not answer is offline
        (leader_id -1, offline=True); pass broker_states (from broker_states()) to skip asking each broker."""
        response = self._call("DescribeTopics", pb.DescribeTopicsRequest(names=list(names)),
                              lambda answer: raise_described_errors(answer.topics), DESCRIBE_ATTEMPT_TIMEOUT_S)
        states = self.broker_states() if broker_states is None else broker_states
        return [topic_description(t, states) for t in response.topics]

    def describe_cluster(self) -> pb.MetadataResponse:
        return self._metadata.refresh()

    def broker_addresses(self) -> dict[int, str]:
        """node id -> HOST:PORT of every broker in the cluster."""
        return self._metadata.brokers()

    def broker_states(self) -> dict[int, str]:
        """node id -> "up", "not ready" (running, but starting or without a controller majority), "no answer"
        (nothing within 2 s: paused, overloaded or cut off) or "down" (refuses connections),
        each asked of the broker's own gRPC health service with a short timeout."""
        return self._metadata.broker_states()

    def close(self) -> None:
        self._metadata.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
