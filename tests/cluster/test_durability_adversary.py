"""Adversarial durability tests on three real broker processes: what operators really do to a cluster.

The promise: a record acknowledged with acks=all on a 3-broker cluster survives kill -9 of any broker, of
all of them at once, restarts, damaged files and a replica whose data directory was lost, as long as one
replica that held it comes back with its disk. Every test checks every acknowledged record is present
exactly once, at its acknowledged offset, in order (tests/support/checker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from logbroker_client import Admin, Producer

from logbroker.server.maintenance import Maintenance
from logbroker.storage import filenames
from logbroker.storage.config import LogConfig
from logbroker.storage.errors import LogDirectoryError
from logbroker.storage.filenames import partition_dir_name
from tests.support.brokers import wait_until
from tests.support.checker import AckLog, ProducerLoad, assert_clean, make_value, read_log
from tests.support.cluster import BrokerCluster

SMALL_SEGMENT_BYTES = 4096  # rolls every few dozen records: recovery crosses segments, the checkpoint lags
LOAD_RATE_PER_S = 1500.0
ACKS_PER_ROUND = 300


def create_topic(cluster: BrokerCluster, topic: str, partitions: int = 1) -> None:
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic(topic, partitions=partitions, replication_factor=3,
                           configs={"segment.bytes": str(SMALL_SEGMENT_BYTES)})
    for partition in range(partitions):
        cluster.leader_of(topic, partition)


def produce_sequence(bootstrap: str, topic: str, first_seq: int, count: int, acks: AckLog) -> None:
    """acks=all records with sequence numbers first_seq.. to partition 0; every one must be acknowledged."""
    before = acks.count()
    # Small batches, so the log has many of them and its 4 KiB segments roll often.
    with Producer(bootstrap, acks="all", linger_ms=2, batch_size=512) as producer:
        for seq in range(first_seq, first_seq + count):
            value = make_value(seq, size=100)
            producer.send(topic, value=value, partition=0).add_done_callback(acks.callback(value))
        producer.flush(timeout=60)
    assert acks.count() == before + count, acks.summary()


def restart_all(cluster: BrokerCluster) -> None:
    for broker in cluster.brokers.values():
        broker.launch()
    cluster.wait_serving()


def kill_all_at_once(cluster: BrokerCluster) -> None:
    """SIGKILL to every broker before waiting for any: none sees another go first."""
    for broker in cluster.brokers.values():
        assert broker.proc is not None
        broker.proc.kill()
    for broker in cluster.brokers.values():
        broker.stop()  # reaps it


def partition_dir(cluster: BrokerCluster, node: int, topic: str, partition: int = 0) -> Path:
    return cluster.brokers[node].data_dir / partition_dir_name(topic, partition)


def check_everything_acknowledged(cluster: BrokerCluster, topic: str, acks: AckLog, partitions: int = 1,
                                  context: str = "") -> None:
    log = read_log(cluster.bootstrap, topic, range(partitions))
    assert_clean(acks.snapshot(), log, context)


@pytest.mark.slow
def test_kill_every_broker_at_once_under_load_repeatedly(cluster: BrokerCluster) -> None:
    """kill -9 of the three brokers together, three times, in the middle of an acks=all load on two
    partitions whose segments roll every few dozen records."""
    topic = "kill-all"
    create_topic(cluster, topic, partitions=2)
    acks = AckLog()
    load = ProducerLoad(cluster.bootstrap, topic, 2, acks, rate_per_s=LOAD_RATE_PER_S, value_size=100).start()
    try:
        for round_number in range(1, 4):
            load.wait_acked(ACKS_PER_ROUND * round_number, timeout_s=60, what=f"before crash {round_number}")
            kill_all_at_once(cluster)
            restart_all(cluster)
        load.wait_acked(ACKS_PER_ROUND * 4, timeout_s=60, what="after the last restart")
    finally:
        load.stop()
    for broker in cluster.brokers.values():
        segments = [name for name in (broker.data_dir / partition_dir_name(topic, 0)).iterdir()
                    if name.suffix == filenames.LOG_SUFFIX]
        assert len(segments) > 1, f"broker {broker.node_id}: the test needs segments to roll, found {segments}"
    check_everything_acknowledged(cluster, topic, acks, partitions=2, context=f"{acks.summary()}: ")


def _others(cluster: BrokerCluster, *nodes: int) -> list[int]:
    return [node for node in cluster.brokers if node not in nodes]


# Regression (found by this file, fixed in 14b1b2a):
# A replica whose data directory was deleted restarts as a fresh Raft voter (term 0, no vote, empty log: no
# raft.state means a new ReplicaState) and grants its vote to any candidate whose log is at least as long as
# its empty one, although it acknowledged entries before. Sequence (3 brokers, 1 partition, segment.bytes
# 4096): 50 records acknowledged by all; follower B frozen (SIGSTOP); 200 records acknowledged by leader L and
# follower C; kill -9 C, delete its data directory, kill -9 L; B resumed, C restarted: B wins the election in
# term 2 with C's vote; L restarts and truncates to offset 51: the 200 acknowledged records are lost. Nothing
# marks C as having lost what it acknowledged before it votes (Raft needs a voter that lost its state not to
# vote until it caught up; Kafka keeps B out of the ISR)
def replace_disk(cluster: BrokerCluster, node: int, topic: str) -> None:
    cluster.brokers[node].replace_disk()


def delete_partition_directory(cluster: BrokerCluster, node: int, topic: str) -> None:
    """What a broker's own error advises for a damaged replica: stop it, delete that partition's directory. The
    broker's other files stay, its Raft state log among them: the group's term, vote and commit offset."""
    cluster.kill(node)
    shutil.rmtree(cluster.brokers[node].data_dir / partition_dir_name(topic, 0))


@pytest.mark.parametrize("damage", [replace_disk, delete_partition_directory],
                         ids=["disk-replaced", "partition-directory-deleted"])
def test_wiped_replica_does_not_elect_a_leader_that_lacks_acknowledged_records(
        proxied_cluster: BrokerCluster, damage: object) -> None:
    """Records are acknowledged by the leader L and one follower C while the other follower B is cut off from L,
    so only L and C hold them. Then C loses its copy (kill -9, then its disk replaced or the partition's
    directory deleted) and L is killed; B's links are healed and C restarts empty. B and C are a majority, but
    C holds nothing it acknowledged: if C's vote makes B leader, B's log (which lacks the records) wins and L's
    copy is cut when L returns. The records must survive: no leader without them until L is back (as Kafka
    keeps B out of the ISR). B is cut off rather than frozen (SIGSTOP): the appends a frozen broker's socket
    buffered reach it when it resumes, and then it holds the records and the test shows nothing."""
    cluster = proxied_cluster
    topic = "wiped"
    create_topic(cluster, topic)
    acks = AckLog()
    produce_sequence(cluster.bootstrap, topic, 0, 50, acks)
    leader = cluster.leader_of(topic, 0)
    behind, wiped = _others(cluster, leader)
    cluster.wait_caught_up(topic, 0)
    cluster.cut_link(leader, behind)
    cluster.cut_link(behind, leader)
    produce_sequence(cluster.bootstrap_of(leader, wiped), topic, 50, 200, acks)
    damage(cluster, wiped, topic)  # type: ignore[operator]
    cluster.kill(leader)
    cluster.heal()
    cluster.brokers[wiped].launch()
    # Give B and the empty C every chance to elect each other: 3 s is about ten election timeouts at this cluster's
    # 20 ms ticks (without the rule they elected within the first second).
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        view = cluster.partition_view(behind, topic, 0)
        if view is not None and view.leader_id == behind:
            break
        time.sleep(0.1)
    cluster.brokers[leader].launch()
    cluster.wait_serving()
    cluster.wait_caught_up(topic, 0, timeout_s=60)
    check_everything_acknowledged(cluster, topic, acks, context=(
        f"leader {leader}, cut off {behind}, wiped {wiped}; {acks.summary()}: "))


def wipe_and_restart(cluster: BrokerCluster, node: int) -> None:
    """The operator replaces a broker's disk: kill -9, delete its data directory, start it again empty."""
    cluster.brokers[node].replace_disk()
    cluster.brokers[node].launch()
    cluster.wait_serving(node)


