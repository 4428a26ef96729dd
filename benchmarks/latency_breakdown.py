"""Where a lone record's milliseconds go: the produce path of one record, stage by stage.

    python -m benchmarks.latency_breakdown [--brokers 3] [--replication-factor 3] [--acks all|1]
                                           [--records 600] [--rate 100] [--warmup 50]

Starts a temporary cluster of brokers (subprocesses on free 127.0.0.1 ports, data in a temporary directory
removed afterwards) through benchmarks.traced_broker, which records when each step of the produce path ran
for the benchmark's topic. A producer in this process (linger_ms=0) sends one record at a time, waits for
its acknowledgement, and keeps to --rate; its own steps are traced too. Each record is alone in the
cluster while it is in flight, so every event can be tied to it by its log offset. For every stage the
tool reports the median and p90 of its time from the record's send(), over the records past --warmup
whose every stage was seen; all processes read the same host clock (time.monotonic_ns, CLOCK_MONOTONIC).

Prints one JSON line on stdout and a table of the stages, in order of their median, on stderr.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logbroker_client.progress import Progress, is_interactive

from benchmarks.common import emit, payloads, rounded, run_main
from benchmarks.failover import REPO_ROOT, BenchCluster, leader_of

TOPIC = "latency-breakdown"
RECORD_SIZE = 100
TRACE_WAIT_S = 30.0
RESULT_TIMEOUT_S = 30.0
NS_PER_MS = 1_000_000

# The stages, in the order the produce path reaches them (the leader's own write runs beside its appends'
# trip to the followers, so medians need not follow this order there). Each is (name, who, event):
# "client" stages are the producer's, "leader" ones the partition leader's, "follower" ones those of the
# follower whose acknowledgement reached the leader first (the one that made the record committed).
CLIENT_STAGES_BEFORE = (
    ("client_sender_took", "client", "sender_took"),  # the producer's sender thread took the batch
    ("client_request_built", "client", "request_built"),  # the batch's bytes for the request are ready
    # the request was written to the broker's data port (or handed to gRPC, whose threads may have sent it, and the
    # leader begun on it, by then)
    ("client_request_issued", "client", "request_issued"),
)
LEADER_STAGES = (
    ("leader_produce_arrived", "leader", "produce_arrived"),  # BrokerService.Produce began
    ("leader_proposed", "leader", "proposed"),  # the batch became a Raft entry
    ("leader_ready", "leader", "ready"),  # the replica's Ready loop took the entry
    ("leader_persist_start", "leader", "persist_start"),
    ("leader_write_start", "leader", "write_start"),  # in a thread of the pool
    ("leader_fsync_end", "leader", "fsync_end"),  # still in the pool thread
    ("leader_persist_end", "leader", "persist_end"),  # back on the event loop
)
REPLICATION_STAGES = (
    ("leader_appends_to_transport", "leader", "appends_to_transport"),  # handed over before its own write starts
    ("leader_append_streamed_first", "leader", "streamed_append_first"),  # onto the first follower's stream
    ("leader_append_streamed_last", "leader", "streamed_append_last"),  # onto the last follower's stream
    ("follower_append_received", "follower", "received_append"),
    ("follower_append_stepped", "follower", "stepped_append"),
    ("follower_ready", "follower", "ready"),
    ("follower_persist_start", "follower", "persist_start"),
    ("follower_write_start", "follower", "write_start"),
    ("follower_fsync_end", "follower", "fsync_end"),
    ("follower_persist_end", "follower", "persist_end"),
    ("follower_ack_sent", "follower", "ack_sent"),
    ("follower_ack_streamed", "follower", "streamed_ack"),
    ("leader_ack_received", "leader", "received_ack"),
    ("leader_ack_stepped", "leader", "stepped_ack"),
)
ANSWER_STAGES = (
    ("leader_commit_applied", "leader", "applied"),
    ("leader_produce_answered", "leader", "produce_answered"),
    ("client_answer_received", "client", "answer_received"),  # the answer reached the producer (reader thread)
    ("client_future_resolved", "client", "future_resolved"),  # the record future's done-callback ran
    ("client_caller_woke", "client", "caller_woke"),  # result() returned in the sending thread
)
ACK_EVENTS = frozenset({"received_ack", "stepped_ack", "ack_sent", "streamed_ack"})  # offsets: a match offset
# Events about a Raft message, recorded with the node at its other end (the others with node 0).
MESSAGE_EVENTS = ACK_EVENTS | {"streamed_append", "received_append", "stepped_append"}


def stages_for(replication_factor: int) -> tuple[tuple[str, str, str], ...]:
    replication = REPLICATION_STAGES if replication_factor > 1 else ()
    return CLIENT_STAGES_BEFORE + LEADER_STAGES + replication + ANSWER_STAGES


# ----------------------------------------------------------------------------------------------- the cluster


class TracedCluster(BenchCluster):
    """BenchCluster whose brokers run through benchmarks.traced_broker, each writing its trace file on SIGUSR1."""

    def __init__(self, size: int) -> None:
        super().__init__(size, raft_tick_ms=None)
        self.peer_secret_file = self.workdir / "peers.secret"  # brokers of one cluster share a secret
        self.peer_secret_file.write_text(secrets.token_hex(32))

    def trace_file(self, node: int) -> Path:
        return self.workdir / f"trace-{node}.txt"

    def launch(self, node: int) -> None:
        peers = ",".join(f"{n}={self.address(n)}" for n in self.ports)
        cmd = [sys.executable, "-m", "benchmarks.traced_broker", "--trace-file", str(self.trace_file(node)),
               "--trace-topic", TOPIC, "--log-level", "warning", "serve", "--node-id", str(node),
               "--data-dir", str(self.workdir / f"broker-{node}"), "--listen", self.address(node),
               "--peers", peers, "--cluster-secret-file", str(self.peer_secret_file), *self.raft_args(node)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with open(self.workdir / f"broker-{node}.log", "ab") as log_file:
            self.procs[node] = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)

    def collect_traces(self) -> dict[int, list[tuple[int, str, int, int, int]]]:
        """Ask every broker for its events (SIGUSR1) and read them once written."""
        for node, proc in self.procs.items():
            self.trace_file(node).unlink(missing_ok=True)
            proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + TRACE_WAIT_S
        traces = {}
        for node, proc in self.procs.items():
            path = self.trace_file(node)
            while not path.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"broker {node} wrote no trace file ({path}); its log:\n{self.log_tail(node)}")
                time.sleep(0.02)
            traces[node] = [parse_event(line) for line in path.read_text().splitlines()]
        return traces


def parse_event(line: str) -> tuple[int, str, int, int, int]:
    ns, event, peer, first, last = line.split()
    return int(ns), event, int(peer), int(first), int(last)


# ----------------------------------------------------------------------------------------------- the client


class ClientTrace:
    """The producer's steps for the record in flight (one at a time), by record index."""

    def __init__(self) -> None:
        self.current = -1  # the index of the record in flight: set before its send(), read by the producer's threads
        self.events: list[dict[str, int]] = []

    def start(self, index: int, sent_ns: int) -> None:
        self.current = index
        self.events.append({"send": sent_ns})

    def add(self, event: str) -> None:
        self.events[self.current].setdefault(event, time.monotonic_ns())  # a retry keeps the first moment

    def install(self, producer: Any) -> None:
        """Wrap the producer's sender-side methods on this instance only (private; see traced_broker's note)."""
        take, issue, answer = producer._send_by_leader, producer._send, producer._on_response
        build = producer._core.request_records

        def traced_take(*args: Any) -> None:
            self.add("sender_took")
            take(*args)

        def traced_issue(*args: Any) -> None:
            issue(*args)
            self.add("request_issued")

        def traced_build(*args: Any) -> Any:
            built = build(*args)
            self.add("request_built")
            return built

        def traced_answer(*args: Any) -> None:
            self.add("answer_received")
            answer(*args)

        setattr(producer, "_send_by_leader", traced_take)  # noqa: B010 (instance attributes shadow the methods)
        setattr(producer, "_send", traced_issue)  # noqa: B010
        setattr(producer, "_on_response", traced_answer)  # noqa: B010
        setattr(producer._core, "request_records", traced_build)  # noqa: B010


