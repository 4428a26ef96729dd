"""`lb health`: exit 0 and one line while every partition has a leader and its whole replica set in sync; with a
broker killed, exit 1 and a table of the offline and under-replicated partitions, each with what to do."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from logbroker_client import Admin, cli
from logbroker_client.cli_health import report_health
from logbroker_client.types import PartitionInfo, TopicDescription

from tests.support.brokers import wait_until
from tests.support.cluster import BrokerCluster

DEADLINE_S = 30.0


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def rows_of(out: str) -> dict[tuple[str, int], list[str]]:
    """The table's rows by (topic, partition): leader, replicas, isr, and what to do."""
    lines = out.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("TOPIC ")), len(lines))
    rows = {}
    for line in lines[header + 1:]:
        fields = line.split(None, 5)
        rows[(fields[0], int(fields[1]))] = fields[2:]
    return rows


def test_health_is_ok_then_names_what_a_killed_broker_leaves_behind(capsys: pytest.CaptureFixture[str],
                                                                      tmp_path: Path) -> None:
    with BrokerCluster(tmp_path / "cluster") as cluster:
        with Admin(cluster.bootstrap) as admin:
            admin.create_topic("replicated", partitions=2, replication_factor=3)
            admin.create_topic("single", partitions=3, replication_factor=1)
            placement = {p.partition: p.replicas[0] for p in admin.describe_topics(["single"])[0].partitions}
        last: list[tuple[int, str, str]] = []

        def healthy() -> bool:
            last[:] = [run(capsys, "health", "--bootstrap", cluster.bootstrap)]
            return last[0][0] == 0

        wait_until(healthy, DEADLINE_S, f"lb health to exit 0 (last: {last})", interval_s=0.2)
        assert last[0][1] == "healthy: 2 topics, 5 partitions, all with a leader and a full in-sync set\n"

        victim = placement[0]
        cluster.kill(victim)
        others = [n for n in cluster.brokers if n != victim]
        # The dead broker first: like every admin call, lb health goes on to the next address.
        bootstrap = cluster.bootstrap_of(victim, *others)
        lost = sorted(p for p, node in placement.items() if node == victim)

        def reported() -> bool:
            last[:] = [run(capsys, "health", "--bootstrap", bootstrap)]
            rows = rows_of(last[0][1])
            return (last[0][0] == 1
                    and all(rows.get(("single", p), [""])[0] == "offline" for p in lost)
                    and all(rows.get(("replicated", p), ["offline"])[0] != "offline"
                            and rows[("replicated", p)][2] == ",".join(str(n) for n in sorted(others))
                            for p in (0, 1)))

        wait_until(reported, DEADLINE_S, f"lb health to report broker {victim}'s loss (last: {last})",
                   interval_s=0.2)
        code, out, err = last[0]
        assert err == ""
        assert re.match(rf"unhealthy: {len(lost) + 2} of 5 partitions in 2 topics need attention "
                        rf"\({len(lost)} offline, 2 under-replicated\)\n", out), out
        assert re.search(r"^TOPIC\s+PARTITION\s+LEADER\s+REPLICAS\s+ISR\s+WHAT TO DO$", out, re.M), out
        rows = rows_of(out)
        address = cluster.address(victim)
        for p in lost:
            leader, replicas, isr, advice = rows[("single", p)]
            assert (replicas, isr) == (str(victim), "-")
            assert advice == f"start broker {victim} ({address}) (no replica is up)"
        for p in (0, 1):
            leader, replicas, isr, advice = rows[("replicated", p)]
            assert int(leader) in others and sorted(map(int, replicas.split(","))) == [1, 2, 3]
            assert advice == f"start broker {victim} ({address}); the replica catches up by itself once back"
        assert not [key for key in rows if key[0] == "single" and key[1] not in lost], "healthy ones are not listed"


def test_the_advice_fits_each_case() -> None:
    addresses = {1: "h:1", 2: "h:2", 3: "h:3"}
    topics = [TopicDescription("t", 3, {}, [
        PartitionInfo(0, 1, [1, 2, 3], [1, 2, 3], 0, 0, 0),
        PartitionInfo(1, 1, [1, 2, 3], [1, 3], 0, 0, 0),  # broker 2 is up but behind
        PartitionInfo(2, -1, [1, 2, 3], [], 0, 0, 0, offline=True),  # every replica answers: an election
        PartitionInfo(3, -1, [2, 3], [], 0, 0, 0, offline=True),
    ])]
    out = io.StringIO()
    assert report_health(topics, {1: "up", 2: "up", 3: "no answer"}, addresses, out) == 1
    rows = rows_of(out.getvalue())
    assert set(rows) == {("t", 1), ("t", 2), ("t", 3)}
    assert rows[("t", 1)][3] == ("broker 2 is catching up with the leader: check again shortly (if it lasts, "
                                 "see that broker's log)")
    assert rows[("t", 2)][3] == ("broker 3 does not answer (paused, overloaded or cut off): see its log; a leader "
                                 "is being elected: check again shortly")
    assert rows[("t", 3)][3] == ("broker 3 does not answer (paused, overloaded or cut off): see its log (a leader "
                                 "needs 2 of the 2 replicas up; 1 are)")

    healthy = io.StringIO()
    one = [TopicDescription("t", 1, {}, [PartitionInfo(0, 1, [1], [1], 0, 0, 0)])]
    assert report_health(one, {1: "up", 2: "down"}, addresses, healthy) == 0
    assert healthy.getvalue() == ("healthy: 1 topic, 1 partition, all with a leader and a full in-sync set\n"
                                  "note: broker 2 (h:2) is down (holding no replica)\n")