def watch_in_sync(cluster: BrokerCluster, topic: str, leader: int, wiped: int, timeout_s: float) -> list[str]:
    """Until the wiped broker's replica holds the committed log and is listed in sync (or timeout_s passes):
    every observation of the leader listing it in sync while its own log end, asked after, is below the
    high watermark the leader reported before. No timing assumption: its log end only grows meanwhile."""
    early: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        leader_view = cluster.partition_view(leader, topic, 0)
        own_view = cluster.partition_view(wiped, topic, 0)
        if leader_view is None or leader_view.leader_id != leader or own_view is None:
            continue
        own_end = own_view.log_end_offset if own_view.local_replica else 0
        in_sync = wiped in leader_view.isr
        if in_sync and own_end < leader_view.high_watermark:
            early.append(f"listed in sync {leader_view.isr} with log end {own_end} below high watermark "
                         f"{leader_view.high_watermark}")
        elif in_sync:
            return early
        time.sleep(0.05)
    early.append(f"not repaired and in sync within {timeout_s} s")
    return early


# Regression (found by this file, fixed in 14b1b2a):
# A follower whose data directory was deleted and whose broker restarted, of a partition with no writes: the
# leader lists it in the in-sync set (describe: isr [1, 2, 3]) while its replica reports log end 0 below high
# watermark 401, for as long as no record is written (observed for 30 s), and nothing repairs it meanwhile:
# the idle group is quiescent, so no heartbeat carries the follower's real log end to the leader
# (Replica.maybe_quiesce; Progress.forget_beyond is only reached from heartbeat answers and append
# rejections). README: 'the in-sync set leaves it out ... until it has caught up'. An operator trusting that
# ISR to take down or replace another replica removes the last copies but one
def test_wiped_follower_of_an_idle_partition_is_not_listed_in_sync(cluster: BrokerCluster) -> None:
    topic = "repair-idle"
    create_topic(cluster, topic)
    acks = AckLog()
    produce_sequence(cluster.bootstrap, topic, 0, 400, acks)
    leader = cluster.leader_of(topic, 0)
    wiped = _others(cluster, leader)[0]
    cluster.wait_caught_up(topic, 0)
    wipe_and_restart(cluster, wiped)
    problems = watch_in_sync(cluster, topic, leader, wiped, timeout_s=10.0)
    assert not problems, f"broker {wiped} (wiped): {problems[:3]} ({len(problems)} observations)"


