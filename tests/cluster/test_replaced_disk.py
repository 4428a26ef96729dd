"""A broker whose disk was replaced must not vote in a partition's election before it has caught up, also when the
metadata log does not name the partition's leader (its leader died before its election was recorded): the disk's
registration in the metadata log tells partitions older than the disk from new ones (disk_identity.py)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from logbroker_client import Admin, Producer

from logbroker.cluster.metadata import CONTROLLER_GROUP
from logbroker.cluster.raft_storage import ReplicaState
from logbroker.cluster.state_log import RaftStateLog
from logbroker.server.controller_client import CONTROLLER_DIR
from logbroker.server.disk_identity import METADATA_CATCH_UP_FILE, load_or_create_disk_id
from tests.cluster.test_metadata import metadata_answer
from tests.support.brokers import wait_until
from tests.support.checker import AckLog, assert_clean, make_value, read_log
from tests.support.cluster import BrokerCluster, ReplicaView

TOPIC = "unrecorded"
PARTITIONS = 3  # at RF3 on three brokers, each broker is the preferred leader of one partition
LEADER_TIMEOUT_S = 20.0
WATCH_S = 2.0  # how long the survivors get to elect a leader lacking the acknowledged records
RESTART_WATCH_S = 1.5  # the same after the replaced broker restarts (its marker file read back: several timeouts)


def produce(bootstrap: str, partition: int, first_seq: int, count: int, acks: AckLog) -> None:
    before = acks.count()
    with Producer(bootstrap, acks="all", linger_ms=2, request_timeout_ms=5000) as producer:
        for seq in range(first_seq, first_seq + count):
            value = make_value(seq, size=100)
            producer.send(TOPIC, value=value, partition=partition).add_done_callback(acks.callback(value))
        producer.flush(timeout=LEADER_TIMEOUT_S)
    assert acks.count() == before + count, acks.summary()


@pytest.mark.slow  # in three brokers the metadata log's own wait (the next test) now holds this case first
def test_a_replaced_disk_does_not_vote_for_a_lagging_replica_when_no_leader_was_recorded(
        proxied_cluster: BrokerCluster) -> None:
    """Leader L's reports to the controller leader C are cut off, so the metadata never names L as the partition's
    leader. Records are acknowledged by L and C while the third broker B is cut off; then C's disk is replaced and
    L is killed. B and the empty C are a majority, but C acknowledged records B lacks: C must not vote until it
    has caught up, and no leader may be elected without them before L returns."""
    cluster = proxied_cluster
    wait_until(lambda: metadata_answer(cluster, 1, TOPIC).controller_id > 0, 20, "a controller leader")
    controller = metadata_answer(cluster, 1, TOPIC).controller_id
    leader, lagging = [n for n in sorted(cluster.brokers) if n != controller]
    cluster.proxies[(leader, controller)].cut()  # L's gRPC calls to C, its leader reports among them; Raft flows

    with Admin(cluster.address(controller), request_timeout_ms=int(LEADER_TIMEOUT_S * 1000)) as admin:
        admin.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=3)
        placement = [list(p.replicas) for p in admin.describe_topics([TOPIC])[0].partitions]
    partition = next(i for i, replicas in enumerate(placement) if replicas[0] == leader)
    assert cluster.leader_of(TOPIC, partition, timeout_s=LEADER_TIMEOUT_S) == leader
    acks = AckLog()
    produce(cluster.bootstrap, partition, 0, 20, acks)
    cluster.wait_caught_up(TOPIC, partition)

    # Cut off rather than frozen: a frozen broker finds the appends in its socket buffers when it resumes.
    cluster.isolate(lagging)
    produce(cluster.bootstrap_of(leader, controller), partition, 20, 50, acks)  # held by L and C only
    acked_end = max(offset for _, offset in acks.snapshot().values())
    cluster.brokers[controller].replace_disk()
    cluster.kill(leader)
    cluster.heal()  # L's reports never reached C, and L is gone
    # Not serving yet: its metadata log waits to catch up too, and B alone cannot elect a controller leader (the
    # metadata log may also hold entries B lacks), so it serves once L is back (the next test is about that).
    cluster.brokers[controller].launch()

    watch_no_leader_lacking(cluster, partition, [controller, lagging], acked_end)

    cluster.brokers[leader].launch()
    cluster.wait_serving(leader, controller)
    cluster.wait_caught_up(TOPIC, partition, timeout_s=LEADER_TIMEOUT_S)
    assert_clean(acks.snapshot(), read_log(cluster.bootstrap, TOPIC, [partition], timeout_s=LEADER_TIMEOUT_S),
                 f"leader {leader}, replaced {controller}, lagging {lagging}: ")


def watch_no_leader_lacking(cluster: BrokerCluster, partition: int, nodes: list[int],
                            acked_end: int) -> list[ReplicaView]:
    """For WATCH_S, assert that none of `nodes` leads the partition with a log ending at or below acked_end (each
    broker asked about its own replica); returns every view seen."""
    seen: list[ReplicaView] = []
    deadline = time.monotonic() + WATCH_S
    while time.monotonic() < deadline:
        for node, view in cluster.views(TOPIC, partition, nodes).items():
            assert not (view.leader_id == node and view.local_replica and view.log_end_offset <= acked_end), (
                f"broker {node} leads {TOPIC}-{partition} with log end {view.log_end_offset}, lacking acknowledged "
                f"offset {acked_end}: the replaced disk voted before it caught up")
            seen.append(view)
        time.sleep(0.1)
    return seen


def controller_leader_seen_by(cluster: BrokerCluster, node: int) -> int | None:
    """The controller leader broker `node` knows of (-1: none), or None if it does not answer yet."""
    try:
        return metadata_answer(cluster, node, TOPIC).controller_id
    except Exception:  # noqa: BLE001 - starting, not listening yet
        return None


def delete_metadata_log(cluster: BrokerCluster, node: int) -> None:
    """The metadata log's directory alone: the broker's Raft state log keeps the group's term and vote."""
    cluster.kill(node)
    shutil.rmtree(cluster.brokers[node].data_dir / CONTROLLER_DIR)


