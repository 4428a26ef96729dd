"""A leader whose Ready waits long for its disk keeps its leadership while its followers still answer.

After a broker dies, each survivor elects thousands of groups at once, and every new leader's first entry is
an fsync queued behind thousands of others, on the leader and on each follower. While a replica's Ready is
being persisted it takes no other Ready; the messages that may leave before a persist (heartbeats, and the
answers to them) must still leave, or the new leader hears nothing for an election timeout, check-quorum
deposes it and the group elects again (hundreds of groups elected twice in a 10,000-partition failover).

Three production Replicas on one event loop (the harness of test_replica_quiescence), with every write and
fsync held at a gate while the ticks go on."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from logbroker.raft.types import Role
from tests.cluster.test_replica_quiescence import Network, open_replicas, tick_all, until, write_one

# Longer than any follower's randomised election timeout (10-20 ticks) and than the leader's check-quorum
# window (10 ticks), three times over.
HELD_TICKS = 60
GATE_WAIT_S = 30.0


class GatedExecutor(Executor):
    """A thread pool whose jobs wait at a gate before they run: a disk whose fsyncs queue for a long time."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(threads)
        self.gate = threading.Event()
        self.gate.set()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def gated() -> Any:
            if not self.gate.wait(GATE_WAIT_S):
                raise TimeoutError("the test never opened the gate")
            return fn(*args, **kwargs)

        return self._pool.submit(gated)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.gate.set()
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)


def test_a_leader_whose_write_waits_on_the_disk_keeps_leading_while_its_followers_answer(tmp_path: Path) -> None:
    async def scenario() -> None:
        network = Network()
        executor = GatedExecutor(threads=4)
        replicas = open_replicas(tmp_path, network, executor)
        try:
            replicas[1].campaign_now()
            await until(network, lambda: replicas[1].node.role is Role.LEADER, "node 1 to lead")
            await until(network, lambda: all(r.node.leader_id == 1 for r in replicas.values()),
                        "every replica to know its leader")
            term = replicas[1].term

            executor.gate.clear()  # from now on every write and fsync waits
            entry = write_one(replicas[1], b"held at the disk")
            await tick_all(network, HELD_TICKS)

            assert replicas[1].node.role is Role.LEADER and replicas[1].term == term, (
                f"the leader was deposed while its write waited: role {replicas[1].node.role}, "
                f"term {replicas[1].term} (was {term})")
            assert all(r.term == term for r in replicas.values()), {n: r.term for n, r in replicas.items()}
            committed = replicas[1].wait_committed(entry.last_offset)
            assert not committed.done()  # nothing is durable anywhere yet: the write cannot have committed

            executor.gate.set()
            await until(network, committed.done, "the held write to commit once the disk answers")
            assert committed.exception() is None
            assert replicas[1].term == term
        finally:
            for replica in replicas.values():
                replica.close()
            executor.shutdown()

    asyncio.run(scenario())