def test_wiped_follower_is_repaired_by_the_next_writes(cluster: BrokerCluster) -> None:
    """The same replaced disk, then writes: the follower is repaired, listed in sync only once it holds the
    committed log, and its own files then hold every acknowledged record."""
    topic = "repair"
    create_topic(cluster, topic)
    acks = AckLog()
    produce_sequence(cluster.bootstrap, topic, 0, 400, acks)
    leader = cluster.leader_of(topic, 0)
    wiped = _others(cluster, leader)[0]
    cluster.wait_caught_up(topic, 0)
    wipe_and_restart(cluster, wiped)
    # The producer may ask the restarted broker for metadata: wait until it has replayed the topic's creation.
    wait_until(lambda: cluster.partition_view(wiped, topic, 0) is not None, 30,
               f"broker {wiped} to know {topic} again after its restart")
    produce_sequence(cluster.bootstrap, topic, 400, 100, acks)
    problems = watch_in_sync(cluster, topic, leader, wiped, timeout_s=30.0)
    assert not problems, f"broker {wiped} (wiped): {problems[:3]} ({len(problems)} observations)"
    check_everything_acknowledged(cluster, topic, acks)
    cluster.wait_caught_up(topic, 0)
    high_watermark = cluster.partition_view(leader, topic, 0)
    assert high_watermark is not None
    cluster.terminate(wiped)
    local = cluster.read_local_partition(wiped, topic, 0, high_watermark=high_watermark.high_watermark)
    values = {stored.value for stored in local}
    missing = [value for value in acks.snapshot() if value not in values]
    assert not missing, f"the repaired replica on broker {wiped} lacks {len(missing)} acknowledged records"