def replace_disk(cluster: BrokerCluster, node: int) -> None:
    cluster.brokers[node].replace_disk()


@pytest.mark.parametrize("damage", [replace_disk, pytest.param(delete_metadata_log, marks=pytest.mark.slow)],
                         ids=["disk-replaced", "metadata-directory-deleted"])
def test_a_replaced_disk_does_not_vote_in_the_metadata_log_before_it_has_caught_up(
        proxied_cluster: BrokerCluster, damage: object) -> None:
    """A topic is created while broker B is cut off, so the metadata log holds it on the controller leader C and on X
    only. X loses its metadata log (its disk replaced, or the log's directory deleted) and C is killed: B and the
    empty X are a majority of the metadata log's voters, but X acknowledged the creation B lacks. X must not vote
    until it has caught up, so no controller leader may be elected before C returns, and the topic must survive
    on every broker."""
    cluster = proxied_cluster
    wait_until(lambda: (controller_leader_seen_by(cluster, 1) or 0) > 0, 20, "a controller leader")
    controller = metadata_answer(cluster, 1, TOPIC).controller_id
    replaced, lagging = [n for n in sorted(cluster.brokers) if n != controller]
    wait_until(lambda: all(controller_leader_seen_by(cluster, n) == controller for n in cluster.brokers), 20,
               "every broker to know the controller leader")

    cluster.isolate(lagging)
    with Admin(cluster.address(controller), request_timeout_ms=int(LEADER_TIMEOUT_S * 1000)) as admin:
        admin.create_topic(TOPIC, partitions=1, replication_factor=1)  # committed by the controller and X alone
    damage(cluster, replaced)  # type: ignore[operator]
    cluster.kill(controller)
    cluster.heal()
    cluster.brokers[replaced].launch()
    assert_no_controller_leader_among(cluster, replaced, lagging, controller)
    marker = cluster.brokers[replaced].data_dir / METADATA_CATCH_UP_FILE
    assert marker.exists()
    cluster.kill(replaced)  # restarted before it caught up: it still waits
    cluster.brokers[replaced].launch()
    assert_no_controller_leader_among(cluster, replaced, lagging, controller, watch_s=RESTART_WATCH_S)

    cluster.brokers[controller].launch()
    cluster.wait_serving()
    for node in cluster.brokers:
        wait_until(lambda node=node: not metadata_answer(cluster, node, TOPIC).topics[0].error_code,  # type: ignore[misc]
                   LEADER_TIMEOUT_S, f"broker {node} to name topic {TOPIC}, created while broker {lagging} was cut off")
    wait_until(lambda: not marker.exists(), LEADER_TIMEOUT_S, f"broker {replaced} to finish catching up")


