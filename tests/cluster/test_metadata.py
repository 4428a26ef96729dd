"""Metadata from any broker names every partition's leader, including partitions it holds no replica of."""

from __future__ import annotations

import time
from collections.abc import Callable

from logbroker_client import Admin, Consumer, Producer, TopicPartition
from logbroker_client.connection import Connection
from logbroker_client.errors import LogbrokerError
from logbroker_client.proto import logbroker_pb2 as pb

from tests.support.brokers import wait_until
from tests.support.cluster import BrokerCluster

TOPIC = "sparse"
PARTITIONS = 3


def leaders_seen_by(cluster: BrokerCluster, node: int) -> list[int]:
    with Admin(cluster.address(node)) as admin:
        metadata = admin.describe_cluster()
    topic = next(t for t in metadata.topics if t.name == TOPIC)
    return [p.leader_id for p in sorted(topic.partitions, key=lambda p: p.partition)]


def test_every_broker_names_the_leaders_of_partitions_it_does_not_host(cluster: BrokerCluster) -> None:
    Admin(cluster.bootstrap).create_topic(TOPIC, partitions=PARTITIONS, replication_factor=1)
    with Admin(cluster.bootstrap) as admin:
        hosts = [p.replicas[0] for p in admin.describe_topics([TOPIC])[0].partitions]
    assert sorted(hosts) == [1, 2, 3]  # replication factor 1: each broker hosts one partition
    for node in (1, 2, 3):
        wait_until(lambda node=node: leaders_seen_by(cluster, node) == hosts, 20,  # type: ignore[misc]
                   f"broker {node} to name every partition's leader")


def knows_topic(cluster: BrokerCluster, node: int) -> bool:
    """Whether broker `node` itself (no other) names the topic without an error in its Metadata answer."""
    conn = Connection(cluster.address(node))
    try:
        answer = conn.broker.Metadata(pb.MetadataRequest(topics=[TOPIC]), timeout=5)
    finally:
        conn.close()
    return all(not t.error_code for t in answer.topics)


def test_a_client_bootstrapped_at_a_broker_without_the_replica_is_sent_to_the_leader(cluster: BrokerCluster) -> None:
    Admin(cluster.bootstrap).create_topic(TOPIC, partitions=PARTITIONS, replication_factor=1)
    with Admin(cluster.bootstrap) as admin:
        hosts = [p.replicas[0] for p in admin.describe_topics([TOPIC])[0].partitions]
    outsider = next(n for n in (1, 2, 3) if n != hosts[0])
    # The outsider learns of the topic when it applies the controller's commit, a moment after the creation
    # returned (a client asking it sooner is told the topic does not exist): this test is about what follows.
    wait_until(lambda: knows_topic(cluster, outsider), 20, f"broker {outsider} to apply the topic's creation")
    with Producer(cluster.address(outsider), acks="all") as producer:
        meta = producer.send(TOPIC, value=b"routed", partition=0).result(timeout=20)
    tp = TopicPartition(TOPIC, 0)
    with Consumer(cluster.address(outsider)) as consumer:
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        records: list = []
        wait_until(lambda: bool(records.extend(consumer.poll(timeout=0.5)) or records), 20, "the record back")
    assert [(r.offset, r.value) for r in records] == [(meta.offset, b"routed")]


def test_describe_from_any_broker_shows_the_leaders_offsets(cluster: BrokerCluster) -> None:
    Admin(cluster.bootstrap).create_topic(TOPIC, partitions=PARTITIONS, replication_factor=1)
    with Admin(cluster.bootstrap) as admin:
        hosts = [p.replicas[0] for p in admin.describe_topics([TOPIC])[0].partitions]
    with Producer(cluster.bootstrap, acks="all") as producer:
        last = [producer.send(TOPIC, value=b"x", partition=p).result(timeout=20).offset for p in range(PARTITIONS)]
    for node in (1, 2, 3):
        def agreed(node: int = node) -> bool:
            with Admin(cluster.address(node)) as admin:
                parts = admin.describe_topics([TOPIC])[0].partitions
            return [(p.leader_id, p.high_watermark) for p in parts] == [
                (hosts[i], last[i] + 1) for i in range(PARTITIONS)]
        wait_until(agreed, 20, f"broker {node} to describe every partition as its leader does")