@dataclass
class Sent:
    records: int = 0
    failed: int = 0
    offsets: list[int] = field(default_factory=list)  # per record; -1 when it failed
    first_error: BaseException | None = None


def produce(bootstrap: str, args: argparse.Namespace, client: ClientTrace) -> Sent:
    """One record at a time at --rate, each awaited before the next."""
    from logbroker_client import Producer

    values = payloads(RECORD_SIZE)
    sent = Sent()
    interval_s = 1.0 / args.rate
    progress = Progress("latency breakdown", total=args.records, mode="tty")
    with Producer(bootstrap, acks=args.acks, linger_ms=0) as producer:
        client.install(producer)
        started = time.monotonic()
        for index in range(args.records):
            delay_s = started + index * interval_s - time.monotonic()
            if delay_s > 0:
                time.sleep(delay_s)
            client.start(index, time.monotonic_ns())
            future = producer.send(TOPIC, values[index % len(values)], partition=0)
            future.add_done_callback(lambda f: client.add("future_resolved"))
            try:
                offset = future.result(timeout=RESULT_TIMEOUT_S).offset
                client.add("caller_woke")
            except Exception as exc:  # counted and reported; the run goes on
                offset = -1
                sent.failed += 1
                sent.first_error = sent.first_error or exc
            sent.offsets.append(offset)
            sent.records += 1
            progress.update()
    progress.close()
    return sent


