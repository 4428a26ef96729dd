"""Idle CPU: what three brokers burn doing nothing but keeping 1000 Raft groups alive.

Starts a temporary three-broker cluster (production tick settings unless --raft-tick-ms), creates
`--partitions` partitions with replication factor 3 (over several topics of at most --per-topic
partitions each), waits until every partition has a leader, then samples each broker's utime+stime
from /proc/<pid>/stat over `--seconds` of idleness and prints one JSON line: per broker, the percent
of one core used (100 = one core busy all the time), and the max.

    python -m benchmarks.idle_cpu --partitions 1000 --seconds 20
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks.common import emit, rounded, run_main
from benchmarks.failover import BenchCluster
from logbroker.server.config import DEFAULT_RAFT_TICK_MS

LEADERS_TIMEOUT_S = 300.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def leaderless(cluster: BenchCluster, topics: list[str]) -> int:
    """Partitions without a leader, as the brokers report them (each broker reports its own replicas)."""
    from logbroker_client import Admin
    from logbroker_client.errors import LogbrokerError

    missing = 0
    for topic in topics:
        led: set[int] = set()
        partitions = 0
        for node in cluster.ports:
            try:
                with Admin(cluster.address(node), request_timeout_ms=10_000) as admin:
                    parts = admin.describe_topics([topic])[0].partitions
            except LogbrokerError:
                return -1
            partitions = len(parts)
            led.update(p.partition for p in parts if p.leader_id > 0)
        missing += partitions - len(led)
    return missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=1000)
    parser.add_argument("--per-topic", type=int, default=250, help="partitions per CreateTopics call")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--raft-tick-ms", type=int, default=None,
                        help="the brokers' Raft tick (default: theirs, the production setting)")
    args = parser.parse_args()
    if args.partitions < 1 or args.per_topic < 1 or args.seconds <= 0:
        parser.error("--partitions, --per-topic and --seconds must be positive")

    from logbroker_client import Admin

    with BenchCluster(3, args.raft_tick_ms) as cluster:
        cluster.start()
        topics: list[str] = []
        left = args.partitions
        started = time.monotonic()
        with Admin(cluster.bootstrap, request_timeout_ms=120_000) as admin:
            while left > 0:
                count = min(left, args.per_topic)
                name = f"idle-{len(topics)}"
                admin.create_topic(name, partitions=count, replication_factor=3)
                topics.append(name)
                left -= count
                print(f"created {name} ({count} partitions); {left} to go", file=sys.stderr, flush=True)
        while (missing := leaderless(cluster, topics)) != 0:
            if time.monotonic() - started > LEADERS_TIMEOUT_S:
                raise RuntimeError(f"{missing} partition(s) still without a leader after {LEADERS_TIMEOUT_S}s")
            time.sleep(0.5)
        ready_s = time.monotonic() - started
        print(f"all {args.partitions} partitions have leaders after {ready_s:.1f}s; measuring {args.seconds:.0f}s "
              "of idleness", file=sys.stderr, flush=True)
        pids = {node: cluster.pid(node) for node in cluster.ports}
        before = {node: cpu_seconds(pid) for node, pid in pids.items()}
        t0 = time.monotonic()
        time.sleep(args.seconds)  # the measurement itself: nothing else runs
        wall_s = time.monotonic() - t0
        after = {node: cpu_seconds(pid) for node, pid in pids.items()}
    percent = {str(node): rounded((after[node] - before[node]) / wall_s * 100, 1) for node in pids}
    emit({
        "tool": "idle_cpu",
        "partitions": args.partitions,
        "replication_factor": 3,
        "brokers": 3,
        "seconds": rounded(wall_s, 2),
        "raft_tick_ms": args.raft_tick_ms or DEFAULT_RAFT_TICK_MS,
        "cpu_percent_of_one_core": percent,
        "max_cpu_percent": max(percent.values()),
        "leaders_ready_s": rounded(ready_s, 1),
    })
    return 0


if __name__ == "__main__":
    run_main(main)
