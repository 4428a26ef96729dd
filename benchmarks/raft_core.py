"""Benchmark of the pure Raft core: a three-node in-memory cluster with a perfect, instant network.

Prints one JSON line: commit throughput of the core alone (no disk, no sockets) and how many ticks the
survivors need to elect a new leader after the leader crashes.

    python -m benchmarks.raft_core [--entries N] [--trials N]
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import statistics
import time
from collections.abc import Sequence

from logbroker.raft.membership import Membership
from logbroker.raft.node import RaftNode
from logbroker.raft.types import (
    DEFAULT_ELECTION_TICKS,
    DEFAULT_HEARTBEAT_TICKS,
    Entry,
    HardState,
    Message,
    RaftConfig,
    Ready,
    Role,
)

NODE_IDS = (1, 2, 3)
PAYLOAD = bytes(1024)  # one 1 KiB record batch per entry
RECORDS_PER_ENTRY = 10
PROPOSALS_PER_ROUND = 64


class ListStorage:
    """The smallest LogStorage: a list, with no durability to speak of."""

    def __init__(self) -> None:
        self._entries: list[Entry] = []
        self._lasts: list[int] = []
        self.hard_state = HardState()

    @property
    def first_offset(self) -> int:
        return self._entries[0].base_offset if self._entries else 0

    @property
    def last_offset(self) -> int:
        return self._lasts[-1] if self._lasts else -1

    def term_at(self, offset: int) -> int | None:
        if offset == self.first_offset - 1:
            return 0
        if offset < self.first_offset or offset > self.last_offset:
            return None
        return self._entries[bisect.bisect_left(self._lasts, offset)].term

    def entries(self, from_offset: int, max_bytes: int) -> Sequence[Entry]:
        index = bisect.bisect_left(self._lasts, from_offset)
        found: list[Entry] = []
        budget = max_bytes
        while index < len(self._entries) and (not found or self._entries[index].size_bytes <= budget):
            found.append(self._entries[index])
            budget -= self._entries[index].size_bytes
            index += 1
        return found

    def apply(self, ready: Ready) -> None:
        if ready.truncate_from is not None:
            index = bisect.bisect_left(self._lasts, ready.truncate_from)
            del self._entries[index:], self._lasts[index:]
        self._entries.extend(ready.entries)
        self._lasts.extend(e.last_offset for e in ready.entries)
        if ready.hard_state is not None:
            self.hard_state = ready.hard_state


class Cluster:
    def __init__(self, seed: int) -> None:
        membership = Membership.of(NODE_IDS)
        self.storage = {n: ListStorage() for n in NODE_IDS}
        self.nodes = {
            n: RaftNode(RaftConfig(node_id=n), self.storage[n], random.Random(seed * 10 + n), membership)
            for n in NODE_IDS
        }
        self.down: set[int] = set()
        self.committed = 0

    def run_readies(self) -> list[Message]:
        outbox: list[Message] = []
        for node_id, node in self.nodes.items():
            if node_id in self.down:
                continue
            while (ready := node.ready()) is not None:
                self.storage[node_id].apply(ready)
                if ready.entries:
                    node.persisted(ready.entries[-1].last_offset, ready.entries[-1].term)
                outbox.extend(ready.all_messages)
                if node.role is Role.LEADER:
                    self.committed += sum(1 for e in ready.committed_entries)
                node.advance(ready)
        return outbox

    def settle(self) -> None:
        """Deliver messages until the cluster falls silent."""
        outbox = self.run_readies()
        while outbox:
            for message in outbox:
                if message.to_node not in self.down:
                    self.nodes[message.to_node].step(message)
            outbox = self.run_readies()

    def tick(self) -> None:
        for node_id, node in self.nodes.items():
            if node_id not in self.down:
                node.tick()
        self.settle()

    def leader(self) -> RaftNode | None:
        for node_id, node in self.nodes.items():
            if node_id not in self.down and node.role is Role.LEADER:
                return node
        return None

    def ticks_until_leader(self, limit: int = 10_000) -> int:
        for ticks in range(1, limit + 1):
            self.tick()
            if self.leader() is not None:
                return ticks
        raise RuntimeError("no leader elected")


def commit_throughput(entry_count: int) -> float:
    cluster = Cluster(seed=1)
    cluster.ticks_until_leader()
    leader = cluster.leader()
    assert leader is not None
    cluster.committed = 0
    target = cluster.committed + entry_count
    started = time.perf_counter()
    while cluster.committed < target:
        for _ in range(PROPOSALS_PER_ROUND):
            leader.propose(PAYLOAD, RECORDS_PER_ENTRY)
        cluster.settle()
    elapsed = time.perf_counter() - started
    return cluster.committed / elapsed


def election_ticks_after_crash(trials: int) -> list[int]:
    found = []
    for trial in range(trials):
        cluster = Cluster(seed=1000 + trial)
        cluster.ticks_until_leader()
        leader = cluster.leader()
        assert leader is not None
        cluster.down.add(leader.id)
        found.append(cluster.ticks_until_leader())
    return found


def percentile(values: list[int], fraction: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args()
    throughput = commit_throughput(args.entries)
    ticks = election_ticks_after_crash(args.trials)
    print(
        json.dumps(
            {
                "benchmark": "raft_core",
                "entries_committed_per_s": round(throughput),
                "records_committed_per_s": round(throughput * RECORDS_PER_ENTRY),
                "ticks_to_elect_after_leader_crash": {
                    "median": statistics.median(ticks),
                    "p99": percentile(ticks, 0.99),
                    "max": max(ticks),
                },
                "params": {
                    "nodes": len(NODE_IDS),
                    "entries": args.entries,
                    "payload_bytes": len(PAYLOAD),
                    "records_per_entry": RECORDS_PER_ENTRY,
                    "proposals_per_round": PROPOSALS_PER_ROUND,
                    "election_timeout_ticks": DEFAULT_ELECTION_TICKS,
                    "heartbeat_timeout_ticks": DEFAULT_HEARTBEAT_TICKS,
                    "trials": args.trials,
                    "pre_vote": True,
                    "check_quorum": True,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
