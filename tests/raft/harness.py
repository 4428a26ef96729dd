"""A small synchronous runtime for unit and scenario tests: nodes over MemoryLogStorage, a mailbox of
messages in flight, and switches to isolate nodes, drop messages, crash and restart nodes.

It follows the Ready contract to the letter: write, fsync, report persisted, send, apply, advance.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from logbroker.raft.membership import Membership
from logbroker.raft.node import RaftNode
from logbroker.raft.types import Entry, Message, MessageType, RaftConfig, Role
from tests.raft.sim.storage import MemoryLogStorage

ELECTION_TICKS = 10


@dataclass
class Replica:
    node: RaftNode
    storage: MemoryLogStorage
    applied: list[Entry] = field(default_factory=list)
    up: bool = True


class Harness:
    def __init__(
        self,
        voters: Iterable[int],
        learners: Iterable[int] = (),
        seed: int = 0,
        node_class: type[RaftNode] = RaftNode,
        **config: object,
    ) -> None:
        self.membership = Membership.of(voters, learners)
        self.seed = seed
        self.node_class = node_class
        self.config = config
        self.replicas: dict[int, Replica] = {}
        self.mailbox: list[Message] = []
        self.isolated: set[int] = set()
        self.drop: Callable[[Message], bool] = lambda m: False
        for node_id in sorted(self.membership.members):
            self.add_node(node_id)

    # ------------------------------------------------------------------ nodes
    def make_config(self, node_id: int) -> RaftConfig:
        return RaftConfig(node_id=node_id, election_timeout_ticks=ELECTION_TICKS, **self.config)  # type: ignore[arg-type]

    def add_node(self, node_id: int, membership: Membership | None = None) -> RaftNode:
        storage = MemoryLogStorage(membership or self.membership)
        rng = random.Random(self.seed * 1000 + node_id)
        node = self.node_class(self.make_config(node_id), storage, rng, membership or self.membership)
        self.replicas[node_id] = Replica(node, storage)
        return node

    def node(self, node_id: int) -> RaftNode:
        return self.replicas[node_id].node

    def crash(self, node_id: int) -> None:
        replica = self.replicas[node_id]
        replica.storage.crash()
        replica.up = False
        self.mailbox = [m for m in self.mailbox if m.to_node != node_id]

    def restart(self, node_id: int) -> RaftNode:
        replica = self.replicas[node_id]
        storage = replica.storage
        base = storage.base_membership
        assert base is not None
        rng = random.Random(self.seed * 1000 + node_id + 7)
        replica.node = self.node_class(
            self.make_config(node_id), storage, rng, base, hard_state=storage.durable_hard_state
        )
        replica.up = True
        return replica.node

    # ------------------------------------------------------------------ the runtime loop
    def process(self, node_id: int) -> None:
        replica = self.replicas[node_id]
        if not replica.up:
            return
        node = replica.node
        while (ready := node.ready()) is not None:
            replica.storage.write_ready(ready)
            replica.storage.fsync()
            if ready.entries:
                node.persisted(ready.entries[-1].last_offset, ready.entries[-1].term)
            self.mailbox.extend(ready.all_messages)
            replica.applied.extend(ready.committed_entries)
            node.advance(ready)

    def process_all(self) -> None:
        for node_id in sorted(self.replicas):
            self.process(node_id)

    def deliverable(self, m: Message) -> bool:
        if m.from_node in self.isolated or m.to_node in self.isolated:
            return False
        target = self.replicas.get(m.to_node)
        return target is not None and target.up and not self.drop(m)

    def deliver_once(self) -> int:
        """Deliver every message now in flight (dropping the undeliverable), then process all nodes."""
        batch, self.mailbox = self.mailbox, []
        delivered = 0
        for m in batch:
            if self.deliverable(m):
                self.replicas[m.to_node].node.step(m)
                delivered += 1
        self.process_all()
        return delivered

    def stabilize(self, max_rounds: int = 200) -> None:
        self.process_all()
        for _ in range(max_rounds):
            if not self.mailbox:
                return
            self.deliver_once()
        raise AssertionError("messages kept flowing; the cluster did not settle")

    def tick_all(self, ticks: int = 1) -> None:
        for _ in range(ticks):
            for node_id in sorted(self.replicas):
                if self.replicas[node_id].up:
                    self.replicas[node_id].node.tick()
            self.stabilize()

    def tick(self, node_id: int, ticks: int = 1) -> None:
        for _ in range(ticks):
            self.node(node_id).tick()
        self.process(node_id)

    # ------------------------------------------------------------------ scenarios
    def campaign(self, node_id: int) -> None:
        """Make ``node_id`` time out (without ticking the others) and run the election to completion."""
        node = self.node(node_id)
        before = (node.role, node.term)
        for _ in range(3 * ELECTION_TICKS):
            node.tick()
            if (node.role, node.term) != before:
                break
        self.stabilize()

    def elect(self, node_id: int, attempts: int = 1) -> RaftNode:
        """Make ``node_id`` campaign (again after a loss, up to ``attempts`` times) until it leads."""
        node = self.node(node_id)
        for _ in range(attempts):
            self.campaign(node_id)
            node = self.node(node_id)
            if node.role is Role.LEADER:
                self.stabilize()
                return node
        raise AssertionError(f"node {node_id} did not win: {node.role}")

    def leaders(self) -> list[int]:
        return [i for i, r in self.replicas.items() if r.up and r.node.role is Role.LEADER]

    def propose(self, node_id: int, payload: bytes, record_count: int = 1) -> Entry:
        entry = self.node(node_id).propose(payload, record_count)
        self.process(node_id)
        return entry

    def log_of(self, node_id: int) -> list[tuple[int, int, bytes]]:
        node = self.node(node_id)
        if node.log.last_offset < node.log.first_offset:
            return []
        return [
            (e.last_offset, e.term, e.payload)
            for e in node.log.iter_entries(node.log.first_offset, node.log.last_offset, 1 << 20)
        ]

    def sent(self, kind: MessageType) -> list[Message]:
        return [m for m in self.mailbox if m.type is kind]
