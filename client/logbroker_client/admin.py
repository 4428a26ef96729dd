"""Admin: create, delete, list and describe topics (synchronous)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc

from logbroker_client.connection import DEFAULT_REQUEST_TIMEOUT_MS, translate_rpc_error
from logbroker_client.errors import error_for
from logbroker_client.metadata import ClusterMetadata
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.types import PartitionInfo, TopicDescription


def topic_description(described: pb.TopicDescription) -> TopicDescription:
    return TopicDescription(
        name=described.name,
        replication_factor=described.replication_factor,
        configs=dict(described.configs),
        partitions=[
            PartitionInfo(p.partition, p.leader_id, list(p.replicas), list(p.isr), p.log_start_offset,
                          p.high_watermark, p.size_bytes)
            for p in described.partitions
        ],
    )


def raise_topic_errors(results: Sequence[pb.TopicResult]) -> None:
    for result in results:
        if result.error_code:
            raise error_for(result.error_code, result.error_message, result.name)


class Admin:
    def __init__(self, bootstrap: str | Sequence[str] | None = None,
                 request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS) -> None:
        self._metadata = ClusterMetadata(bootstrap, request_timeout_ms)
        self._timeout_s = request_timeout_ms / 1000

    def _call(self, method: str, request: object) -> object:
        conn = self._metadata.any_connection()
        try:
            return getattr(conn.admin, method)(request, timeout=self._timeout_s)
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, conn.address) from None

    def create_topic(self, name: str, partitions: int = 1, replication_factor: int = 1,
                     configs: Mapping[str, str] | None = None, validate_only: bool = False) -> None:
        topic = pb.NewTopic(name=name, partitions=partitions, replication_factor=replication_factor,
                            configs=dict(configs or {}))
        response = self._call("CreateTopics", pb.CreateTopicsRequest(
            topics=[topic], timeout_ms=int(self._timeout_s * 1000), validate_only=validate_only))
        raise_topic_errors(response.results)  # type: ignore[attr-defined]

    def delete_topic(self, name: str) -> None:
        response = self._call("DeleteTopics", pb.DeleteTopicsRequest(names=[name]))
        raise_topic_errors(response.results)  # type: ignore[attr-defined]

    def list_topics(self) -> list[str]:
        response = self._call("DescribeTopics", pb.DescribeTopicsRequest())
        return sorted(t.name for t in response.topics)  # type: ignore[attr-defined]

    def describe_topics(self, names: Sequence[str] = ()) -> list[TopicDescription]:
        response = self._call("DescribeTopics", pb.DescribeTopicsRequest(names=list(names)))
        topics = response.topics  # type: ignore[attr-defined]
        for described in topics:
            if described.error_code:
                raise error_for(described.error_code, described.error_message, described.name)
        return [topic_description(t) for t in topics]

    def describe_cluster(self) -> pb.MetadataResponse:
        return self._metadata.refresh()

    def close(self) -> None:
        self._metadata.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
