"""Three real broker processes (raft tick 20 ms), faults injected, every acknowledged record checked.

Each test runs a load of sequence-numbered acks=all records (tests.support.checker.ProducerLoad),
injects a fault (SIGKILL, SIGSTOP, a network cut through FaultProxy, restarts), reads every partition
back from offset 0 and runs the checker: no acknowledged record lost, moved, duplicated or reordered.
When a test fails, the fixture prints the tail of every broker's log.
"""

from __future__ import annotations

import time

import grpc
from logbroker_client import Admin, Producer
from logbroker_client import records as rec
from logbroker_client.connection import Connection
from logbroker_client.errors import (
    LeaderNotAvailableError,
    NotEnoughReplicasError,
    NotLeaderError,
    RequestTimedOutError,
)
from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.storage.filenames import partition_dir_name
from tests.support.brokers import wait_until
from tests.support.checker import AckLog, ProducerLoad, assert_clean, make_value, read_log
from tests.support.cluster import BrokerCluster
from tests.support.metrics_scrape import native_fsyncs

TOPIC = "orders"
PARTITIONS = 3
ACKED_AFTER_FAULT = 2000
PAUSE_AT_LEAST_S = 2.0
SMALL_SEGMENT_BYTES = 65536
CATCH_UP_RECORDS = 4000
CATCH_UP_VALUE_BYTES = 200  # 4000 x ~230 bytes on disk: about 14 segments of 64 KiB
CATCH_UP_FLUSH_EVERY = 50
QUORUM_REQUEST_TIMEOUT_MS = 1000
QUORUM_DELIVERY_TIMEOUT_MS = 3000
SIGTERM_LIMIT_S = 3.0  # leadership hand-over and closing the logs take well under a second


def create_topic(cluster: BrokerCluster, partitions: int = PARTITIONS, configs: dict[str, str] | None = None,
                 name: str = TOPIC) -> None:
    with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic(name, partitions=partitions, replication_factor=3, configs=configs)
    for partition in range(partitions):
        cluster.leader_of(name, partition)


def check_everything(cluster: BrokerCluster, acks: AckLog, partitions: int = PARTITIONS, topic: str = TOPIC) -> None:
    """Let every replica catch up, read every partition back, and run the checker."""
    for partition in range(partitions):
        cluster.wait_caught_up(topic, partition)
    log = read_log(cluster.bootstrap, topic, range(partitions), timeout_s=60)
    print(f"checking {acks.summary()}")
    assert_clean(acks.snapshot(), log, context=f"{acks.summary()}\n")
    stored = sum(len(records) for records in log.values())
    assert stored >= acks.count(), f"read {stored} records, fewer than the {acks.count()} acknowledged"


# ----------------------------------------------------------------------------------------- 1. SIGKILL


def test_sigkill_of_the_leader_under_load_loses_nothing(metered_cluster: BrokerCluster) -> None:
    cluster = metered_cluster
    create_topic(cluster)
    acks = AckLog()
    load = ProducerLoad(cluster.bootstrap, TOPIC, PARTITIONS, acks).start()
    load.wait_acked(3000, 30, "before the kill")
    leader = cluster.leader_of(TOPIC, 0)
    # The kill strikes appends written on the event loop and fsynced by the native threads, not only the pool's.
    assert native_fsyncs(cluster, leader) > 0, f"broker {leader}'s native fsync threads ran no fsync"
    survivors = [node for node in cluster.brokers if node != leader]
    at_kill = acks.count()
    killed_ms = time.time() * 1000
    cluster.kill(leader)
    load.wait_acked(at_kill + ACKED_AFTER_FAULT, 60, f"after SIGKILL of broker {leader}")
    new_leader = cluster.leader_of(TOPIC, 0, exclude=(leader,))
    assert_leader_since_after(cluster, survivors, new_leader, killed_ms)
    cluster.restart(leader)
    load.wait_acked(acks.count() + 500, 30, f"after restarting broker {leader}")
    load.stop()
    assert new_leader != leader
    check_everything(cluster, acks)


