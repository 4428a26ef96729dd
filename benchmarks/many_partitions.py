"""Many partitions: create thousands of RF3 partitions, measure idle CPU, then fail over a third of them.

Starts a temporary three-broker cluster (benchmarks/failover.py BenchCluster, production tick settings
unless --raft-tick-ms), and measures four things:

1. creation: `--partitions` partitions at replication factor 3, in topics of at most --per-topic
   partitions each, from the first CreateTopics call until every live broker reports the same leader
   for every partition (each broker's Metadata answer: its own replica's view of the leader);
2. idle CPU: each broker's utime+stime from /proc/<pid>/stat over `--seconds` of idleness, in percent
   of one core;
3. failover: SIGKILL of the broker that leads the most partitions, then the seconds until both
   surviving brokers' replicas of every partition follow the same live leader. The time includes the
   survivors noticing the silence (the liveness timeout) and the elections. Nothing asks the brokers
   anything while they fail over (a Metadata poll of 10,000 partitions took a third of a survivor's event
   loop and slowed what it measured): once the failover has had FAILOVER_UNOBSERVED_S, the polling starts,
   and once every partition has an agreed leader, each survivor tells when each of its replicas saw its
   leader change (DescribeTopics, local_only: leader_since_ms, when its Metadata answers began to show the
   new leader). `failover_s` is the last of those moments among the partitions the killed broker led,
   `failover_elected_s` the last of the new leaders' own, `failover_p50_s` the median partition's;
   `failover_writable_s` (and `_p50_s`) when the new leaders' first entries were on their disks, after which
   they can acknowledge writes (their `leader in term` log lines: logged once that Ready is persisted);
4. the survivors' CPU over `--seconds` after the failover (from 5 s after it, once the new leaders have
   settled), with the killed broker still down (groups whose follower is down must go quiet too).

    python -m benchmarks.many_partitions --partitions 10000 --seconds 20

Prints one JSON line on stdout; progress lines on stderr. 10,000 partitions at RF3 are 30,000 replicas,
each holding several open files: raise the open-file limit first (`ulimit -n 65536`, see docs/raft.md).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from benchmarks.common import emit, rounded, run_main
from benchmarks.failover import BenchCluster
from benchmarks.idle_cpu import cpu_seconds
from logbroker.server.config import DEFAULT_LIVENESS_TIMEOUT_TICKS, DEFAULT_RAFT_TICK_MS

READY_TIMEOUT_S = 600.0
FAILOVER_GIVE_UP_S = 120.0
POLL_INTERVAL_S = 0.05
# The failover runs unobserved this long before the polling starts (leader_since_ms tells the moments after it).
FAILOVER_UNOBSERVED_S = 6.0
# After a failover the new leaders report to the controller, save their leader epochs and go quiet: the survivors'
# idle CPU is measured from this long after every partition has a leader.
SETTLE_AFTER_FAILOVER_S = 5.0
METADATA_TIMEOUT_S = 30.0

Partition = tuple[str, int]


def reported_leaders(cluster: BenchCluster, node: int, topics: Sequence[str] = ()) -> dict[Partition, int] | None:
    """Every partition's leader (of `topics`, else of every topic) as broker `node` reports it (-1: none known);
    None if it does not answer."""
    import grpc
    from logbroker_client.proto import logbroker_pb2 as pb
    from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(cluster.address(node), options=options) as channel:
        try:
            answer = pb_grpc.BrokerStub(channel).Metadata(pb.MetadataRequest(topics=list(topics)),
                                                          timeout=METADATA_TIMEOUT_S)
        except grpc.RpcError:
            return None
    return {(topic.name, p.partition): p.leader_id for topic in answer.topics for p in topic.partitions}


def leaders_since(cluster: BenchCluster, node: int, topics: Sequence[str]) -> dict[Partition, tuple[int, int]]:
    """Broker `node`'s own replicas: (the leader each follows or is, since when in Unix ms) per partition."""
    import grpc
    from logbroker_client.proto import logbroker_pb2 as pb
    from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(cluster.address(node), options=options) as channel:
        answer = pb_grpc.AdminStub(channel).DescribeTopics(
            pb.DescribeTopicsRequest(names=list(topics), local_only=True), timeout=METADATA_TIMEOUT_S)
    return {(topic.name, p.partition): (p.leader_id, p.leader_since_ms)
            for topic in answer.topics for p in topic.partitions if p.local_replica}