def damage_partition_files(directory: Path) -> str:
    """What a bad disk or a careless operator leaves: a middle segment cut inside a batch, a recovery
    checkpoint that claims every offset was fsynced, and a leader-epoch file of garbage."""
    segments = sorted(path for path in directory.iterdir() if path.suffix == filenames.LOG_SUFFIX)
    assert len(segments) >= 4, f"the test needs several segments in {directory}, found {len(segments)}"
    middle = segments[len(segments) // 2]
    size = middle.stat().st_size
    with open(middle, "r+b") as file:
        file.truncate(size - 37)  # inside the last batch (every batch is longer than 37 bytes)
    (directory / filenames.RECOVERY_CHECKPOINT_FILE).write_text("1\n999999999\n")
    (directory / filenames.LEADER_EPOCH_CHECKPOINT_FILE).write_bytes(b"0\n2\n7 0\n\xff\xfe garbage")
    return f"{middle.name} cut from {size} to {size - 37} bytes"


# One of each in the default suite; the others run with make test-slow (the default suite stays near 10 minutes).
@pytest.mark.parametrize("stop", ["kill -9", pytest.param("clean shutdown", marks=pytest.mark.slow)])
def test_follower_with_damaged_files_is_repaired_and_loses_nothing(cluster: BrokerCluster, stop: str) -> None:
    """A follower stopped (kill -9, or a clean shutdown, whose marker makes the next open trust every
    segment), its files damaged, restarted: it must cut the damage, fetch the rest from the leader, and end
    up holding every acknowledged record; reads through the cluster must never show a hole."""
    topic = "damaged"
    create_topic(cluster, topic)
    acks = AckLog()
    produce_sequence(cluster.bootstrap, topic, 0, 400, acks)
    leader = cluster.leader_of(topic, 0)
    follower = _others(cluster, leader)[0]
    cluster.wait_caught_up(topic, 0)
    if stop == "kill -9":
        cluster.kill(follower)
    else:
        cluster.terminate(follower)
        assert (partition_dir(cluster, follower, topic) / filenames.CLEAN_SHUTDOWN_FILE).exists()
    damage = damage_partition_files(partition_dir(cluster, follower, topic))
    cluster.brokers[follower].launch()
    cluster.wait_serving(follower)
    produce_sequence(cluster.bootstrap, topic, 400, 100, acks)
    views = cluster.wait_caught_up(topic, 0, timeout_s=30)
    check_everything_acknowledged(cluster, topic, acks, context=f"{damage}: ")
    cluster.terminate(follower)
    local = cluster.read_local_partition(follower, topic, 0, high_watermark=views[leader].high_watermark)
    assert [stored.offset for stored in local] == list(range(1, views[leader].high_watermark)), (
        f"{damage}: the follower's own log is not the whole committed log")
    values = {stored.value for stored in local}
    missing = [value for value in acks.snapshot() if value not in values]
    assert not missing, f"{damage}: the follower's log lacks {len(missing)} acknowledged records"


@pytest.mark.slow  # about 6 s on a tmpfs: make test-slow
def test_full_disks_then_kill_every_broker_loses_nothing(disk_cluster: BrokerCluster) -> None:
    """Under an acks=all load: the leader's disk fills (its replica stops, leadership moves), then the new
    leader's disk fills too (no majority can write), then kill -9 of every broker at once; the disks are
    freed and the brokers restarted. Every acknowledged record must be there once, in order."""
    cluster = disk_cluster
    topic = "full"
    create_topic(cluster, topic)
    acks = AckLog()
    load = ProducerLoad(cluster.bootstrap, topic, 1, acks, rate_per_s=LOAD_RATE_PER_S, value_size=100).start()
    try:
        load.wait_acked(ACKS_PER_ROUND, timeout_s=60, what="before any disk fills")
        first = cluster.leader_of(topic, 0)
        cluster.disks[first].fill()
        second = cluster.leader_of(topic, 0, timeout_s=30, exclude=(first,))
        load.wait_acked(acks.count() + ACKS_PER_ROUND, timeout_s=60, what=f"after broker {first}'s disk filled")
        cluster.disks[second].fill()
        kill_all_at_once(cluster)
        for disk in cluster.disks.values():
            disk.free()
        restart_all(cluster)
        load.wait_acked(acks.count() + ACKS_PER_ROUND, timeout_s=60, what="after the restart")
    finally:
        load.stop()
    check_everything_acknowledged(cluster, topic, acks, context=f"{acks.summary()}: ")


RAFT_STATE_DAMAGE = {
    "zero-length": lambda data: b"",
    "cut short": lambda data: data[:len(data) * 6 // 10],
    "garbage": lambda data: bytes(b ^ 0x5A for b in data),
}
BROKER_RAFT_STATE_LOG = "raft-states.log"  # the broker-wide state log, where a broker keeps one


def raft_state_path(cluster: BrokerCluster, node: int, topic: str) -> Path:
    """The file that holds the partition's Raft term and vote on this broker: its own raft.state, or the
    broker's shared state log."""
    own = partition_dir(cluster, node, topic) / filenames.RAFT_STATE_FILE
    return own if own.exists() else cluster.brokers[node].data_dir / BROKER_RAFT_STATE_LOG


@pytest.mark.slow  # about 7 s each: make test-slow (the broker's state log is checked for damage in test_state_log)
@pytest.mark.parametrize("damage", sorted(RAFT_STATE_DAMAGE))
def test_damaged_raft_state_on_a_follower_loses_nothing(cluster: BrokerCluster, damage: str) -> None:
    """A follower killed -9 and its Raft state file damaged before the restart: whatever the broker makes of it
    (a fresh state, the older slot, or the replica refused), the other replicas keep serving and every
    acknowledged record stays readable, before and after more writes and a restart of everything."""
    topic = "state"
    create_topic(cluster, topic)
    acks = AckLog()
    produce_sequence(cluster.bootstrap, topic, 0, 200, acks)
    leader = cluster.leader_of(topic, 0)
    follower = _others(cluster, leader)[0]
    cluster.wait_caught_up(topic, 0)
    cluster.kill(follower)
    path = raft_state_path(cluster, follower, topic)
    assert path.exists(), f"broker {follower} keeps its Raft state neither in raft.state nor in {path}"
    path.write_bytes(RAFT_STATE_DAMAGE[damage](path.read_bytes()))
    cluster.brokers[follower].launch()
    cluster.wait_serving(follower)
    produce_sequence(cluster.bootstrap, topic, 200, 100, acks)
    check_everything_acknowledged(cluster, topic, acks, context=f"raft.state {damage}: ")
    kill_all_at_once(cluster)
    restart_all(cluster)
    produce_sequence(cluster.bootstrap, topic, 300, 100, acks)
    check_everything_acknowledged(cluster, topic, acks, context=f"raft.state {damage}, then kill -9 of all: ")


# ------------------------------------------------------------------ the broker's periodic flush on a bad disk


class _FailingFlushLog:
    """A flush="interval" partition log on a disk whose fsync fails (EIO)."""

    config = LogConfig(flush="interval", flush_interval_ms=1)
    unsynced_from = 0

    def flush(self) -> int:
        raise LogDirectoryError("bad-0: I/O error while flushing: [Errno 5] Input/output error (injected)")


class _Replica:
    group = "bad-0"
    closed = False
    log = _FailingFlushLog()
    stopped_by: list[BaseException] = []  # what stop_after_write_failure was handed

    def stop_after_write_failure(self, exc: BaseException) -> None:
        self.stopped_by.append(exc)


class _Broker:
    """What Maintenance.run touches of a broker: one flush="interval" replica on a failing disk."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(leader_balance_interval_ms=3_600_000, retention_check_interval_ms=3_600_000)
        self.retries = 0
        self.replicas = SimpleNamespace(local_partitions=lambda: [(("bad", 0), _Replica())],
                                        retry_failed_replicas=self._retry, layout_version=0)
        self.group_runtimes: dict[str, object] = {}
        self.share_groups = SimpleNamespace(tick=lambda: None)
        self.topic_admin = SimpleNamespace(drive_moves=lambda: None)
        self.executor = ThreadPoolExecutor(max_workers=1)

    def _retry(self, now_s: float) -> None:
        self.retries += 1


# Was a bug: Maintenance.flush_interval_partitions awaited the flush of a flush="interval" topic without
# catching its StorageError, so one failed fsync ended Maintenance.run() for the broker's lifetime (no more
# fsyncs, failed-replica retries, retention or leader balancing), and the failing replica went on.
def test_a_failed_interval_flush_does_not_stop_the_brokers_maintenance() -> None:
    broker = _Broker()
    maintenance = Maintenance(broker)  # type: ignore[arg-type]

    async def run_until_retried() -> BaseException | None:
        task = asyncio.get_running_loop().create_task(maintenance.run())
        deadline = time.monotonic() + 10.0
        while broker.retries < 5 and not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if task.done():
            return task.exception()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None

    try:
        failure = asyncio.run(run_until_retried())
    finally:
        broker.executor.shutdown()
    assert failure is None, f"the broker's maintenance loop died after {broker.retries} round(s): {failure!r}"
    assert broker.retries >= 5, f"the maintenance loop ran only {broker.retries} round(s) in 10 s"
    assert _Replica.stopped_by, "the replica whose fsync failed was not stopped (to be reopened, cut)"
