"""An idle share consumer costs its partition's log nothing: waiting fetches write no share state."""

from __future__ import annotations

from pathlib import Path

import grpc
from logbroker_client import Admin
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from tests.support.brokers import InProcessBroker, wait_until

IDLE_FETCHES = 8


def high_watermark(admin: Admin) -> int:
    return int(admin.describe_topics(["idle"])[0].partitions[0].high_watermark)


def test_waiting_share_fetches_on_an_empty_partition_leave_its_log_alone(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path / "data").start()
    try:
        admin = Admin(broker.address)
        admin.create_topic("idle", partitions=1)
        before = high_watermark(admin)
        share = pb_grpc.ShareStub(grpc.insecure_channel(broker.address))
        for _ in range(IDLE_FETCHES):
            answer = share.ShareFetch(pb.ShareFetchRequest(
                group_id="workers", member_id="w1", max_wait_ms=200,
                partitions=[pb.SharePartitionFetch(topic="idle", partition=0)]), timeout=10)
            assert not answer.partitions[0].error_code and not answer.partitions[0].acquired
        assert high_watermark(admin) == before
    finally:
        broker.stop()


def test_the_share_tick_visits_only_partitions_with_a_share_group(tmp_path: Path) -> None:
    """Thousands of partitions without share groups cost the broker's 100 ms share tick nothing: it visits the
    partitions that have a group, from the group's first fetch on, and forgets a deleted topic's."""
    broker = InProcessBroker(tmp_path / "data").start()
    try:
        admin = Admin(broker.address)
        admin.create_topic("plain", partitions=6)
        admin.create_topic("jobs", partitions=3)
        assert broker.server is not None
        share_groups = broker.server.broker.share_groups
        visited = lambda: set(broker.call(lambda: list(share_groups._with_groups.values())))  # noqa: E731
        assert visited() == set()
        share = pb_grpc.ShareStub(grpc.insecure_channel(broker.address))
        answer = share.ShareFetch(pb.ShareFetchRequest(
            group_id="workers", member_id="w1", max_wait_ms=0,
            partitions=[pb.SharePartitionFetch(topic="jobs", partition=1)]), timeout=10)
        assert not answer.partitions[0].error_code
        assert visited() == {("jobs", 1)}
        admin.delete_topic("jobs")
        wait_until(lambda: visited() == set(), 10, "the deleted topic's partition to leave the share tick")
    finally:
        broker.stop()