def test_a_topic_created_without_a_replication_factor_gets_three_or_as_many_brokers_as_are_live(
        cluster: BrokerCluster) -> None:
    def created_with(replicas: int, *nodes: int) -> Callable[[], bool]:
        def attempt() -> bool:
            # The controller counts the brokers it hears from: just after start, or on a loaded machine, one may
            # look silent for a moment; each try is short and names a fresh topic, so such a moment does not
            # hold the test up.
            try:
                with Admin(cluster.bootstrap_of(*nodes), request_timeout_ms=5_000) as admin:
                    name = f"defaults-{time.monotonic_ns()}"
                    admin.create_topic(name)
                    return admin.describe_topics([name])[0].replication_factor == replicas
            except LogbrokerError:
                return False
        return attempt

    wait_until(created_with(3, 1, 2, 3), 40, "a topic created while all three brokers are up to get 3 replicas")
    cluster.kill(3)
    wait_until(lambda: not cluster.brokers[3].running, 10, "broker 3 to be down")
    wait_until(created_with(2, 1, 2), 40, "a topic created while broker 3 is down to get 2 replicas")


def test_a_client_that_reaches_a_broker_cut_off_from_the_others_first_is_sent_where_it_can_go(
        proxied_cluster: BrokerCluster) -> None:
    """Brokers reach each other through proxies (--peers) and clients reach them directly (--advertised-peers):
    every broker names every other at the clients' address, so a client bootstrapped at a broker cut off from
    its peers (not from clients) is not sent through that broker's cut links, and finds the leader elsewhere."""
    cluster = proxied_cluster
    Admin(cluster.bootstrap).create_topic(TOPIC, partitions=1, replication_factor=3)
    wait_until(lambda: all(metadata_answer(cluster, n, TOPIC).topics[0].partitions[0].leader_id > 0 for n in (1, 2, 3)),
               20, "every broker to name the new partition's leader")
    for node in (1, 2, 3):
        named = {b.node_id: f"{b.host}:{b.port}" for b in metadata_answer(cluster, node, TOPIC).brokers}
        assert named == {n: cluster.address(n) for n in (1, 2, 3)}, f"broker {node} names {named}"
    leader = metadata_answer(cluster, 1, TOPIC).topics[0].partitions[0].leader_id
    cut_off = next(n for n in (1, 2, 3) if n != leader)
    cluster.isolate(cut_off)
    with Producer(cluster.address(cut_off), acks="all", request_timeout_ms=5000) as producer:
        written = producer.send(TOPIC, value=b"around the cut", partition=0).result(timeout=30)
    with Admin(cluster.address(leader)) as admin:
        assert admin.describe_topics([TOPIC])[0].partitions[0].leader_id == leader  # not re-elected meanwhile
    assert written.offset >= 0


def metadata_answer(cluster: BrokerCluster, node: int, topic: str) -> pb.MetadataResponse:
    """Broker `node`'s own Metadata answer for `topic` (asked of that broker alone)."""
    conn = Connection(cluster.address(node))
    try:
        return conn.broker.Metadata(pb.MetadataRequest(topics=[topic]), timeout=10)
    finally:
        conn.close()


