"""Changing topics after creation, over real broker processes: `lb topic alter`, `lb topic add-partitions`,
`lb topic move-replicas` and `lb cluster drain`.

Moves run under a sequence-numbered acks=all load and end with every partition read back through the
checker (tests/support/checker.py): nothing acknowledged may be lost while replicas join and leave.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from logbroker_client import Admin, Consumer, Producer, TopicPartition
from logbroker_client.cli import main

from tests.support.brokers import wait_until
from tests.support.checker import AckLog, ProducerLoad, assert_clean, read_log
from tests.support.cluster import BrokerCluster

RAFT_TICK_MS = 20
FAST_MAINTENANCE = {"retention_check_interval_ms": 200, "group_session_timeout_ms": 6000,
                    "group_heartbeat_interval_ms": 200}


@pytest.fixture
def four(tmp_path: Path) -> Iterator[BrokerCluster]:
    cluster = BrokerCluster(tmp_path / "cluster", size=4, raft_tick_ms=RAFT_TICK_MS, broker_config=FAST_MAINTENANCE)
    try:
        cluster.start()
        yield cluster
    except BaseException:
        print(cluster.log_tails())
        raise
    finally:
        cluster.stop_all()


def lb(cluster: BrokerCluster, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--bootstrap", cluster.bootstrap, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_everything(cluster: BrokerCluster, acks: AckLog, topic: str) -> None:
    """Every replica (wherever the moves put them) catches up; every acknowledged record reads back once, in order."""
    with Admin(cluster.bootstrap) as admin:
        partitions = admin.describe_topics([topic])[0].partitions
    for p in partitions:
        cluster.wait_caught_up(topic, p.partition, nodes=p.replicas)
    log = read_log(cluster.bootstrap, topic, range(len(partitions)), timeout_s=60)
    assert_clean(acks.snapshot(), log, context=f"{acks.summary()}\n")
    stored = sum(len(records) for records in log.values())
    assert stored >= acks.count(), f"read {stored} records, fewer than the {acks.count()} acknowledged"


# -------------------------------------------------------------------------------------------- alter


def test_alter_retention_deletes_segments_without_restart(four: BrokerCluster,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    with Admin(four.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic("logs", partitions=1, replication_factor=3, configs={"segment.bytes": "4096"})
        four.leader_of("logs", 0)
        with Producer(bootstrap=four.bootstrap, acks="all") as producer:
            for i in range(300):
                producer.send("logs", value=b"x" * 100 + str(i).encode(), partition=0)
            assert producer.flush() == 0
        before = admin.describe_topics(["logs"])[0].partitions[0]
        assert before.log_start_offset == 0 and before.high_watermark >= 300

        code, out, err = lb(four, capsys, "topic", "alter", "logs", "--config", "retention.ms=abc")
        assert code == 1 and "retention.ms" in err and "'abc'" in err, err
        assert "retention.ms" not in admin.describe_topics(["logs"])[0].configs or \
            admin.describe_topics(["logs"])[0].configs["retention.ms"] != "abc"
        code, out, err = lb(four, capsys, "topic", "alter", "logs", "--config", "retention.msx=5")
        assert code == 1 and "unknown log config key 'retention.msx'" in err, err
        code, out, err = lb(four, capsys, "topic", "alter", "nosuch", "--config", "retention.ms=5")
        assert code == 1 and "'nosuch' does not exist" in err, err

        code, out, err = lb(four, capsys, "topic", "alter", "logs", "--config", "retention.ms=1")
        assert code == 0, err
        assert "retention.ms=1" in out and "segment.bytes=4096" in out
        assert admin.describe_topics(["logs"])[0].configs["retention.ms"] == "1"

        def every_replica_cut() -> bool:
            replicas = [v for v in four.views("logs", 0).values() if v.local_replica]
            return len(replicas) == 3 and all(v.log_start_offset > 0 for v in replicas)

        wait_until(every_replica_cut, 30, "retention to delete segments on every replica after the alter")
        code, out, err = lb(four, capsys, "topic", "alter", "logs", "--delete-config", "retention.ms")
        assert code == 0, err
        assert admin.describe_topics(["logs"])[0].configs["retention.ms"] != "1"


# ------------------------------------------------------------------------------------ add partitions


def test_add_partitions_serves_them_and_a_group_rebalances_onto_them(four: BrokerCluster,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with Admin(four.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic("clicks", partitions=2, replication_factor=3)
    for index in range(2):
        four.leader_of("clicks", index)
    owned: set[TopicPartition] = set()
    with Consumer(bootstrap=four.bootstrap, group_id="counters", auto_offset_reset="earliest") as consumer:
        consumer.subscribe(["clicks"], on_assigned=lambda tps: owned.update(tps))
        wait_until(lambda: bool(consumer.poll(timeout=0.2)) or len(owned) == 2, 30, "the member to own 2 partitions")

        code, out, err = lb(four, capsys, "topic", "add-partitions", "clicks", "--to", "2")
        assert code == 1 and "has 2 partition(s)" in err and "never removed" in err, err
        code, out, err = lb(four, capsys, "topic", "add-partitions", "clicks", "--to", "4")
        assert code == 0 and "now has 4 partitions" in out, err
        for index in (2, 3):
            four.leader_of("clicks", index)

        with Producer(bootstrap=four.bootstrap, acks="all", metadata_max_age_ms=100) as producer:
            for index in range(4):
                producer.send("clicks", value=f"click-{index}".encode(), partition=index)
            assert producer.flush() == 0
        seen: dict[int, bytes] = {}

        def read_all_four() -> bool:
            for record in consumer.poll(timeout=0.2):
                seen[record.partition] = record.value or b""
            return len(seen) == 4

        wait_until(read_all_four, 30, "the group member to be given the new partitions and read them")
        assert {TopicPartition("clicks", i) for i in range(4)} <= owned
        assert seen[3] == b"click-3"
    with Admin(four.bootstrap) as admin:
        described = admin.describe_topics(["clicks"])[0]
    assert [p.partition for p in described.partitions] == [0, 1, 2, 3]
    assert all(len(p.replicas) == 3 for p in described.partitions)


# ---------------------------------------------------------------------------------------- moves


def test_move_replicas_while_producing_survives_a_restart(four: BrokerCluster,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    with Admin(four.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic("orders", partitions=1, replication_factor=3, configs={"segment.bytes": "65536"})
        leader = four.leader_of("orders", 0)
        old = admin.describe_topics(["orders"])[0].partitions[0].replicas
    spare = next(node for node in four.brokers if node not in old)
    target = [spare] + [node for node in old if node != leader]  # the leader leaves, the spare leads
    acks = AckLog()
    load = ProducerLoad(four.bootstrap, "orders", 1, acks).start()
    try:
        load.wait_acked(1000, 30, "before the move")
        code, out, err = lb(four, capsys, "topic", "move-replicas", "orders", "--partition", "0",
                            "--to", ",".join(map(str, target)), "--no-wait")
        assert code == 0, err
        with Admin(four.bootstrap) as admin:
            wait_until(lambda: spare in admin.describe_topics(["orders"])[0].partitions[0].learners
                       + admin.describe_topics(["orders"])[0].partitions[0].voters, 30,
                       f"broker {spare} to join orders-0")
        four.kill(leader)  # the broker driving the move dies mid-way
        four.restart(leader)
        code, out, err = lb(four, capsys, "topic", "move-replicas", "orders", "--partition", "0",
                            "--to", ",".join(map(str, target)))  # re-running follows it to the end
        assert code == 0, err + out
        assert f"orders-0: done: replicas {','.join(map(str, target))}" in out, out
        load.wait_acked(acks.count() + 500, 30, "after the move")
    finally:
        load.stop()
    check_everything(four, acks, "orders")
    with Admin(four.bootstrap) as admin:
        moved = admin.describe_topics(["orders"])[0].partitions[0]
    assert moved.replicas == target and sorted(moved.isr) == sorted(target) and not moved.target_replicas
    code, out, err = lb(four, capsys, "topic", "describe", "orders")
    assert f"{','.join(map(str, target))}" in out
    wait_until(lambda: not (four.brokers[leader].data_dir / "orders-0").exists(), 30,
               f"the moved-away replica on broker {leader} to be deleted")


def test_move_refuses_bad_targets(four: BrokerCluster, capsys: pytest.CaptureFixture[str]) -> None:
    with Admin(four.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic("bad", partitions=1, replication_factor=2)
    cases = [
        (["bad", "--partition", "0", "--to", "1,1"], "broker 1 is named more than once"),
        (["bad", "--partition", "0", "--to", ""], "replication factor 0"),
        (["bad", "--partition", "0", "--to", "1,9"], "broker 9 is not in this cluster"),
        (["bad", "--partition", "5", "--to", "1,2"], "partition 5 does not exist"),
        (["nosuch", "--partition", "0", "--to", "1,2"], "'nosuch' does not exist"),
    ]
    for argv, message in cases:
        code, out, err = lb(four, capsys, "topic", "move-replicas", *argv)
        assert code == 1 and message in err, (argv, err)
    code, out, err = lb(four, capsys, "cluster", "drain", "9")
    assert code == 1 and "broker 9 is not in this cluster" in err, err
    with Admin(four.bootstrap) as admin:
        assert not admin.describe_topics(["bad"])[0].partitions[0].target_replicas


def test_drain_leaves_the_broker_holding_and_leading_nothing(four: BrokerCluster,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with Admin(four.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic("events", partitions=4, replication_factor=3)
    for index in range(4):
        four.leader_of("events", index)
    acks = AckLog()
    load = ProducerLoad(four.bootstrap, "events", 4, acks).start()
    try:
        load.wait_acked(500, 30, "before the drain")
        code, out, err = lb(four, capsys, "cluster", "drain", "2")
        assert code == 0, err + out
        assert "broker 2 holds no replica now" in out
        load.wait_acked(acks.count() + 500, 30, "after the drain")
    finally:
        load.stop()
    with Admin(four.bootstrap) as admin:
        for topic in admin.describe_topics():
            for p in topic.partitions:
                assert 2 not in p.replicas and p.leader_id != 2, (topic.name, p)
                assert len(p.isr) == len(p.replicas) == 3, (topic.name, p)
    check_everything(four, acks, "events")
    wait_until(lambda: not any((four.brokers[2].data_dir / f"events-{i}").exists() for i in range(4)), 30,
               "broker 2 to delete its moved-away replicas")