# ----------------------------------------------------------------------------------------------- alignment


class BrokerEvents:
    """One broker's events, looked up by the offset of a record."""

    def __init__(self, events: Iterable[tuple[int, str, int, int, int]]) -> None:
        # Data events: (event, peer) -> offset -> earliest ns; a lone record's ranges are a handful of offsets.
        self.covering: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)
        # Acknowledgements: (event, peer) -> match offsets ascending, and the earliest ns at that match or beyond.
        self.acks: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        by_ack: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
        for ns, event, peer, first, last in events:
            if event in ACK_EVENTS:
                by_ack[(event, peer)].append((last, ns))
                continue
            covering = self.covering[(event, peer)]
            for offset in range(first, last + 1):
                if ns < covering.get(offset, ns + 1):
                    covering[offset] = ns
        for key, pairs in by_ack.items():
            pairs.sort()
            matches = [match for match, _ in pairs]
            earliest = [ns for _, ns in pairs]
            for i in range(len(earliest) - 2, -1, -1):
                earliest[i] = min(earliest[i], earliest[i + 1])
            self.acks[key] = (matches, earliest)

    def peers(self, event: str) -> list[int]:
        return sorted({peer for name, peer in (*self.covering, *self.acks) if name == event})

    def at(self, event: str, offset: int, peer: int = 0) -> int | None:
        """When `event` first concerned `offset` (for an acknowledgement: first reached it)."""
        if event in ACK_EVENTS:
            found = self.acks.get((event, peer))
            if found is None:
                return None
            i = bisect.bisect_left(found[0], offset)
            return found[1][i] if i < len(found[0]) else None
        return self.covering.get((event, peer), {}).get(offset)


