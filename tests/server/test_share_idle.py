"""An idle share consumer costs its partition's log nothing: waiting fetches write no share state."""

from __future__ import annotations

from pathlib import Path

import grpc
from logbroker_client import Admin
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from tests.support.brokers import InProcessBroker

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