def test_a_new_cluster_whose_metadata_wait_ended_without_being_saved_still_elects(tmp_path: Path) -> None:
    """A new cluster's brokers end their metadata log's wait together (the bootstrap rule) and remove
    metadata.catch-up; were all of them killed before the end of the wait was saved, each would restart with its
    saved Raft state still waiting, an empty log and no file. Each must end that wait again, or no broker votes
    and the cluster never elects its first controller leader."""
    for node in (1, 2, 3):
        data_dir = tmp_path / f"broker-{node}"
        data_dir.mkdir()
        load_or_create_disk_id(data_dir)
        states = RaftStateLog.open(data_dir)
        states.save(CONTROLLER_GROUP, ReplicaState(voters=(1, 2, 3), catching_up=True))
        states.close()
    with BrokerCluster(tmp_path) as cluster:  # started: each serves once its disk registration is applied,
        # which takes a controller leader
        assert all(not (b.data_dir / METADATA_CATCH_UP_FILE).exists() for b in cluster.brokers.values())


def assert_no_controller_leader_among(cluster: BrokerCluster, replaced: int, lagging: int, down: int,
                                      watch_s: float = WATCH_S) -> None:
    deadline = time.monotonic() + watch_s
    while time.monotonic() < deadline:
        for node in (replaced, lagging):
            seen = controller_leader_seen_by(cluster, node)
            assert seen not in (replaced, lagging), (
                f"broker {node} names broker {seen} the controller leader while broker {down}, which holds the "
                f"metadata log's newest entries, is down: the replaced disk of broker {replaced} voted before it "
                "caught up")
        time.sleep(0.1)


