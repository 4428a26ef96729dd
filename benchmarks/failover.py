"""Failover time: SIGKILL a partition leader, time until the next acks=all write succeeds.

Starts a temporary three-broker cluster (subprocesses on free 127.0.0.1 ports, data in a temporary
directory, production Raft tick of 100 ms unless --raft-tick-ms), creates a replication-factor-3 topic,
then for each trial: produces a few acks=all records, SIGKILLs the partition's leader, and sends one
record at a time (short request timeout, retrying) until one is acknowledged. The time from the kill to
that acknowledgement is the trial's failover time; it includes the election (10-20 ticks without a
heartbeat), the new leader's no-op commit and the client's metadata refresh. The killed broker is then
restarted and the next trial waits until all three serve and the partition has a leader again.

    python -m benchmarks.failover --trials 10 [--raft-tick-ms 100]

Prints one JSON line on stdout; a line per trial on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.common import emit, free_port, free_port_offset, is_serving, rounded, run_main
from logbroker.server.config import DEFAULT_RAFT_ELECTION_TICKS, DEFAULT_RAFT_TICK_MS

KEEP_ENV = "LOGBROKER_BENCH_KEEP"  # set: the temporary cluster's data and logs stay, to read after a run

if TYPE_CHECKING:
    from logbroker_client import Producer

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
LEADER_TIMEOUT_S = 60.0
FAILOVER_GIVE_UP_S = 60.0
WRITE_TIMEOUT_MS = 500  # per attempt: a dead leader must not hold the clock for long
REPO_ROOT = Path(__file__).resolve().parents[1]


class BenchCluster:
    """`size` brokers as subprocesses, each a voter, with data and logs under one temporary directory."""

    def __init__(self, size: int, raft_tick_ms: int | None) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="logbroker-failover-"))
        self.ports = {node: free_port() for node in range(1, size + 1)}
        self.raft_ports = {node: free_port() for node in range(1, size + 1)}
        self.data_port_offset = free_port_offset(list(self.ports.values()))
        self.raft_tick_ms = raft_tick_ms
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        # A cluster of several brokers needs a secret they share (peer authentication).
        self.secret_file = self.workdir / "cluster.secret"
        self.secret_file.write_text(secrets.token_hex(32))

    def address(self, node: int) -> str:
        return f"{HOST}:{self.ports[node]}"

    @property
    def bootstrap(self) -> str:
        return ",".join(self.address(n) for n in self.ports)

    def raft_args(self, node: int) -> list[str]:
        """Each broker's Raft port on a free port of its own (the default, client port + 300, may be taken)."""
        raft_peers = ",".join(f"{n}={HOST}:{port}" for n, port in self.raft_ports.items())
        return ["--raft-listen", f"{HOST}:{self.raft_ports[node]}", "--raft-peers", raft_peers,
                "--data-listen", f"{HOST}:{self.ports[node] + self.data_port_offset}"]

    def launch(self, node: int) -> None:
        peers = ",".join(f"{n}={self.address(n)}" for n in self.ports)
        cmd = [sys.executable, "-m", "logbroker.server.cli", "--log-level", "info", "serve", "--node-id", str(node),
               "--data-dir", str(self.workdir / f"broker-{node}"), "--listen", self.address(node), "--peers", peers,
               "--cluster-secret-file", str(self.secret_file), *self.raft_args(node)]
        if self.raft_tick_ms is not None:
            cmd += ["--raft-tick-ms", str(self.raft_tick_ms)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with open(self.workdir / f"broker-{node}.log", "ab") as log_file:
            self.procs[node] = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)

    def wait_serving(self, *nodes: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for node in nodes or tuple(self.ports):
            while not is_serving(self.address(node)):
                if self.procs[node].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"broker {node} did not start serving; its log:\n{self.log_tail(node)}")
                time.sleep(0.05)

    def start(self) -> BenchCluster:
        for node in self.ports:
            self.launch(node)
        self.wait_serving()
        return self

    def kill(self, node: int) -> None:
        self.procs[node].send_signal(signal.SIGKILL)
        self.procs[node].wait(10)

    def pid(self, node: int) -> int:
        return self.procs[node].pid

    def log_tail(self, node: int, lines: int = 30) -> str:
        path = self.workdir / f"broker-{node}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if os.environ.get(KEEP_ENV):
            print(f"kept the brokers' data and logs in {self.workdir} (${KEEP_ENV} is set)", file=sys.stderr)
            return
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> BenchCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def leader_of(cluster: BenchCluster, topic: str, partition: int, alive: list[int]) -> int:
    """The leader that a majority of the live brokers report, waiting until there is one."""
    from logbroker_client import Admin
    from logbroker_client.errors import LogbrokerError

    deadline = time.monotonic() + LEADER_TIMEOUT_S
    while time.monotonic() < deadline:
        votes: dict[int, int] = {}
        for node in alive:
            try:
                with Admin(cluster.address(node), request_timeout_ms=1000) as admin:
                    leader = admin.describe_topics([topic])[0].partitions[partition].leader_id
            except LogbrokerError:
                continue
            if leader > 0:
                votes[leader] = votes.get(leader, 0) + 1
        for leader, count in votes.items():
            if count * 2 > len(cluster.ports) and leader in alive:
                return leader
        time.sleep(0.05)
    raise RuntimeError(f"no leader of {topic}-{partition} within {LEADER_TIMEOUT_S}s")


