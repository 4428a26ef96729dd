"""What a Kafka request handler is given: the broker core, the group front end, the listener's settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from logbroker.kafka.framing import FrameError
from logbroker.server.data_plane import request_partitions_problem

if TYPE_CHECKING:
    from logbroker.kafka.producer_ids import ProducerIdAllocator
    from logbroker.server.broker import Broker
    from logbroker.server.groups import GroupFrontEnd


@dataclass
class ListenerSettings:
    listen_host: str
    listen_port: int
    max_request_bytes: int
    auto_create_topics: bool
    # Every broker's Kafka port is its gRPC port plus this offset (the same on every broker of a cluster),
    # so each broker can name every other's Kafka endpoint from its client address (--advertised-peers, else
    # --peers; see advertised_address).
    port_offset: int
    producer_ids: ProducerIdAllocator | Any = None
    cluster_id: str = "logbroker"


@dataclass
class Context:
    broker: Broker
    groups: GroupFrontEnd
    settings: ListenerSettings
    client_id: str
    client_host: str
    version: int

    def kafka_address(self, node_id: int) -> tuple[str, int]:
        return advertised_address(self.broker.client_addresses[node_id], self.settings.port_offset)


def advertised_address(peer_address: str, port_offset: int) -> tuple[str, int]:
    """A broker's Kafka endpoint from its peer (gRPC) address: the same host, the port moved by the offset."""
    host, _, port = peer_address.rpartition(":")
    return host, int(port) + port_offset


def refuse_partitions_problem(ctx: Context, api: str, partitions: list[tuple[str, int]]) -> None:
    """Close the connection (as Kafka does for an invalid request) when a request names more partitions than
    any front-end serves in one request, or one twice (data_plane.request_partitions_problem)."""
    problem = request_partitions_problem(api, partitions)
    if problem:
        raise FrameError(f"client {ctx.client_id!r} at {ctx.client_host}: {problem}")