@pytest.mark.slow  # five brokers, about 8 s: make test-slow
def test_with_five_brokers_a_replaced_disk_replays_the_metadata_but_holds_its_replica_back(
        proxied_cluster_of_five: BrokerCluster) -> None:
    """The partition-level rule where the metadata log stays available: with five brokers, a replaced disk and a
    dead broker still leave three intact metadata voters, so W (the replaced disk) replays the metadata, registers
    and serves. L's leader reports reach nobody (its gRPC links are cut), so the metadata never names L the
    partition's leader. Records are acked by L and W while B is cut off; L dies, W's disk is replaced. W must
    hold its replica back (the topic is older than its disk): B and W must not elect B, which lacks them."""
    cluster = proxied_cluster_of_five
    wait_until(lambda: (controller_leader_seen_by(cluster, 1) or 0) > 0, 20, "a controller leader")
    controller = metadata_answer(cluster, 1, TOPIC).controller_id
    for proxy in cluster.proxies.values():  # every broker's gRPC calls to the others (leader reports); Raft flows
        proxy.cut()
    with Admin(cluster.address(controller), request_timeout_ms=int(LEADER_TIMEOUT_S * 1000)) as admin:
        admin.create_topic(TOPIC, partitions=len(cluster.brokers), replication_factor=3)
        placement = [list(p.replicas) for p in admin.describe_topics([TOPIC])[0].partitions]
    # A partition whose leader is not the controller leader: its election is never recorded in the metadata.
    partition = next(i for i, replicas in enumerate(placement) if replicas[0] != controller)
    leader, replaced, lagging = placement[partition]
    assert cluster.leader_of(TOPIC, partition, timeout_s=LEADER_TIMEOUT_S) == leader  # the preferred leader
    for (source, _), proxy in cluster.proxies.items():
        if source != leader:
            proxy.heal()
    acks = AckLog()
    produce(cluster.bootstrap_of(leader), partition, 0, 20, acks)
    cluster.wait_caught_up(TOPIC, partition, nodes=[leader, replaced, lagging])

    cluster.isolate(lagging)
    produce(cluster.bootstrap_of(leader), partition, 20, 50, acks)  # held by L and W only
    acked_end = max(offset for _, offset in acks.snapshot().values())
    cluster.brokers[replaced].replace_disk()
    cluster.kill(leader)
    cluster.heal()
    cluster.brokers[replaced].launch()
    cluster.wait_serving(replaced)  # the metadata log has a leader among the three intact brokers
    wait_until(lambda: (view := cluster.partition_view(replaced, TOPIC, partition)) is not None and view.local_replica,
               LEADER_TIMEOUT_S, f"broker {replaced} to open its replica of {TOPIC}-{partition}")

    seen = watch_no_leader_lacking(cluster, partition, [replaced, lagging], acked_end)
    held_back = any(view.node == replaced and view.catching_up for view in seen)

    cluster.brokers[leader].launch()
    cluster.wait_serving()
    cluster.wait_caught_up(TOPIC, partition, nodes=[leader, replaced, lagging], timeout_s=LEADER_TIMEOUT_S)
    assert_clean(acks.snapshot(), read_log(cluster.bootstrap, TOPIC, [partition], timeout_s=LEADER_TIMEOUT_S),
                 f"leader {leader}, replaced {replaced}, lagging {lagging}: ")
    assert held_back, f"broker {replaced} never said its replica of {TOPIC}-{partition} waits to catch up"


@pytest.mark.slow  # about 5 s: make test-slow
def test_a_two_replica_partition_elects_its_intact_replica_after_the_other_disk_is_replaced(
        cluster: BrokerCluster) -> None:
    """RF2: every record acknowledged was on both replicas, so the intact one holds them all. Broker B's disk is
    replaced and both replicas restart: B waits to catch up before it votes, as every replaced disk does, yet it
    votes for the partition's only other voter, A, which must lead again with every acknowledged record (A
    cannot win without B's vote; before, the partition stayed without a leader)."""
    with Admin(cluster.bootstrap, request_timeout_ms=int(LEADER_TIMEOUT_S * 1000)) as admin:
        admin.create_topic(TOPIC, partitions=1, replication_factor=2)
        intact, replaced = admin.describe_topics([TOPIC])[0].partitions[0].replicas
    acks = AckLog()
    produce(cluster.bootstrap, 0, 0, 100, acks)
    cluster.kill(replaced)
    cluster.brokers[replaced].replace_disk()
    cluster.kill(intact)
    cluster.brokers[intact].launch()
    cluster.brokers[replaced].launch()
    cluster.wait_serving(intact, replaced)

    assert cluster.leader_of(TOPIC, 0, timeout_s=LEADER_TIMEOUT_S) == intact
    cluster.wait_caught_up(TOPIC, 0, [intact, replaced], timeout_s=LEADER_TIMEOUT_S)
    assert_clean(acks.snapshot(), read_log(cluster.bootstrap, TOPIC, [0], timeout_s=LEADER_TIMEOUT_S),
                 f"intact {intact}, replaced {replaced}: ")