def write_until_acknowledged(producer: Producer, topic: str, value: bytes) -> int:
    """Send one acks=all record at a time until one is acknowledged; returns the attempts made."""
    from logbroker_client.errors import LogbrokerError

    deadline = time.monotonic() + FAILOVER_GIVE_UP_S
    attempts = 0
    while time.monotonic() < deadline:
        attempts += 1
        try:
            producer.send(topic, value=value, partition=0).result(timeout=WRITE_TIMEOUT_MS * 8 / 1000)
            return attempts
        except (LogbrokerError, TimeoutError):
            continue
    raise RuntimeError(f"no acks=all write succeeded within {FAILOVER_GIVE_UP_S}s of the kill")


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--raft-tick-ms", type=int, default=None,
                        help="the brokers' Raft tick (default: theirs, 100 ms, the production setting)")
    parser.add_argument("--records-before-kill", type=int, default=200)
    args = parser.parse_args()
    if args.trials < 1:
        parser.error("--trials must be at least 1")

    from logbroker_client import Admin, Producer

    topic = "failover"
    samples_s: list[float] = []
    attempts: list[int] = []
    with BenchCluster(3, args.raft_tick_ms) as cluster:
        cluster.start()
        with Admin(cluster.bootstrap, request_timeout_ms=30_000) as admin:
            admin.create_topic(topic, partitions=1, replication_factor=3)
        for trial in range(1, args.trials + 1):
            alive = list(cluster.ports)
            leader = leader_of(cluster, topic, 0, alive)
            with Producer(cluster.bootstrap, acks="all", linger_ms=1) as producer:
                for i in range(args.records_before_kill):
                    producer.send(topic, value=b"before-%d-%d" % (trial, i), partition=0)
                producer.flush(timeout=60)
            # The writer exists before the kill, as in an application: it knows the old leader and has to move.
            writer = Producer(cluster.bootstrap, acks="all", linger_ms=0, request_timeout_ms=WRITE_TIMEOUT_MS,
                              delivery_timeout_ms=WRITE_TIMEOUT_MS * 4, max_block_ms=WRITE_TIMEOUT_MS * 4)
            writer.send(topic, value=b"warm-%d" % trial, partition=0).result(timeout=30)
            survivors = [n for n in alive if n != leader]
            killed_at = time.monotonic()
            cluster.kill(leader)
            tries = write_until_acknowledged(writer, topic, b"after-%d" % trial)
            elapsed_s = time.monotonic() - killed_at
            writer.close(timeout=10)
            samples_s.append(elapsed_s)
            attempts.append(tries)
            new_leader = leader_of(cluster, topic, 0, survivors)
            print(f"trial {trial}/{args.trials}: killed leader {leader}, broker {new_leader} took over; "
                  f"first acks=all write after {elapsed_s * 1000:.0f} ms ({tries} attempt(s))",
                  file=sys.stderr, flush=True)
            cluster.launch(leader)
            cluster.wait_serving()
            leader_of(cluster, topic, 0, alive)
    ordered = sorted(samples_s)
    emit({
        "tool": "failover",
        "trials": args.trials,
        "failover_ms": {"p50": rounded(percentile(ordered, 0.5) * 1000, 1),
                        "p90": rounded(percentile(ordered, 0.9) * 1000, 1),
                        "max": rounded(ordered[-1] * 1000, 1),
                        "min": rounded(ordered[0] * 1000, 1)},
        "raft_tick_ms": args.raft_tick_ms or DEFAULT_RAFT_TICK_MS,
        "election_timeout_ticks": [DEFAULT_RAFT_ELECTION_TICKS, 2 * DEFAULT_RAFT_ELECTION_TICKS],
        "write_timeout_ms": WRITE_TIMEOUT_MS,
        "attempts_max": max(attempts),
        "brokers": 3,
        "replication_factor": 3,
    })
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        run_main(main)