def failover_moments(cluster: BenchCluster, survivors: list[int], topics: Sequence[str],
                     killed_ms: float) -> tuple[list[float], list[float]]:
    """For each partition whose leader changed after the kill: when its new leader won (on that leader), and
    when the last survivor saw the change, both in seconds after the kill."""
    views = [leaders_since(cluster, node, topics) for node in survivors]
    elected: list[float] = []
    agreed: list[float] = []
    for part in views[0]:
        seen = {node: view[part] for node, view in zip(survivors, views, strict=True) if part in view}
        last_ms = max(since for _, since in seen.values())
        if last_ms < killed_ms:
            continue  # led by a survivor all along
        leader = seen[survivors[0]][0]
        if leader in seen:
            elected.append((seen[leader][1] - killed_ms) / 1000)
        agreed.append((last_ms - killed_ms) / 1000)
    return elected, agreed


# A broker logs a new leadership once the Ready that made it is on its disk, the new term's first entry included:
# from then on the partition can commit (acknowledge) writes. "<topic>-<p>: leader in term <T> (leader <N>)".
LEADERSHIP_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO logbroker\.replica: "
                             r"(\S+): leader in term \d+ \(leader \d+\)$")


def leaderships_durable(cluster: BenchCluster, survivors: list[int], killed_ms: float) -> dict[str, float]:
    """From the survivors' logs: per Raft group that got a leader after the kill, when the leadership was on its
    disk, in seconds after the kill (the last such line for the group)."""
    durable: dict[str, float] = {}
    for node in survivors:
        text = (cluster.workdir / f"broker-{node}.log").read_text(errors="replace")
        for line in text.splitlines():
            match = LEADERSHIP_LINE.match(line)
            if match is None:
                continue
            wall_s = time.mktime(time.strptime(match[1], "%Y-%m-%d %H:%M:%S")) + int(match[2]) / 1000
            if wall_s * 1000 >= killed_ms:
                durable[match[3]] = wall_s - killed_ms / 1000
    return durable


def controller_leader(cluster: BenchCluster, node: int) -> int:
    """The controller's leader, as broker `node` names it in Metadata."""
    import grpc
    from logbroker_client.proto import logbroker_pb2 as pb
    from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

    with grpc.insecure_channel(cluster.address(node)) as channel:
        answer = pb_grpc.BrokerStub(channel).Metadata(pb.MetadataRequest(topics=["-"]), timeout=METADATA_TIMEOUT_S)
    return int(answer.controller_id)


def agreed_leaders(cluster: BenchCluster, nodes: list[int],
                   topics: Sequence[str] = ()) -> tuple[dict[Partition, int], set[Partition]] | None:
    """The partitions (of `topics`, else of every topic) whose leader every broker in `nodes` reports alike and
    that is one of `nodes`, and every partition reported; None if a broker does not answer."""
    with ThreadPoolExecutor(len(nodes)) as pool:  # at once: a round is as long as the slowest answer, not all
        views = list(pool.map(lambda node: reported_leaders(cluster, node, topics), nodes))
    if any(view is None for view in views):
        return None
    first, *others = [view for view in views if view is not None]
    agreed = {part: leader for part, leader in first.items()
              if leader in nodes and all(other.get(part) == leader for other in others)}
    return agreed, set(first)