def test_a_broker_behind_the_controller_never_calls_a_created_topic_missing(proxied_cluster: BrokerCluster) -> None:
    cluster = proxied_cluster
    wait_until(lambda: metadata_answer(cluster, 1, TOPIC).controller_id > 0, 20, "a controller leader")
    controller = metadata_answer(cluster, 1, TOPIC).controller_id
    behind = next(n for n in (1, 2, 3) if n != controller)
    wait_until(lambda: metadata_answer(cluster, behind, "never-created").topics[0].error_code
               == pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, 20, f"broker {behind} to load the cluster metadata")
    # Only the Raft links between the controller leader and `behind` are cut: clients still reach `behind`,
    # and it can still ask the controller leader over gRPC, but it cannot apply the creation.
    cluster.raft_proxies[(controller, behind)].cut()
    cluster.raft_proxies[(behind, controller)].cut()
    Admin(cluster.address(controller)).create_topic(TOPIC, partitions=1, replication_factor=1)

    [seen] = metadata_answer(cluster, behind, TOPIC).topics
    assert seen.error_code == pb.ErrorCode.LEADER_NOT_AVAILABLE, seen
    assert f"topic {TOPIC!r} exists" in seen.error_message and f"broker {behind}" in seen.error_message
    [missing] = metadata_answer(cluster, behind, "never-created").topics
    assert missing.error_code == pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, missing
    # Many unknown names in one request cost one question to the controller leader, not one (and a wait)
    # each: the answer comes within metadata_answer's 10 s deadline.
    unknown = [f"never-{i}" for i in range(300)]
    conn = Connection(cluster.address(behind))
    try:
        answer = conn.broker.Metadata(pb.MetadataRequest(topics=[*unknown, TOPIC]), timeout=10)
    finally:
        conn.close()
    assert [t.error_code for t in answer.topics] == [pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION] * 300 + [
        pb.ErrorCode.LEADER_NOT_AVAILABLE]

    # Cut off from every other broker, it cannot confirm that a topic does not exist either: "not yet".
    cluster.isolate(behind)
    [unconfirmed] = metadata_answer(cluster, behind, "never-created").topics
    assert unconfirmed.error_code == pb.ErrorCode.LEADER_NOT_AVAILABLE, unconfirmed
    assert "could not reach another broker" in unconfirmed.error_message

    cluster.heal()
    with Producer(cluster.address(behind), acks="all") as producer:  # asks again until `behind` has caught up
        written = producer.send(TOPIC, value=b"found", partition=0).result(timeout=20)
    assert (written.topic, written.partition) == (TOPIC, 0)


def partition_answer(cluster: BrokerCluster, node: int, topic: str) -> pb.PartitionMetadata:
    conn = Connection(cluster.address(node))
    try:
        [answer] = conn.broker.Metadata(pb.MetadataRequest(topics=[topic]), timeout=5).topics
    finally:
        conn.close()
    [partition] = answer.partitions
    return partition


def test_a_partition_without_a_live_leader_is_answered_leader_not_available(cluster: BrokerCluster) -> None:
    """A led partition is answered with its leader, epoch and in-sync replicas and no error; once its leader and
    another replica are down, the surviving follower answers no leader (-1) and LEADER_NOT_AVAILABLE, which
    clients retry. (A surviving leader still names itself, as Kafka's does, and refuses writes it cannot commit.)"""
    Admin(cluster.bootstrap).create_topic("leaderless", partitions=1, replication_factor=3)
    wait_until(lambda: len(partition_answer(cluster, 1, "leaderless").isr) == 3, 20, "all three replicas in sync")
    led = partition_answer(cluster, 1, "leaderless")
    assert led.error_code == pb.ErrorCode.NONE and led.leader_id in (1, 2, 3) and led.leader_epoch >= 1, led
    assert sorted(led.replicas) == [1, 2, 3]
    survivor = next(n for n in (1, 2, 3) if n != led.leader_id)
    for node in (1, 2, 3):
        if node != survivor:
            cluster.kill(node)
    wait_until(lambda: partition_answer(cluster, survivor, "leaderless").leader_id == -1, 20,
               f"broker {survivor} to find no live leader")
    leaderless = partition_answer(cluster, survivor, "leaderless")
    assert leaderless.error_code == pb.ErrorCode.LEADER_NOT_AVAILABLE, leaderless
    assert sorted(leaderless.replicas) == [1, 2, 3]
