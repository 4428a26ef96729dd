"""The group coordinator over three real brokers: its state survives the loss of its broker and restarts.

Members are driven through the raw Groups gRPC service (as any client would speak it), so these tests
check the broker alone: after the coordinator's broker is SIGKILLed, a new coordinator knows every member
and committed offset at once, no partition gets two owners meanwhile, and a full restart keeps every
committed offset.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from logbroker_client import Admin
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from tests.cluster.conftest import RAFT_TICK_MS
from tests.support.brokers import wait_until
from tests.support.cluster import BrokerCluster

TOPIC = "orders"
PARTITIONS = 4
GROUP = "billing"
SESSION_TIMEOUT_MS = 4000
RETRIABLE = {pb.ErrorCode.NOT_COORDINATOR, pb.ErrorCode.COORDINATOR_LOAD_IN_PROGRESS,
             pb.ErrorCode.COORDINATOR_NOT_AVAILABLE}
FAILOVER_TIMEOUT_S = 20.0


@pytest.fixture
def group_cluster(tmp_path: Path) -> Iterator[BrokerCluster]:
    cluster = BrokerCluster(tmp_path / "cluster", size=3, raft_tick_ms=RAFT_TICK_MS,
                            broker_config={"group_session_timeout_ms": SESSION_TIMEOUT_MS,
                                           "group_heartbeat_interval_ms": 200})
    try:
        cluster.start()
        with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
            admin.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=3)
        yield cluster
    finally:
        print(cluster.log_tails())
        cluster.stop_all()


def coordinator(cluster: BrokerCluster) -> int:
    """Ask live brokers until one names a live coordinator."""
    found: list[int] = []

    def named() -> bool:
        for node in cluster.live():
            try:
                with grpc.insecure_channel(cluster.address(node)) as channel:
                    answer = pb_grpc.GroupsStub(channel).FindCoordinator(
                        pb.FindCoordinatorRequest(group_ids=[GROUP]), timeout=5).coordinators[0]
            except grpc.RpcError:
                continue
            if not answer.error_code and answer.node_id in cluster.live():
                found.append(answer.node_id)
                return True
        return False

    wait_until(named, FAILOVER_TIMEOUT_S, f"a live coordinator for group {GROUP}", interval_s=0.1)
    return found[-1]


def call(cluster: BrokerCluster, method: str, request: object) -> object:
    """A Groups call at the coordinator, retried through coordinator moves."""
    deadline = time.monotonic() + FAILOVER_TIMEOUT_S
    while True:
        node = coordinator(cluster)
        try:
            with grpc.insecure_channel(cluster.address(node)) as channel:
                answer = getattr(pb_grpc.GroupsStub(channel), method)(request, timeout=10)
        except grpc.RpcError:
            answer = None
        if answer is not None and answer.error_code not in RETRIABLE:
            return answer
        assert time.monotonic() < deadline, f"{method} kept failing: {answer}"
        time.sleep(0.1)


class RawMember:
    def __init__(self, cluster: BrokerCluster) -> None:
        self.cluster = cluster
        self.member_id = uuid.uuid4().hex
        self.epoch = 0
        self.owned: set[tuple[str, int]] = set()

    def heartbeat(self) -> pb.GroupHeartbeatResponse:
        owned = [pb.TopicPartitions(topic=TOPIC, partitions=sorted(p for _, p in self.owned))] if self.owned else []
        answer = call(self.cluster, "Heartbeat", pb.GroupHeartbeatRequest(
            group_id=GROUP, member_id=self.member_id, member_epoch=self.epoch, subscribed_topic_names=[TOPIC],
            full_request=self.epoch == 0, owned_partitions=owned))
        assert isinstance(answer, pb.GroupHeartbeatResponse)
        assert not answer.error_code, f"member {self.member_id}: {answer.error_message}"
        self.epoch = answer.member_epoch
        if answer.has_assignment:
            self.owned = {(t.topic, p) for t in answer.assignment for p in t.partitions}
        return answer

    def commit(self, offsets: dict[int, int]) -> None:
        answer = call(self.cluster, "CommitOffsets", pb.CommitOffsetsRequest(
            group_id=GROUP, member_id=self.member_id, member_epoch=self.epoch,
            offsets=[pb.OffsetToCommit(topic=TOPIC, partition=p, offset=o) for p, o in offsets.items()]))
        assert isinstance(answer, pb.CommitOffsetsResponse)
        assert not answer.error_code, answer.error_message


def committed(cluster: BrokerCluster) -> dict[int, int]:
    answer = call(cluster, "FetchOffsets", pb.FetchOffsetsRequest(group_id=GROUP))
    assert isinstance(answer, pb.FetchOffsetsResponse) and not answer.error_code, answer
    return {o.partition: o.offset for o in answer.offsets if o.topic == TOPIC}


def settle(*members: RawMember, rounds: int = 6) -> None:
    for _ in range(rounds):
        for member in members:
            member.heartbeat()
            assert_disjoint(*members)


def assert_disjoint(*members: RawMember) -> None:
    seen: set[tuple[str, int]] = set()
    for member in members:
        assert not seen & member.owned, f"two members own {seen & member.owned}"
        seen |= member.owned


def test_a_new_coordinator_knows_every_member_and_offset_at_once(group_cluster: BrokerCluster) -> None:
    cluster = group_cluster
    member = RawMember(cluster)
    settle(member)
    assert len(member.owned) == PARTITIONS
    member.commit({p: 10 * (p + 1) for p in range(PARTITIONS)})
    epoch = member.epoch
    old = coordinator(cluster)
    cluster.kill(old)
    new = coordinator(cluster)
    assert new != old
    member.heartbeat()  # not fenced: the new coordinator replayed the membership from the log
    assert member.epoch == epoch and len(member.owned) == PARTITIONS
    assert committed(cluster) == {p: 10 * (p + 1) for p in range(PARTITIONS)}
    member.commit({0: 99})
    cluster.restart(old)
    for node in cluster.brokers:  # every broker down at once, then back
        cluster.kill(node)
    for node in cluster.brokers:
        cluster.restart(node, wait=False)
    cluster.wait_serving()
    assert committed(cluster) == {0: 99, **{p: 10 * (p + 1) for p in range(1, PARTITIONS)}}


def test_no_partition_has_two_owners_through_a_coordinator_failover(group_cluster: BrokerCluster) -> None:
    cluster = group_cluster
    a, b = RawMember(cluster), RawMember(cluster)
    settle(a, b)
    assert len(a.owned) == len(b.owned) == PARTITIONS // 2
    c = RawMember(cluster)
    c.heartbeat()  # joins: a and b must give up partitions for it
    cluster.kill(coordinator(cluster))
    settle(a, b, c, rounds=10)
    assert sorted(len(m.owned) for m in (a, b, c)) == [1, 1, 2]


def test_a_member_that_stops_heartbeating_loses_its_partitions_to_the_others(group_cluster: BrokerCluster) -> None:
    cluster = group_cluster
    a, b = RawMember(cluster), RawMember(cluster)
    settle(a, b)

    def b_has_everything() -> bool:
        b.heartbeat()
        return len(b.owned) == PARTITIONS

    wait_until(b_has_everything, SESSION_TIMEOUT_MS / 1000 + 10, "the silent member's partitions to move")
    answer = call(cluster, "Heartbeat", pb.GroupHeartbeatRequest(group_id=GROUP, member_id=a.member_id,
                                                                 member_epoch=a.epoch))
    assert isinstance(answer, pb.GroupHeartbeatResponse)
    assert answer.error_code == pb.ErrorCode.UNKNOWN_MEMBER_ID
