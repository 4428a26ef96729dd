"""Metadata assembly shared by the front-ends: each partition of a topic as this broker sees it.

The gRPC Metadata and DescribeTopics answers and the Kafka Metadata answer are built from the same view, so
every port names the same leader and in-sync replicas; each adds the fields of its own response shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from logbroker.cluster.metadata import TopicMetadata
from logbroker.cluster.replica import Replica

if TYPE_CHECKING:
    from logbroker.server.broker import Broker


class PartitionView(NamedTuple):
    """One partition: where it is placed, who leads it (None: no live leader known), its in-sync replicas
    (the leader's view, else the placement) and this broker's replica of it, if any. A named tuple, not a
    frozen dataclass: a Metadata answer makes one per partition, and a frozen dataclass's fields cost a
    __setattr__ call each (a tenth of a 10,000-partition answer's time)."""

    partition: int
    replicas: list[int]
    leader: int | None
    isr: list[int]
    replica: Replica | None


def partition_views(broker: Broker, topic: TopicMetadata) -> list[PartitionView]:
    replicas = broker.replicas
    views = []
    for index, assignment in enumerate(topic.assignment):
        replica = replicas.hosted_replica(topic.name, index)  # the partition exists: it is in the assignment
        views.append(PartitionView(index, assignment, replicas.known_leader(topic.name, index),
                                   replicas.in_sync_replicas(replica, assignment), replica))
    return views