def wait_for_leaders(cluster: BenchCluster, nodes: list[int], expected: int, give_up_s: float,
                     what: str, poll_interval_s: float = POLL_INTERVAL_S,
                     call_seconds: list[float] | None = None,
                     missing_seen_at: list[float] | None = None,
                     completed_at: list[float] | None = None) -> dict[Partition, int]:
    """Poll every live broker's Metadata until all agree on a live leader for every partition.

    Each poll is load on the system measured (its duration goes into call_seconds; a Metadata of 10,000
    partitions takes up to a second while the brokers elect), so after a first round of every topic the rounds
    ask only for the topics that still have a partition without an agreed leader, which makes them shorter
    and the figure sharper as the last ones elect; once none is left, one more round of every topic confirms
    it (a partition that lost its leader again meanwhile sends the polling on). missing_seen_at gets the
    time.monotonic() at which each round that still found a partition without a leader began, and
    completed_at the end of the round that found none: together they bound the moment the last leader
    appeared."""
    deadline = time.monotonic() + give_up_s
    last_report = 0.0
    agreed: dict[Partition, int] = {}
    partitions: set[Partition] = set()
    asking: list[str] = []  # the topics of this round; none: every topic
    found_all_at: float | None = None
    while True:
        asked = time.monotonic()
        answer = agreed_leaders(cluster, nodes, asking)
        if call_seconds is not None:
            call_seconds.append(time.monotonic() - asked)
        if answer is not None:
            round_agreed, reported = answer
            if not asking:
                agreed, partitions = {}, reported
            agreed = {part: leader for part, leader in agreed.items() if part[0] not in asking} | round_agreed
        missing = expected - len(agreed) if answer is not None and len(partitions) >= expected else expected
        if missing == 0 and not asking and found_all_at is not None:
            if completed_at is not None:
                completed_at.append(found_all_at)
            return agreed
        if missing == 0:
            found_all_at = found_all_at or time.monotonic()
            asking = []  # the confirming round: every topic
            continue
        found_all_at = None
        if missing_seen_at is not None:
            missing_seen_at.append(asked)
        asking = sorted({topic for topic, _ in partitions - agreed.keys()}) if partitions else []
        now = time.monotonic()
        if now > deadline:
            raise RuntimeError(f"{what}: {missing} of {expected} partitions still without an agreed live leader "
                               f"after {give_up_s:.0f} s")
        if now - last_report > 2:
            print(f"{what}: {missing} of {expected} partitions without an agreed leader", file=sys.stderr,
                  flush=True)
            last_report = now
        time.sleep(poll_interval_s)


def create_partitions(cluster: BenchCluster, total: int, per_topic: int) -> list[str]:
    from logbroker_client import Admin
    from logbroker_client.errors import TopicAlreadyExistsError

    topics: list[str] = []
    left = total
    with Admin(cluster.bootstrap, request_timeout_ms=300_000) as admin:
        while left > 0:
            count = min(left, per_topic)
            name = f"many-{len(topics)}"
            # An attempt of this very call, answered while the controller moved, may have created it already.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topic(name, partitions=count, replication_factor=3)
            topics.append(name)
            left -= count
            print(f"created {name} ({count} partitions); {left} to go", file=sys.stderr, flush=True)
    return topics