def assert_leader_since_after(cluster: BrokerCluster, survivors: list[int], new_leader: int, killed_ms: float) -> None:
    """Each survivor's own replica of partition 0 names the new leader, seen since the kill (what
    benchmarks.many_partitions reads to time a failover after the fact)."""
    with Admin(cluster.bootstrap, request_timeout_ms=10_000) as admin:
        wait_until(lambda: all(view.leader_id == new_leader for view in
                               admin.replica_views(TOPIC, 0, survivors).values()), 10, "the survivors to agree")
        views = admin.replica_views(TOPIC, 0, survivors)
    assert sorted(views) == sorted(survivors)
    for view in views.values():
        assert killed_ms <= view.leader_since_ms <= time.time() * 1000, (view, killed_ms)


# ---------------------------------------------------------------------------------------- 2. SIGSTOP


def test_sigstop_of_the_leader_then_sigcont_steps_it_down_and_it_catches_up(cluster: BrokerCluster) -> None:
    create_topic(cluster)
    acks = AckLog()
    load = ProducerLoad(cluster.bootstrap, TOPIC, PARTITIONS, acks).start()
    load.wait_acked(3000, 30, "before the pause")
    leader = cluster.leader_of(TOPIC, 0)
    at_pause = acks.count()
    cluster.pause(leader)
    paused_at = time.monotonic()
    new_leader = cluster.leader_of(TOPIC, 0, exclude=(leader,))
    load.wait_acked(at_pause + ACKED_AFTER_FAULT, 60, f"through broker {new_leader} while broker {leader} is paused")
    # Stopped for far longer than the election timeout (at most 2 x 10 ticks = 400 ms), whatever the load did.
    wait_until(lambda: time.monotonic() - paused_at >= PAUSE_AT_LEAST_S, PAUSE_AT_LEAST_S + 1, "the pause to last")
    cluster.resume(leader)
    load.wait_acked(acks.count() + 500, 30, f"after resuming broker {leader}")
    load.stop()
    views = cluster.wait_caught_up(TOPIC, 0)
    assert views[leader].leader_id == new_leader, f"the old leader did not step down: {views[leader]}"
    assert cluster.current_leader(TOPIC, 0) == new_leader
    wait_until(lambda: leader in (cluster.partition_view(new_leader, TOPIC, 0) or views[leader]).isr, 10,
               f"broker {leader} back in the in-sync replicas of {TOPIC}-0")
    check_everything(cluster, acks)


# ------------------------------------------------------------------------------------ 3. network cut


def produce_directly(address: str, batch: bytes) -> pb.PartitionProduceResult | None:
    """One acks=all Produce of partition 0 to the broker at address alone; None if the call itself failed."""
    conn = Connection(address)
    try:
        request = pb.ProduceRequest(acks=-1, timeout_ms=1000, partitions=[
            pb.PartitionRecords(topic=TOPIC, partition=0, records=batch)])
        return conn.broker.Produce(request, timeout=30).results[0]
    except grpc.RpcError:
        return None
    finally:
        conn.close()


