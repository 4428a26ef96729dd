"""Three production Replicas of one group on one event loop, ticked as the broker's ticker ticks them (tick, then
maybe_quiesce, awake groups only), with an in-memory transport that delivers each tick's messages in one batch as
the broker's Raft port does. An elected, idle group goes quiet on every replica and stays quiet: no tick, no
message. (A leader that went quiet in the very tick it sent a heartbeat was woken by the answer, went quiet
again, and so on for ever: thousands of idle groups kept two brokers busy.) A write wakes it and it settles again."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from logbroker_client import records as rec

from logbroker.cluster.fsync_threads import Syncer
from logbroker.cluster.raft_storage import ReplicaStateFile
from logbroker.cluster.replica import Replica
from logbroker.raft.membership import Membership
from logbroker.raft.types import Entry, Message, MessageType, RaftConfig, Role
from logbroker.server.config import DEFAULT_RAFT_HEARTBEAT_TICKS
from logbroker.storage.config import LogConfig
from logbroker.storage.log import PartitionLog

GROUP = "calm-0"
NODES = (1, 2, 3)
MAX_TICKS = 400
DEADLINE_S = 20.0
QUIET_CHECK_TICKS = 100


class Network:
    """Messages sent during a tick wait in one batch per receiver, delivered before the next tick. A dead
    node's messages are lost both ways, it does not tick, and the others' liveness calls it dead."""

    def __init__(self) -> None:
        self.replicas: dict[int, Replica] = {}
        self.in_flight: list[Message] = []
        self.delivered = 0
        self.dead: set[int] = set()
        self.cut: set[tuple[int, int]] = set()  # (from, to) links that lose every message
        self.lose: Callable[[Message], bool] = lambda message: False  # also lost: the messages this picks

    def is_alive(self, node: int) -> bool:
        return node not in self.dead

    def sender(self) -> _Sender:
        return _Sender(self)

    def deliver(self) -> None:
        batch = [m for m in self.in_flight if m.from_node not in self.dead and m.to_node not in self.dead
                 and (m.from_node, m.to_node) not in self.cut and not self.lose(m)]
        self.in_flight = []
        self.delivered += len(batch)
        stepped: dict[Replica, None] = {}
        for message in batch:
            replica = self.replicas[message.to_node]
            replica.step(message, kick=False)
            stepped[replica] = None
        for replica in stepped:
            replica.kick()


class _Sender:
    def __init__(self, network: Network) -> None:
        self.network = network

    def send_many(self, items: Sequence[tuple[str, Message]]) -> None:
        self.network.in_flight.extend(message for _, message in items)


def open_replicas(root: Path, network: Network, executor: ThreadPoolExecutor, log_config: LogConfig | None = None,
                  syncer: Syncer | None = None, **raft: Any) -> dict[int, Replica]:
    for node in NODES:
        open_replica(root, network, executor, node, log_config, syncer, **raft)
    return network.replicas


def open_replica(root: Path, network: Network, executor: ThreadPoolExecutor, node: int,
                 log_config: LogConfig | None = None, syncer: Syncer | None = None, **raft: Any) -> Replica:
    """Node ``node``'s replica from what its directory holds (``raft``: RaftConfig fields to override; syncer: the
    broker's native fsync threads, or a stand-in)."""
    directory = root / f"broker-{node}" / GROUP
    plog = PartitionLog.open(directory, log_config or LogConfig(), "calm", 0)
    replica = Replica(GROUP, plog, ReplicaStateFile(directory / "raft.state"), Membership.of(NODES),
                      RaftConfig(node_id=node, heartbeat_timeout_ticks=DEFAULT_RAFT_HEARTBEAT_TICKS, **raft),
                      network.sender(), executor, on_commit=lambda r, e: None, syncer=syncer)
    network.replicas[node] = replica
    return replica


async def tick_all(network: Network, ticks: int) -> None:
    """The broker's ticker, one tick for every replica at once: awake ones tick and may go quiet."""
    for _ in range(ticks):
        network.deliver()
        for node, replica in network.replicas.items():
            if not replica.quiet and node not in network.dead:
                replica.tick()
                replica.maybe_quiesce(network.is_alive)
        await asyncio.sleep(0.001)  # the pool's writes and fsyncs complete meanwhile


async def until(network: Network, condition: Callable[[], bool], what: str) -> None:
    """Tick until the condition holds: within MAX_TICKS ticks and DEADLINE_S seconds (fsyncs on a loaded machine
    may take longer than a few ticks' worth)."""
    deadline = time.monotonic() + DEADLINE_S
    ticks = 0
    while not condition():
        if ticks >= MAX_TICKS and time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {ticks} ticks and {DEADLINE_S} s")
        await tick_all(network, 1)
        ticks += 1


@contextlib.asynccontextmanager
async def elected_quiet_group(root: Path) -> AsyncIterator[tuple[Network, dict[int, Replica]]]:
    """Three replicas, node 1 elected, every replica gone quiet; closed afterwards."""
    network = Network()
    with ThreadPoolExecutor(2) as executor:
        replicas = open_replicas(root, network, executor)
        try:
            replicas[1].campaign_now()
            await until(network, lambda: replicas[1].node.role is Role.LEADER, "node 1 to lead")
            await until(network, lambda: all(r.quiet for r in replicas.values()), "every replica to go quiet")
            yield network, replicas
        finally:
            for replica in replicas.values():
                replica.close()


def write_one(replica: Replica, value: bytes) -> Entry:
    (entry,) = replica.propose([(rec.build_batch([(int(time.time() * 1000), None, value, [])]), 1)])
    return entry