def leader_times(leader: BrokerEvents, offset: int) -> dict[str, int | None]:
    times = {event: leader.at(event, offset) for _, who, event in LEADER_STAGES + REPLICATION_STAGES + ANSWER_STAGES
             if who == "leader" and event not in ACK_EVENTS}  # acknowledgements: replication_times
    streamed = [leader.at("streamed_append", offset, peer) for peer in leader.peers("streamed_append")]
    if streamed and None not in streamed:
        times["streamed_append_first"] = min(t for t in streamed if t is not None)
        times["streamed_append_last"] = max(t for t in streamed if t is not None)
    return times


def replication_times(brokers: dict[int, BrokerEvents], leader_node: int, offset: int
                      ) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """The leader's acknowledgement events and the committing follower's stages, for one record."""
    leader = brokers[leader_node]
    acks = {peer: leader.at("received_ack", offset, peer) for peer in leader.peers("received_ack")}
    heard = {peer: ns for peer, ns in acks.items() if ns is not None}
    if not heard:
        return {}, {}
    follower_node = min(heard, key=lambda peer: heard[peer])
    follower = brokers[follower_node]
    on_leader = {"received_ack": heard[follower_node],
                 "stepped_ack": leader.at("stepped_ack", offset, follower_node)}
    on_follower = {event: follower.at(event, offset, leader_node if event in MESSAGE_EVENTS else 0)
                   for _, who, event in REPLICATION_STAGES if who == "follower"}
    return on_leader, on_follower


def leader_of_offset(brokers: dict[int, BrokerEvents], offset: int) -> int | None:
    for node, events in brokers.items():
        if events.at("produce_arrived", offset) is not None:
            return node
    return None