def test_cut_off_leader_rejoins_without_deposing_the_new_leader(proxied_cluster: BrokerCluster) -> None:
    cluster = proxied_cluster
    create_topic(cluster)
    leader = cluster.leader_of(TOPIC, 0)
    others = [n for n in cluster.brokers if n != leader]
    acks = AckLog()
    load = ProducerLoad(cluster.bootstrap_of(*others), TOPIC, PARTITIONS, acks).start()
    load.wait_acked(2000, 30, "before the cut")
    at_cut = acks.count()
    cluster.isolate(leader)
    new_leader = cluster.leader_of(TOPIC, 0, exclude=(leader,))
    # The cut-off broker may still think it leads for an election timeout, but it must never acknowledge
    # an acks=all write: it cannot reach a majority (check-quorum then makes it step down). Asked directly:
    # a client that follows leaders is sent on to the new one, which clients still reach.
    answer = produce_directly(cluster.address(leader), rec.build_batch(
        [(int(time.time() * 1000), None, b"written-to-the-cut-off-leader", [])]))
    assert answer is None or answer.error_code != pb.ErrorCode.NONE, (
        f"the cut-off broker {leader} acknowledged an acks=all write: {answer}")
    load.wait_acked(at_cut + ACKED_AFTER_FAULT, 60, f"through the others while broker {leader} is cut off")
    before_heal = cluster.metadata_view(new_leader, TOPIC, 0)
    assert before_heal is not None and before_heal[0] == new_leader
    cluster.heal()
    load.wait_acked(acks.count() + 500, 30, "after healing")
    load.stop()
    views = cluster.wait_caught_up(TOPIC, 0)
    assert views[leader].leader_id == new_leader
    after_heal = cluster.metadata_view(new_leader, TOPIC, 0)
    rejoined = cluster.metadata_view(leader, TOPIC, 0)
    # Pre-vote: the isolated broker did not inflate its term, so rejoining forced no election.
    assert after_heal == before_heal, f"the healthy leader was deposed: {before_heal} -> {after_heal}"
    assert rejoined == before_heal, f"the rejoined broker sees {rejoined}, the leader {after_heal}"
    check_everything(cluster, acks)


# ---------------------------------------------------------------------------------- 4. rolling restart


def test_rolling_restart_under_load(cluster: BrokerCluster) -> None:
    create_topic(cluster)
    acks = AckLog()
    load = ProducerLoad(cluster.bootstrap, TOPIC, PARTITIONS, acks).start()
    load.wait_acked(2000, 30, "before the rolling restart")
    for node in sorted(cluster.brokers):
        code = cluster.terminate(node)
        assert code == 0, f"broker {node} exited with {code} on SIGTERM"
        assert "closed every partition cleanly" in cluster.brokers[node].log_tail(20)
        cluster.restart(node)
        load.wait_acked(acks.count() + 1000, 60, f"after restarting broker {node}")
        for partition in range(PARTITIONS):  # back in step before the next broker goes down
            leader = cluster.leader_of(TOPIC, partition)
            view = cluster.partition_view(leader, TOPIC, partition)
            assert view is not None
            cluster.wait_high_watermark(TOPIC, partition, node, view.high_watermark)
    load.stop()
    check_everything(cluster, acks)


def test_sigterm_in_a_cluster_does_not_wait_for_the_whole_grace(cluster: BrokerCluster) -> None:
    create_topic(cluster)
    started = time.monotonic()
    assert cluster.terminate(2) == 0
    elapsed = time.monotonic() - started
    assert elapsed < SIGTERM_LIMIT_S, f"SIGTERM took {elapsed:.1f}s"


# ------------------------------------------------------------------------ 5. catch-up over many segments


def test_a_broker_down_while_many_segments_are_written_catches_up(cluster: BrokerCluster) -> None:
    topic = "segmented"
    create_topic(cluster, partitions=1, configs={"segment.bytes": str(SMALL_SEGMENT_BYTES)}, name=topic)
    leader = cluster.leader_of(topic, 0)
    follower = next(n for n in sorted(cluster.brokers) if n != leader)
    assert cluster.terminate(follower) == 0
    acks = AckLog()
    produce_burst(cluster, topic, acks, flush_every=CATCH_UP_FLUSH_EVERY)
    leader_segments = segment_count(cluster, leader, topic)
    assert leader_segments >= 5, f"only {leader_segments} segments were written; the test wants several"
    cluster.restart(follower)
    views = cluster.wait_caught_up(topic, 0)
    assert views[follower].high_watermark == views[leader].high_watermark
    # What the follower holds on disk is the whole acknowledged log: stop it and read its files.
    assert cluster.terminate(follower) == 0
    local = cluster.read_local_partition(follower, topic, 0, views[follower].high_watermark)
    assert_clean(acks.snapshot(), {0: local}, context=f"broker {follower}'s own copy: ")
    cluster.restart(follower)
    check_everything(cluster, acks, partitions=1, topic=topic)


