"""Consumer groups, protocol-neutral: find a group's coordinator and run its requests there.

A group lives in partition crc32(group_id) % N of __consumer_offsets; the leader of that partition is the
group's coordinator. Requests reaching another broker are answered NOT_COORDINATOR (clients then ask
FindCoordinator again). The gRPC service (service.py) and, later, the Kafka listener call this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from logbroker.groups.coordinator import (
    OFFSETS_TOPIC,
    CommittedOffset,
    Group,
    HeartbeatRequest,
    HeartbeatResult,
    check_group_id,
    partition_for_group,
)
from logbroker.groups.errors import CoordinatorLoadInProgress, CoordinatorNotAvailable, NotCoordinator
from logbroker.groups.runtime import GroupShardRuntime
from logbroker.server.broker import Broker

TP = tuple[str, int]


@dataclass(frozen=True)
class CoordinatorAddress:
    node_id: int
    address: str


class GroupFrontEnd:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def offsets_partitions(self) -> int | None:
        topic = self.broker.cluster.topics.get(OFFSETS_TOPIC)
        return topic.partitions if topic is not None else None

    def find_coordinator(self, group_id: str) -> CoordinatorAddress:
        check_group_id(group_id)
        partitions = self.offsets_partitions()
        if partitions is None:
            raise CoordinatorNotAvailable(f"{OFFSETS_TOPIC} is being created; retry shortly")
        index = partition_for_group(group_id, partitions)
        leader = self.broker.replicas.known_leader(OFFSETS_TOPIC, index)
        if leader is None or leader not in self.broker.peers:
            raise CoordinatorNotAvailable(f"{OFFSETS_TOPIC}-{index}, which holds group {group_id!r}, has no leader "
                                          "now (a majority of its replicas must be up); retry shortly")
        return CoordinatorAddress(leader, self.broker.client_addresses[leader])

    def runtime_for(self, group_id: str) -> GroupShardRuntime:
        check_group_id(group_id)
        if not self.broker.controller_client.metadata_loaded():
            # Assignments are computed from the topics this broker knows: a broker that has just started
            # must not compute them from a partial list (every member would lose its partitions).
            raise CoordinatorLoadInProgress(f"broker {self.broker.node_id} is still loading the cluster "
                                            "metadata; retry shortly")
        partitions = self.offsets_partitions()
        runtime = None if partitions is None else \
            self.broker.group_runtimes.get(partition_for_group(group_id, partitions))
        if runtime is None:
            raise NotCoordinator(f"broker {self.broker.node_id} is not the coordinator of group {group_id!r}; "
                                 "find the coordinator again")
        runtime.check_serving()
        return runtime

    async def heartbeat(self, request: HeartbeatRequest) -> HeartbeatResult:
        return await self.runtime_for(request.group_id).run(lambda shard: shard.heartbeat(request))

    async def commit(self, group_id: str, member_id: str, member_epoch: int,
                     offsets: Sequence[tuple[str, int, int, str]]) -> None:
        await self.runtime_for(group_id).run(lambda shard: (None, shard.commit(group_id, member_id, member_epoch,
                                                                                offsets)))

    def fetch_offsets(self, group_id: str, partitions: Iterable[TP] | None) -> dict[TP, CommittedOffset]:
        return self.runtime_for(group_id).shard.fetch_offsets(group_id, partitions)

    def describe(self, group_id: str) -> Group | None:
        """The group as its coordinator holds it (None when it does not exist)."""
        return self.runtime_for(group_id).shard.groups.get(group_id)

    async def delete(self, group_id: str) -> None:
        await self.runtime_for(group_id).run(lambda shard: (None, shard.delete_group(group_id)))

    def local_groups(self) -> list[Group]:
        """Groups of the coordinator partitions this broker leads now."""
        out: list[Group] = []
        for runtime in self.broker.group_runtimes.values():
            if runtime.replica.is_leader:
                out.extend(g for g in runtime.shard.groups.values() if g.exists or g.offsets)
        return out
