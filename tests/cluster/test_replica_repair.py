"""A replica that lost its data is repaired by its leader, and is not reported in sync until it is.

Over three real brokers: a follower's partition directory is deleted (as the broker's own error advises
for a damaged replica) or its last segment cut short, and the follower restarted. Each broker is asked
about its own replica (tests.support.cluster.partition_view), never the leader's numbers relayed.
"""

from __future__ import annotations

import shutil

import pytest
from logbroker_client import Admin, cli

from logbroker.storage.filenames import partition_dir_name
from tests.support.brokers import wait_until
from tests.support.checker import AckLog, assert_clean, produce_acked, read_log
from tests.support.cluster import BrokerCluster

TOPIC = "repaired"
RECORDS = 2000
REPAIR_TIMEOUT_S = 30.0


def wipe(directory_path: object) -> None:
    shutil.rmtree(directory_path)  # type: ignore[arg-type]


def cut_tail(directory_path: object) -> None:
    segments = sorted(directory_path.glob("*.log"))  # type: ignore[attr-defined]
    last = segments[-1]
    size = last.stat().st_size
    with open(last, "r+b") as segment:
        segment.truncate(size // 2)
    (directory_path / ".clean_shutdown").unlink(missing_ok=True)  # type: ignore[operator]


@pytest.mark.parametrize("damage", [wipe, cut_tail], ids=["wiped", "tail-cut"])
def test_a_follower_that_lost_its_data_is_repaired_and_out_of_sync_meanwhile(
        cluster: BrokerCluster, damage: object) -> None:
    with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic(TOPIC, partitions=1, replication_factor=3)
    acks = AckLog()
    produce_acked(cluster.bootstrap, TOPIC, RECORDS, acks, b"r")
    views = cluster.wait_caught_up(TOPIC, 0)
    leader = cluster.leader_of(TOPIC, 0)
    follower = next(n for n in sorted(cluster.brokers) if n != leader)
    assert follower in views[leader].isr
    cluster.kill(follower)
    # A broker that is down is not in sync, however far its log had got.
    wait_until(lambda: follower not in (cluster.partition_view(leader, TOPIC, 0) or views[leader]).isr, 10,
               f"broker {follower} to leave the in-sync set while it is down")
    directory = cluster.brokers[follower].data_dir / partition_dir_name(TOPIC, 0)
    damage(directory)  # type: ignore[operator]
    cluster.restart(follower)
    views = cluster.wait_caught_up(TOPIC, 0, timeout_s=REPAIR_TIMEOUT_S)
    assert views[follower].log_end_offset == views[leader].log_end_offset
    wait_until(lambda: follower in (cluster.partition_view(leader, TOPIC, 0) or views[leader]).isr, 10,
               f"broker {follower} back in the in-sync set once repaired")
    # Its own files hold every acknowledged record again.
    cluster.terminate(follower)
    local = cluster.read_local_partition(follower, TOPIC, 0, views[follower].high_watermark)
    assert_clean(acks.snapshot(), {0: local}, context=f"broker {follower}'s own copy: ")
    assert len(local) == RECORDS
    cluster.restart(follower)
    assert_clean(acks.snapshot(), read_log(cluster.bootstrap, TOPIC, [0], timeout_s=30))


def test_a_partition_whose_every_replica_lost_its_data_stays_offline_and_says_why(
        cluster: BrokerCluster, capsys: pytest.CaptureFixture[str]) -> None:
    """Every replica's directory deleted (the operator followed the damaged-replica advice on each broker): no
    replica may vote before it has caught up, and nobody holds the data to catch up from. Electing one of them
    would present an empty log as the partition; it stays offline, and `lb topic describe` says why and what is
    left to do, where it used to say a leader was being elected."""
    with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic(TOPIC, partitions=1, replication_factor=3)
    produce_acked(cluster.bootstrap, TOPIC, 50, AckLog(), b"r")
    cluster.wait_caught_up(TOPIC, 0)
    for node in cluster.brokers:
        cluster.kill(node)
        wipe(cluster.brokers[node].data_dir / partition_dir_name(TOPIC, 0))
    for node in cluster.brokers:
        cluster.restart(node, wait=False)
    cluster.wait_serving()
    wait_until(lambda: all((view := cluster.partition_view(node, TOPIC, 0)) is not None and view.catching_up
                           for node in cluster.brokers), 10, "every replica to wait to catch up")
    assert cli.main(["topic", "describe", TOPIC, "--bootstrap", cluster.bootstrap]) == 0
    out = capsys.readouterr().out
    assert "0          offline" in out, out
    assert ("partition 0 is offline: 3 of its 3 replicas answer, but the ones on broker(s) 1, 2, 3 lost their data"
            in out), out
    assert "its records are lost: delete the topic and create it again" in out, out
    assert all(cluster.partition_view(node, TOPIC, 0).leader_id == -1 for node in cluster.brokers)  # type: ignore[union-attr]
