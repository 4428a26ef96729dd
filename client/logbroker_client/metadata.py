"""Cluster metadata as a client sees it: brokers, topics, partition leaders, and connections to them."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import grpc

from logbroker_client.connection import (
    DEFAULT_REQUEST_TIMEOUT_MS,
    Connection,
    parse_bootstrap,
    translate_rpc_error,
)
from logbroker_client.errors import BrokerUnavailableError, LogbrokerError, error_for
from logbroker_client.proto import logbroker_pb2 as pb

UNREACHABLE_PENALTY_S = 2.0
METADATA_TIMEOUT_S = 2.0


class MetadataCache:
    """Brokers and partition leaders from the last Metadata answer (shared by sync and async clients)."""

    def __init__(self, bootstrap: str | Sequence[str] | None, request_timeout_ms: int) -> None:
        self.bootstrap = parse_bootstrap(bootstrap)
        self.request_timeout_s = request_timeout_ms / 1000
        self._lock = threading.Lock()
        self._brokers: dict[int, str] = {}
        self._partitions: dict[str, list[pb.PartitionMetadata]] = {}
        self._unreachable_until: dict[str, float] = {}
        self._leaderless_until: dict[str, float] = {}

    def addresses(self, for_metadata: bool = False) -> list[str]:
        """Known brokers first, then bootstrap addresses; any that just failed go last (and, when asking for
        metadata, any that just could not name a leader)."""
        candidates = list(dict.fromkeys([*self._brokers.values(), *self.bootstrap]))
        now = time.monotonic()

        def doubt(address: str) -> tuple[bool, bool]:
            unreachable = self._unreachable_until.get(address, 0.0) > now
            leaderless = for_metadata and self._leaderless_until.get(address, 0.0) > now
            return unreachable, leaderless

        return sorted(candidates, key=doubt)

    def mark_unreachable(self, address: str) -> None:
        """A call to address failed to connect: ask the others first for a while."""
        self._unreachable_until[address] = time.monotonic() + UNREACHABLE_PENALTY_S

    def mark_leaderless(self, address: str) -> None:
        """That broker could not name a partition's leader (it may be cut off from its peers): take metadata
        from the others first for a while, but keep sending to it if it is the only one that answers."""
        self._leaderless_until[address] = time.monotonic() + UNREACHABLE_PENALTY_S

    def apply(self, response: pb.MetadataResponse) -> None:
        with self._lock:
            self._brokers = {b.node_id: f"{b.host}:{b.port}" for b in response.brokers}
            for topic in response.topics:
                if topic.error_code:
                    self._partitions.pop(topic.name, None)
                else:
                    self._partitions[topic.name] = sorted(topic.partitions, key=lambda p: p.partition)

    def cached_count(self, topic: str) -> int | None:
        parts = self._partitions.get(topic)
        return None if parts is None else len(parts)

    @staticmethod
    def check_topic(response: pb.MetadataResponse, topic: str) -> None:
        for t in response.topics:
            if t.name == topic and t.error_code:
                raise error_for(t.error_code, t.error_message, topic)

    def leader_address(self, topic: str, partition: int) -> str | None:
        parts = self._partitions[topic]
        if not 0 <= partition < len(parts):
            raise error_for(
                pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                f"topic {topic!r} has partitions 0..{len(parts) - 1}; partition {partition} does not exist",
                topic, partition,
            )
        return self._brokers.get(parts[partition].leader_id)

    def invalidate(self, topic: str) -> None:
        with self._lock:
            self._partitions.pop(topic, None)


class ClusterMetadata(MetadataCache):
    """Thread-safe: the producer's sender thread and the caller's thread both ask for leaders."""

    def __init__(self, bootstrap: str | Sequence[str] | None, request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS):
        super().__init__(bootstrap, request_timeout_ms)
        self._connections: dict[str, Connection] = {}

    def connection(self, address: str) -> Connection:
        with self._lock:
            conn = self._connections.get(address)
            if conn is None:
                conn = self._connections[address] = Connection(address)
            return conn

    def any_connection(self) -> Connection:
        """A connection to the broker most likely to answer (one that has not just failed)."""
        return self.connection(self.addresses()[0])

    def refresh(self, topics: Sequence[str] = ()) -> pb.MetadataResponse:
        """Ask each broker in turn until one answers; a dead or paused one costs at most a short timeout."""
        error: LogbrokerError | None = None
        for address in self.addresses(for_metadata=True):
            conn = self.connection(address)
            try:
                response: pb.MetadataResponse = conn.broker.Metadata(
                    pb.MetadataRequest(topics=list(topics)), timeout=min(self.request_timeout_s, METADATA_TIMEOUT_S)
                )
            except grpc.RpcError as exc:
                error = translate_rpc_error(exc, address)
                if not error.retriable:
                    raise error from None
                self.mark_unreachable(address)
                continue
            self.apply(response)
            return response
        if error is not None and len(self.addresses()) == 1:
            raise error
        raise BrokerUnavailableError(f"no broker answers at {', '.join(self.addresses())}; is the cluster running? "
                                     f"(last error: {error})")

    def partitions_for(self, topic: str) -> int:
        """Number of partitions; raises UnknownTopicOrPartitionError with the broker's message."""
        count = self.cached_count(topic)
        if count is None:
            self.check_topic(self.refresh([topic]), topic)
            count = self.cached_count(topic)
            if count is None:
                raise LogbrokerError(f"broker returned no metadata for topic {topic!r}")
        return count

    def leader_connection(self, topic: str, partition: int) -> Connection:
        self.partitions_for(topic)
        address = self.leader_address(topic, partition)
        return self.any_connection() if address is None else self.connection(address)

    def close(self) -> None:
        with self._lock:
            for conn in self._connections.values():
                conn.close()
            self._connections.clear()
