"""__consumer_offsets stays bounded: snapshots let the segments below them go, and replay still rebuilds
every committed offset, through a restart, from what is left."""

from __future__ import annotations

from pathlib import Path

import grpc
from logbroker_client import Admin
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from tests.support.brokers import InProcessBroker, wait_until
from tests.support.disk import bytes_of_files

TOPIC = "wide"
PARTITIONS = 20
ROUNDS = 300  # 300 commits of 20 offsets with 400 bytes of metadata each: about 2.6 MB written
SEGMENT_BYTES = 64 << 10
SNAPSHOT_TRIGGER_BYTES = 128 << 10
BOUND_BYTES = 1 << 20  # far below the 3 MB written, far above one snapshot (~10 KB) and a few segments


def offsets_dir_bytes(data_dir: Path) -> int:
    return bytes_of_files(data_dir.glob("__consumer_offsets-*/*.log"))


def groups_stub(address: str) -> pb_grpc.GroupsStub:
    """The one broker's Groups service, once it coordinates group "g" (after a restart: once elected)."""
    stub = pb_grpc.GroupsStub(grpc.insecure_channel(address))

    def coordinating() -> bool:
        found = stub.FindCoordinator(pb.FindCoordinatorRequest(group_ids=["g"]), timeout=30).coordinators[0]
        # and serving: a broker that has not yet applied the committed metadata answers "still loading"
        return not found.error_code and not stub.FetchOffsets(pb.FetchOffsetsRequest(group_id="g"),
                                                              timeout=30).error_code

    wait_until(coordinating, 20, "the broker to coordinate group g")
    return stub


def test_the_offsets_log_stays_bounded_and_replays_after_a_restart(tmp_path: Path) -> None:
    settings = {"offsets_segment_bytes": SEGMENT_BYTES, "offsets_snapshot_trigger_bytes": SNAPSHOT_TRIGGER_BYTES,
                "offsets_topic_partitions": 1}
    broker = InProcessBroker(tmp_path / "data", **settings).start()
    try:
        Admin(broker.address).create_topic(TOPIC, partitions=PARTITIONS)
        stub = groups_stub(broker.address)
        for round_number in range(ROUNDS):
            answer = stub.CommitOffsets(pb.CommitOffsetsRequest(group_id="g", member_epoch=-1, offsets=[
                pb.OffsetToCommit(topic=TOPIC, partition=p, offset=round_number * 1000 + p, metadata="m" * 400)
                for p in range(PARTITIONS)]), timeout=30)
            assert not answer.error_code, answer.error_message
        wait_until(lambda: offsets_dir_bytes(tmp_path / "data") < BOUND_BYTES, 20,
                   "the segments below a snapshot to be deleted")
    finally:
        broker.stop()
    restarted = InProcessBroker(tmp_path / "data", **settings).start()
    try:
        stub = groups_stub(restarted.address)
        answers: list[pb.FetchOffsetsResponse] = []
        wait_until(lambda: not answers.append(stub.FetchOffsets(pb.FetchOffsetsRequest(group_id="g"), timeout=30))
                   and not answers[-1].error_code, 20, "the new leader to load the group state")
        fetched = answers[-1]
        assert {o.partition: o.offset for o in fetched.offsets} == {
            p: (ROUNDS - 1) * 1000 + p for p in range(PARTITIONS)}
    finally:
        restarted.stop()