def test_an_idle_group_goes_quiet_on_every_replica_and_stays_quiet(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with elected_quiet_group(tmp_path) as (network, replicas):
            sent_before = network.delivered + len(network.in_flight)
            await tick_all(network, QUIET_CHECK_TICKS)
            assert all(r.quiet for r in replicas.values()), {n: r.quiet for n, r in replicas.items()}
            assert network.delivered + len(network.in_flight) == sent_before, "a quiet group sent messages"

            entry = write_one(replicas[1], b"wake up")
            waiter = replicas[1].wait_committed(entry.last_offset)
            await until(network, waiter.done, "the write to commit")
            assert not replicas[1].quiet
            await until(network, lambda: all(r.quiet for r in replicas.values()), "the group to settle again")
            assert all(r.node.commit_offset == entry.last_offset for r in replicas.values())

    asyncio.run(scenario())


def test_a_group_with_a_dead_follower_goes_quiet_and_wakes_when_it_returns(tmp_path: Path) -> None:
    """A follower whose broker is dead cannot catch up: the leader goes quiet without it (waiting for it kept
    a group awake, ticking and heartbeating, until the broker came back). Back, its first messages wake the
    leader, which brings it up to date, and the group settles on all three again."""
    async def scenario() -> None:
        async with elected_quiet_group(tmp_path) as (network, replicas):
            network.dead.add(3)
            entry = write_one(replicas[1], b"while 3 is away")
            await until(network, replicas[1].wait_committed(entry.last_offset).done, "the write to commit on 1 and 2")
            await until(network, lambda: replicas[1].quiet and replicas[2].quiet, "the leader and 2 to go quiet")
            sent_before = network.delivered
            await tick_all(network, QUIET_CHECK_TICKS)
            assert replicas[1].quiet and replicas[2].quiet and network.delivered == sent_before

            network.dead.discard(3)
            for replica in replicas.values():  # what the broker does when liveness hears from a peer again
                replica.peer_returned(3)
            await until(network, lambda: replicas[3].node.log.last_offset == entry.last_offset,
                        "the returning follower to catch up")
            await until(network, lambda: all(r.quiet for r in replicas.values()), "the group to settle on all three")
            assert replicas[1].is_leader and replicas[3].node.commit_offset == entry.last_offset

    asyncio.run(scenario())


def test_a_node_cut_off_from_a_quiet_leader_alone_does_not_wake_the_other_follower(tmp_path: Path) -> None:
    """Node 3 loses its links to leader 1 (only those) and, its broker finding 1 silent, campaigns. Quiet
    follower 2 answers nothing in its lease and stays quiet: woken, it would tick while leader 1 sends nothing,
    its lease would run out and it would help node 3 depose a healthy leader."""
    async def scenario() -> None:
        async with elected_quiet_group(tmp_path) as (network, replicas):
            term = replicas[1].term
            network.cut |= {(1, 3), (3, 1)}
            replicas[3].leader_lost(1, successor=True)  # what node 3's broker concludes
            await tick_all(network, QUIET_CHECK_TICKS)
            assert replicas[1].is_leader and replicas[1].term == term
            assert replicas[2].quiet and replicas[2].node.leader_id == 1 and replicas[2].term == term

    asyncio.run(scenario())



def test_a_follower_catching_up_leaves_its_wait_although_the_heartbeat_that_would_end_it_is_lost(
        tmp_path: Path) -> None:
    """Node 3 comes back on an empty disk and waits to catch up (it votes for nobody until then). Only a leader
    heartbeat carrying the settled commit offset ends that wait. The leader's heartbeats to node 3 are lost while
    node 3 catches up: the leader must not go quiet until node 3 has said it no longer waits, or node 3 stays out
    of every election until the next write (seen on a loaded machine: a replaced disk's metadata log never
    voted)."""
    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            async with elected_quiet_group(tmp_path) as (network, replicas):
                entry = write_one(replicas[1], b"before the disk is replaced")
                await until(network, lambda: all(r.quiet for r in replicas.values()), "the group to settle")
                network.lose = lambda m: m.type is MessageType.HEARTBEAT and m.to_node == 3
                replica = replace_disk_of(tmp_path, network, executor, 3)
                await until(network, lambda: replica.node.log.last_offset == entry.last_offset
                            and replicas[1].node.progress(3).match_offset == entry.last_offset,  # type: ignore[union-attr]
                            "node 3 to hold the leader's log")
                await tick_all(network, QUIET_CHECK_TICKS)
                assert not replicas[1].quiet, "the leader went quiet while node 3 still waits to catch up"
                assert replica.catching_up

                network.lose = lambda m: False
                await until(network, lambda: not replica.catching_up, "node 3 to end its wait")
                await until(network, lambda: all(r.quiet for r in replicas.values()), "the group to settle again")

    asyncio.run(scenario())


def replace_disk_of(root: Path, network: Network, executor: ThreadPoolExecutor, node: int) -> Replica:
    """Node ``node``'s replica reopened on an empty directory, as its broker does after a disk replacement: it
    waits to catch up from the leader, which its first answer wakes."""
    network.replicas[node].close()
    shutil.rmtree(root / f"broker-{node}")
    replica = open_replica(root, network, executor, node)
    replica.start()
    leader = next(r for r in network.replicas.values() if r.is_leader)
    replica.rejoin_after_losing_state(leader_hint=leader.node_id, leader_term=leader.term)
    return replica