def produce_burst(cluster: BrokerCluster, topic: str, acks: AckLog, flush_every: int | None = None) -> None:
    with Producer(cluster.bootstrap, acks="all", linger_ms=5, batch_size=16384) as producer:
        for seq in range(CATCH_UP_RECORDS):
            value = make_value(seq, size=CATCH_UP_VALUE_BYTES)
            producer.send(topic, value=value, partition=0).add_done_callback(acks.callback(value))
            if flush_every and seq % flush_every == flush_every - 1:
                producer.flush(timeout=30)
        producer.flush(timeout=60)
    assert acks.count() == CATCH_UP_RECORDS, acks.summary()


def test_segments_respect_segment_bytes_under_a_burst(cluster: BrokerCluster) -> None:
    topic = "burst"
    create_topic(cluster, partitions=1, configs={"segment.bytes": str(SMALL_SEGMENT_BYTES)}, name=topic)
    leader = cluster.leader_of(topic, 0)
    produce_burst(cluster, topic, AckLog())
    directory = cluster.brokers[leader].data_dir / partition_dir_name(topic, 0)
    sizes = sorted(path.stat().st_size for path in directory.glob("*.log"))
    # A segment may exceed segment.bytes only by its one last batch (at most the producer's 16 KiB + overhead).
    assert sizes[-1] <= SMALL_SEGMENT_BYTES + 16384 + 1024, f"segment sizes {sizes} with segment.bytes=65536"


def segment_count(cluster: BrokerCluster, node: int, topic: str) -> int:
    return len(list((cluster.brokers[node].data_dir / partition_dir_name(topic, 0)).glob("*.log")))


# ------------------------------------------------------------------------------------- 6. quorum loss


def test_quorum_loss_fails_acks_all_writes_in_time(cluster: BrokerCluster) -> None:
    quorum_loss_error(cluster)


def quorum_loss_error(cluster: BrokerCluster) -> BaseException:
    """Kill both followers of a partition and return the error of an acks=all write to the lone leader."""
    topic = "quorum"
    create_topic(cluster, partitions=1, name=topic)
    leader = cluster.leader_of(topic, 0)
    with Producer(cluster.address(leader), acks="all") as producer:
        producer.send(topic, value=b"before", partition=0).result(timeout=10)
    for node in cluster.brokers:
        if node != leader:
            cluster.kill(node)
    started = time.monotonic()
    with Producer(cluster.address(leader), acks="all", linger_ms=0, request_timeout_ms=QUORUM_REQUEST_TIMEOUT_MS,
                  delivery_timeout_ms=QUORUM_DELIVERY_TIMEOUT_MS, max_block_ms=2000) as producer:
        future = producer.send(topic, value=b"after", partition=0)
        error = future.exception(timeout=QUORUM_DELIVERY_TIMEOUT_MS / 1000 + 10)
        elapsed = time.monotonic() - started
    assert error is not None, "a lone broker acknowledged an acks=all write"
    assert isinstance(error, (NotEnoughReplicasError, RequestTimedOutError, NotLeaderError, LeaderNotAvailableError)), \
        f"{type(error).__name__}: {error}"
    limit_s = (QUORUM_DELIVERY_TIMEOUT_MS + QUORUM_REQUEST_TIMEOUT_MS) / 1000 + 2
    assert elapsed < limit_s, f"the write failed only after {elapsed:.1f}s (limit {limit_s}s)"
    return error


def test_quorum_loss_is_reported_as_not_enough_replicas(cluster: BrokerCluster) -> None:
    error = quorum_loss_error(cluster)
    assert isinstance(error, (NotEnoughReplicasError, LeaderNotAvailableError)), f"{type(error).__name__}: {error}"