def idle_cpu_percent(cluster: BenchCluster, seconds: float, nodes: list[int]) -> dict[str, float]:
    pids = {node: cluster.pid(node) for node in nodes}
    before = {node: cpu_seconds(pid) for node, pid in pids.items()}
    started = time.monotonic()
    time.sleep(seconds)  # the measurement itself: nothing else runs
    wall_s = time.monotonic() - started
    after = {node: cpu_seconds(pid) for node, pid in pids.items()}
    return {str(node): rounded((after[node] - before[node]) / wall_s * 100, 1) for node in pids}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=10_000)
    parser.add_argument("--per-topic", type=int, default=1000, help="partitions per CreateTopics call")
    parser.add_argument("--seconds", type=float, default=20.0, help="idle CPU is measured over this long")
    parser.add_argument("--kill", choices=("most", "controller"), default="most",
                        help="the broker to SIGKILL: the one leading the most partitions, or the controller's leader "
                             "(which also leads about a third: the survivors then elect a controller too)")
    parser.add_argument("--poll-interval-ms", type=float, default=POLL_INTERVAL_S * 1000,
                        help="pause between two rounds of Metadata calls while waiting for leaders (each round "
                             "asks every live broker for every partition: load on the brokers being measured)")
    parser.add_argument("--raft-tick-ms", type=int, default=None,
                        help="the brokers' Raft tick (default: theirs, the production setting)")
    args = parser.parse_args()
    if args.partitions < 1 or args.per_topic < 1 or args.seconds <= 0 or args.poll_interval_ms < 0:
        parser.error("--partitions, --per-topic and --seconds must be positive, --poll-interval-ms not negative")
    # The brokers inherit the open-file limit: raise the soft limit to the hard one (each broker needs about
    # one descriptor per idle replica it holds, more for replicas with data; docs/raft.md).
    soft_files, hard_files = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_files < hard_files:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard_files, hard_files))
        soft_files = hard_files

    with BenchCluster(3, args.raft_tick_ms) as cluster:
        cluster.start()
        nodes = list(cluster.ports)
        started = time.monotonic()
        topics = create_partitions(cluster, args.partitions, args.per_topic)
        created_s = time.monotonic() - started
        leaders = wait_for_leaders(cluster, nodes, args.partitions, READY_TIMEOUT_S, "creation")
        ready_s = time.monotonic() - started
        print(f"all {args.partitions} partitions have leaders after {ready_s:.1f} s; measuring {args.seconds:.0f} s "
              "of idleness", file=sys.stderr, flush=True)
        cpu = idle_cpu_percent(cluster, args.seconds, nodes)
        # Leaders may have moved during the idle period (leader balancing): ask again before choosing.
        leaders = wait_for_leaders(cluster, nodes, args.partitions, READY_TIMEOUT_S, "before the kill")
        led = Counter(leaders.values())
        victim, victim_led = led.most_common(1)[0]
        if args.kill == "controller":
            victim = controller_leader(cluster, nodes[0])
            victim_led = led[victim]
        survivors = [node for node in nodes if node != victim]
        print(f"killing broker {victim}, which leads {victim_led} partitions", file=sys.stderr, flush=True)
        killed_ms = time.time() * 1000
        cluster.kill(victim)
        time.sleep(FAILOVER_UNOBSERVED_S)
        wait_for_leaders(cluster, survivors, args.partitions, FAILOVER_GIVE_UP_S, "failover",
                         args.poll_interval_ms / 1000)
        elected, agreed = failover_moments(cluster, survivors, topics, killed_ms)
        failover_s = max(agreed)
        durable = [s for group, s in leaderships_durable(cluster, survivors, killed_ms).items()
                   if not group.startswith("__")]
        print(f"every partition has a live leader {failover_s:.2f} s after the kill ({len(agreed)} changed "
              f"leader; the last new leader won at {max(elected):.2f} s, and could acknowledge writes from "
              f"{max(durable):.2f} s)", file=sys.stderr, flush=True)
        print(f"measuring the survivors' CPU over {args.seconds:.0f} s with broker {victim} down, after "
              f"{SETTLE_AFTER_FAILOVER_S:.0f} s for the new leaders to settle", file=sys.stderr, flush=True)
        time.sleep(SETTLE_AFTER_FAILOVER_S)
        cpu_after = idle_cpu_percent(cluster, args.seconds, survivors)
    emit({
        "tool": "many_partitions",
        "partitions": args.partitions,
        "replication_factor": 3,
        "brokers": 3,
        "raft_tick_ms": args.raft_tick_ms or DEFAULT_RAFT_TICK_MS,
        "liveness_timeout_ticks": DEFAULT_LIVENESS_TIMEOUT_TICKS,
        "create_calls_s": rounded(created_s, 2),
        "leaders_ready_s": rounded(ready_s, 2),
        "idle_seconds": args.seconds,
        "idle_cpu_percent_of_one_core": cpu,
        "max_idle_cpu_percent": max(cpu.values()),
        "killed": args.kill,
        "killed_broker_led": victim_led,
        "failover_partitions": len(agreed),
        "failover_s": rounded(failover_s, 2),
        "failover_elected_s": rounded(max(elected), 2),
        "failover_p50_s": rounded(statistics.median(agreed), 2),
        "failover_writable_s": rounded(max(durable), 2),
        "failover_writable_p50_s": rounded(statistics.median(durable), 2),
        "idle_cpu_percent_after_failover": cpu_after,
        "open_files_limit": soft_files,
    })
    return 0


if __name__ == "__main__":
    run_main(main)