def align(traces: dict[int, list[tuple[int, str, int, int, int]]], client: ClientTrace, sent: Sent,
          stages: Sequence[tuple[str, str, str]], warmup: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per stage, each complete record's time from its send() in ms; and how often each stage was missing."""
    brokers = {node: BrokerEvents(events) for node, events in traces.items()}
    samples: dict[str, list[float]] = {name: [] for name, _, _ in stages}
    missing: dict[str, int] = defaultdict(int)
    for index in range(warmup, sent.records):
        offset = sent.offsets[index]
        leader_node = leader_of_offset(brokers, offset) if offset >= 0 else None
        if leader_node is None:
            missing["leader_produce_arrived"] += 1
            continue
        times: dict[str, dict[str, int | None]] = {"client": dict(client.events[index]),
                                                    "leader": leader_times(brokers[leader_node], offset)}
        on_leader, times["follower"] = replication_times(brokers, leader_node, offset)
        times["leader"].update(on_leader)
        sent_ns = client.events[index]["send"]
        row = {name: times[who].get(event) for name, who, event in stages}
        absent = [name for name, ns in row.items() if ns is None]
        for name in absent:
            missing[name] += 1
        if absent:
            continue
        for name, ns in row.items():
            samples[name].append((ns - sent_ns) / NS_PER_MS if ns is not None else 0.0)
    return samples, dict(missing)


# ----------------------------------------------------------------------------------------------- output


def nearest_rank(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stage_summary(samples: dict[str, list[float]]) -> dict[str, dict[str, float | None]]:
    summary: dict[str, dict[str, float | None]] = {}
    for name, values in samples.items():
        ordered = sorted(values)
        summary[f"{name}_ms"] = {"p50": rounded(nearest_rank(ordered, 0.5)) if ordered else None,
                                 "p90": rounded(nearest_rank(ordered, 0.9)) if ordered else None}
    return summary


def end_to_end(client: ClientTrace, sent: Sent, warmup: int) -> dict[str, float | None]:
    """send() to result() returning, for every acknowledged record past the warm-up (complete or not)."""
    ordered = sorted((events["caller_woke"] - events["send"]) / NS_PER_MS
                     for events, offset in zip(client.events[warmup:], sent.offsets[warmup:], strict=True)
                     if offset >= 0 and "caller_woke" in events)
    if not ordered:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": rounded(nearest_rank(ordered, 0.5)), "p99": rounded(nearest_rank(ordered, 0.99)),
            "max": rounded(ordered[-1])}


def print_table(stages: dict[str, dict[str, float | None]], write: Callable[[str], Any]) -> None:
    """The stages in order of their median, each with the step from the row before it."""
    rows = sorted(((name.removesuffix("_ms"), v["p50"], v["p90"]) for name, v in stages.items()
                   if v["p50"] is not None and v["p90"] is not None), key=lambda row: (row[1], row[2]))
    if not rows:
        write("latency breakdown: no complete record to show")
        return
    width = max(len(name) for name, _, _ in rows)
    interactive = is_interactive(sys.stderr)
    if interactive:
        write(f"{'stage (ms from send())':<{width}}  {'p50':>8}  {'p90':>8}  {'+p50':>8}")
        write("-" * (width + 30))
    previous = 0.0
    for name, p50, p90 in rows:
        assert p50 is not None and p90 is not None
        step = p50 - previous
        previous = p50
        if interactive:
            write(f"{name:<{width}}  {p50:8.3f}  {p90:8.3f}  {step:+8.3f}")
        else:
            write(f"{name}: p50 {p50:.3f} ms, p90 {p90:.3f} ms, {step:+.3f} ms after the row before")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency_breakdown", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brokers", type=int, default=3)
    parser.add_argument("--replication-factor", type=int, default=None, help="default: --brokers")
    parser.add_argument("--acks", choices=("all", "1"), default="all")
    parser.add_argument("--records", type=int, default=600)
    parser.add_argument("--rate", type=float, default=100.0, help="records/s; low, so each record is alone")
    parser.add_argument("--warmup", type=int, default=50, help="first records sent but not counted")
    args = parser.parse_args(argv)
    args.replication_factor = args.replication_factor or args.brokers
    if args.brokers < 1 or not 1 <= args.replication_factor <= args.brokers:
        parser.error("--brokers must be at least 1 and --replication-factor between 1 and --brokers")
    if args.rate <= 0 or not 0 <= args.warmup < args.records:
        parser.error("--rate must be positive and --warmup below --records")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from logbroker_client import Admin

    client = ClientTrace()
    cluster = TracedCluster(args.brokers)
    with cluster:  # stopped, and its directory removed, however the run ends
        cluster.start()
        with Admin(cluster.bootstrap, request_timeout_ms=30_000) as admin:
            admin.create_topic(TOPIC, partitions=1, replication_factor=args.replication_factor)
        leader = leader_of(cluster, TOPIC, 0, list(cluster.ports))
        print(f"latency breakdown: {args.brokers} broker(s), {TOPIC}-0 led by broker {leader}, "
              f"RF{args.replication_factor}, acks={args.acks}, {args.records} records at {args.rate:g}/s",
              file=sys.stderr, flush=True)
        sent = produce(cluster.bootstrap, args, client)
        traces = cluster.collect_traces()
    if sent.first_error is not None:
        print(f"latency breakdown: {sent.failed} record(s) failed, the first with: {sent.first_error}",
              file=sys.stderr)
    stage_list = stages_for(args.replication_factor)
    samples, missing = align(traces, client, sent, stage_list, args.warmup)
    stages = stage_summary(samples)
    complete = len(samples[stage_list[0][0]])
    emit({
        "tool": "latency_breakdown",
        "brokers": args.brokers,
        "replication_factor": args.replication_factor,
        "acks": args.acks,
        "rate_target": args.rate,
        "record_size": RECORD_SIZE,
        "records": sent.records,
        "warmup": args.warmup,
        "measured": sent.records - args.warmup,
        "complete": complete,
        "failed": sent.failed,
        "missing_stages": missing,
        "clock": "time.monotonic_ns (CLOCK_MONOTONIC, shared by the processes of one host)",
        "stages": stages,
        "end_to_end_ms": end_to_end(client, sent, args.warmup),
    })
    print_table(stages, lambda line: print(line, file=sys.stderr))
    return 1 if sent.failed else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        run_main(main)
