"""Only brokers speak as brokers: peer RPCs and the Raft port need the cluster secret, and every field is checked.

Over three real brokers. A client without the secret is refused outright; a peer with the secret that
sends forged fields (a term beyond a 32-bit epoch, a report naming another leader) is refused field by
field; in both cases produce and metadata keep working, before and after a restart of every broker.
"""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from logbroker_client import Admin, Producer
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from logbroker.cluster.peer_auth import SECRET_METADATA_KEY
from logbroker.cluster.raft_codec import encode_message
from logbroker.raft.types import Message, MessageType
from tests.support.brokers import REPO_ROOT, free_port, wait_until
from tests.support.cluster import CLUSTER_SECRET_FILE, BrokerCluster
from tests.support.raft_peer import RaftPeerSocket

TOPIC = "guarded"
HOSTILE_TERM = 2**31 + 7


def secret_of(cluster: BrokerCluster) -> tuple[tuple[str, str], ...]:
    return ((SECRET_METADATA_KEY, (cluster.root / CLUSTER_SECRET_FILE).read_text()),)


def forged_heartbeat(raft_address: str, group: str, secret: str, from_node: int = 1,
                     to_node: int = 2) -> RaftPeerSocket:
    """A connection to a broker's Raft port that proves ``secret`` and sends a heartbeat with a term no epoch
    can hold; returned open, for the caller to see whether the broker closes it."""
    heartbeat = encode_message(group, Message(MessageType.HEARTBEAT, from_node, to_node, 5))
    heartbeat.term = HOSTILE_TERM
    peer = RaftPeerSocket(raft_address)
    peer.prove(secret, from_node, to_node)
    peer.send_envelope(pb.RaftEnvelope(from_node=from_node, to_node=to_node, messages=[heartbeat]))
    return peer


def raft_address(cluster: BrokerCluster, node: int) -> str:
    return f"127.0.0.1:{cluster.brokers[node].raft_port}"


def forged_report(address: str, from_node: int, leader: int, topic_id: str,
                  metadata: tuple[tuple[str, str], ...]) -> pb.LeaderReportAck:
    report = pb.LeaderReport(from_node=from_node, leaders=[
        pb.PartitionLeader(topic=TOPIC, partition=0, leader_id=leader, epoch=HOSTILE_TERM - 8, topic_id=topic_id)])
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.RaftStub(channel).ReportLeaders(report, timeout=5, metadata=metadata)


def still_serves(cluster: BrokerCluster, leader: int) -> None:
    with Producer(cluster.bootstrap, acks="all") as producer:
        assert producer.send(TOPIC, value=b"still here", partition=0).result(timeout=20).offset >= 0
    for node in cluster.brokers:  # a broker without a replica learns the leader from the controller's log
        wait_until(lambda node=node: (cluster.metadata_view(node, TOPIC, 0) or (-1,))[0] == leader, 10,
                   f"broker {node} to name broker {leader} as the leader of {TOPIC}-0")


def test_peer_rpcs_without_the_secret_are_refused(cluster: BrokerCluster) -> None:
    with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic(TOPIC, partitions=1, replication_factor=1)
    leader = cluster.leader_of(TOPIC, 0)
    view = cluster.partition_view(leader, TOPIC, 0)
    assert view is not None
    other = next(n for n in cluster.brokers if n != leader)
    controller = cluster.brokers[1].address
    for metadata in ((), ((SECRET_METADATA_KEY, "wrong-secret-of-enough-length"),)):
        with pytest.raises(grpc.RpcError) as refused:
            forged_report(controller, other, other, view.topic_id, metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "cluster secret" in (refused.value.details() or "")
    # The Raft port: a wrong secret, none at all, and bytes that are no handshake are each cut off unheard.
    for secret in ("", "wrong-secret-of-enough-length"):
        with forged_heartbeat(raft_address(cluster, 2), view.topic_id, secret, from_node=1, to_node=2) as peer:
            assert peer.closed_by_broker(), "the broker kept a connection that did not prove the secret"
    with RaftPeerSocket(raft_address(cluster, 2)) as peer:
        peer.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\xff" * 64)
        assert peer.closed_by_broker()
    still_serves(cluster, leader)
    assert "does not carry this cluster's secret" in cluster.brokers[1].log_text()
    log = cluster.brokers[2].log_text()
    assert "refused a connection to the Raft port of node 2" in log and "does not prove this cluster's secret" in log
    assert "wrong greeting" in log


def test_forged_fields_from_a_peer_are_refused_and_change_nothing(cluster: BrokerCluster) -> None:
    with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic(TOPIC, partitions=1, replication_factor=1)
    leader = cluster.leader_of(TOPIC, 0)
    view = cluster.partition_view(leader, TOPIC, 0)
    assert view is not None
    other = next(n for n in cluster.brokers if n != leader)
    secret = secret_of(cluster)
    # A report that another broker leads a partition it holds no replica of; and one naming a third broker.
    for from_node, named in ((other, other), (other, leader)):
        answers = [forged_report(cluster.brokers[n].address, from_node, named, view.topic_id, secret)
                   for n in cluster.brokers]
        assert all(a.error_code for a in answers), f"a forged report was accepted: {answers}"
    # A heartbeat whose term no 32-bit epoch can hold, in the partition's real group, to its leader.
    group = f"{TOPIC}-0@{view.topic_id}"
    raft_secret = (cluster.root / CLUSTER_SECRET_FILE).read_text()
    with forged_heartbeat(raft_address(cluster, leader), group, raft_secret, from_node=other, to_node=leader):
        pass
    wait_until(lambda: f"term {HOSTILE_TERM} is outside" in cluster.brokers[leader].log_text(), 10,
               f"broker {leader} to refuse the forged term")
    still_serves(cluster, leader)
    for node in cluster.brokers:
        cluster.kill(node)
    for node in cluster.brokers:
        cluster.restart(node, wait=False)
    cluster.wait_serving()
    leader = cluster.leader_of(TOPIC, 0)
    still_serves(cluster, leader)


def test_a_multi_broker_serve_without_a_secret_refuses_to_start(tmp_path: object) -> None:
    peers = f"1=127.0.0.1:{free_port()},2=127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "logbroker.server.cli", "serve", "--node-id", "1", "--data-dir", str(tmp_path),
         "--listen", peers.split(",")[0].split("=")[1], "--peers", peers],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 2
    assert "needs a shared secret" in result.stderr and "--cluster-secret-file" in result.stderr

