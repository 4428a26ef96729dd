"""A deterministic simulation of the real Raft runtime: production Replica objects over production
PartitionLogs and ReplicaStateFiles, on simulated disks, under a simulated network and clock.

TigerBeetle's way: the simulator runs the real replica. Three nodes form one Raft group. Each node has its
own SimDisk (disk.py), so every byte the runtime writes goes through the partition log's segments and
indexes, the leader-epoch file and the two-slot Raft state file, and a crash keeps only what was fsynced
(plus a random, possibly torn, prefix of the rest). Each node's thread pool is a SimExecutor and the whole
run is one SimEventLoop (loop.py), so writes and fsyncs take virtual time while the node goes on stepping
messages and ticking, as with real threads. Messages go through the production wire codec.

Everything random comes from one random.Random(seed), so a seed replays exactly.

Checked all the time: the Raft checkers of tests/raft/sim (election safety, log matching, leader completeness,
state machine safety, no committed entry cut, durable term/vote/commit), fed from the real runtime, and
runtime-side assertions:
  - nothing at or below the high watermark is ever truncated (a Ready's cut, and recovery after a crash);
  - what a node promised is durable: after a power cut, its recovered log still holds the last entry it
    reported persisted, acknowledged to a leader (APPEND_RESP) or released to an acks=1 producer, and its
    Raft state still holds every term it spoke in and every vote it granted;
  - after recovery the replica's Raft log is the partition log: same end, same term there;
  - every acks=all write a producer saw acknowledged is committed, and stays in every log;
  - anything else a replica raises (not a disk error) is a failure.
After the chaos the faults heal and a fresh write must commit and reach every node (liveness, catch-up).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from logbroker_client import records as rec

from logbroker.cluster import raft_codec
from logbroker.cluster.raft_storage import DamagedLogError
from logbroker.cluster.replica import Replica
from logbroker.cluster.state_log import GroupStateFile, RaftStateLog
from logbroker.raft.errors import RaftError
from logbroker.raft.membership import Membership
from logbroker.raft.types import Entry, EntryKind, Message, MessageType, RaftConfig, Ready
from logbroker.storage.config import LogConfig
from logbroker.storage.errors import StorageError
from logbroker.storage.files import FileSystem, probe_write
from logbroker.storage.log import PartitionLog, PendingFlush
from tests.raft.runtime_sim.disk import SimDisk
from tests.raft.runtime_sim.loop import Job, SimEventLoop, SimExecutor
from tests.raft.sim.checkers import Checkers, InvariantViolation

GROUP = "sim-0"
TOPIC = "sim"
NODES = (1, 2, 3)
TICK_S = 0.01
ELECTION_TICKS = 10
STEP_S = 0.005
FAILED_REPLICA_RETRY_S = 0.5  # as the broker's retry of a replica that could not write, but sooner
TRACE_LENGTH = 40
STATE_LOG_COMPACT_BYTES = 2048  # the shared Raft state log is rewritten this often (production: MiBs)
MAX_UNCOMMITTED_OFFSETS = 60
HEAL_BUDGET_S = 30.0  # after healing, a fresh write must commit within this much virtual time...
CATCH_UP_BUDGET_S = 30.0  # ...and then reach every node within this much more


@dataclass(frozen=True)
class RuntimeProfile:
    """The shape of one seed's run, drawn from the seed."""

    drop_rate: float
    duplicate_rate: float
    max_delay_s: float
    tick_skew: dict[int, float]
    write_latency_s: float
    fsync_latency_s: float
    fault_rate: float  # per step
    propose_rate: float  # per step
    acks_all_share: float
    segment_bytes: int
    index_interval_bytes: int
    max_msg_bytes: int
    max_inflight_bytes: int

    @classmethod
    def draw(cls, rng: random.Random) -> RuntimeProfile:
        return cls(
            drop_rate=rng.choice((0.0, 0.01, 0.05)),
            duplicate_rate=rng.choice((0.0, 0.01, 0.05)),
            max_delay_s=rng.choice((0.0005, 0.002, 0.01)),
            tick_skew={node: rng.uniform(0.7, 1.3) for node in NODES},
            write_latency_s=rng.choice((0.0001, 0.001, 0.004)),
            fsync_latency_s=rng.choice((0.0005, 0.003, 0.012)),
            fault_rate=rng.choice((0.01, 0.02, 0.04)),
            propose_rate=rng.choice((0.1, 0.3, 0.6)),
            acks_all_share=rng.choice((0.5, 0.8, 1.0)),
            segment_bytes=rng.choice((600, 2000, 1 << 20)),
            index_interval_bytes=rng.choice((100, 4096)),
            max_msg_bytes=rng.choice((300, 4096, 1 << 20)),
            max_inflight_bytes=rng.choice((1000, 1 << 20)),
        )


@dataclass
class Promise:
    """The highest log position a node has promised durable: (offset, term of the entry there), and why."""

    offset: int = -1
    term: int = 0
    why: str = ""
    # While a log reset (a follower's whole log replaced by a leader's later start) is not yet reported durable,
    # a crash may bring back the log from before it, which is as good: the node answered nothing about the
    # reset. Either this promise or the one from before the reset must hold after recovery.
    before_reset: Promise | None = None

    def held_by(self, plog: PartitionLog) -> bool:
        """Whether a recovered log keeps this promise (or, a reset still pending, the one before it)."""
        kept = True
        if self.offset >= plog.log_start_offset:
            kept = self.offset < plog.log_end_offset and plog.epoch_at(self.offset) == self.term
        return kept or (self.before_reset is not None and self.before_reset.held_by(plog))


@dataclass
class SimNode:
    node_id: int
    disk: SimDisk
    directory: Path
    skew: float
    up: bool = True
    incarnation: int = 0
    replica: Replica | None = None
    executor: SimExecutor | None = None
    # The broker's shared Raft state log: one per process, so a crash drops it and the next open reloads it.
    state_log: RaftStateLog | None = None
    promise: Promise = field(default_factory=Promise)
    spoken_term: int = 0  # the highest term of any message it sent (pre-votes aside)
    granted: dict[int, int] = field(default_factory=dict)  # term -> the candidate it voted for
    hw_at_crash: int = 0


class SimSyncer:
    """The broker's native fsync threads, simulated: each fsync a job of the node's executor, so it takes a
    virtual fsync's time, meets the disk's faults, and is lost with the node's other jobs in a crash."""

    def __init__(self, executor: SimExecutor) -> None:
        self._executor = executor

    @staticmethod
    def supports(fs: FileSystem) -> bool:
        return True

    def fdatasync(self, fs: FileSystem, fd: int) -> asyncio.Future[None]:
        return asyncio.get_running_loop().run_in_executor(self._executor, fs.fsync, fd)


@dataclass
class RuntimeResult:
    seed: int
    virtual_s: float
    committed_offset: int
    max_term: int
    acked_writes: int
    stats: dict[str, int]


class ObservedReplica(Replica):
    """The production Replica, with the simulator's checks around each Ready it handles."""

    sim: RuntimeSimulation

    async def _handle(self, ready: Ready) -> None:
        self.sim.before_ready(self, ready)
        await super()._handle(ready)
        self.sim.after_ready(self, ready)

    def _end_flush(self, pending: PendingFlush, error: OSError | None) -> None:
        self.sim.stats["split_fsync_failed" if error is not None else "split_fsync"] += 1
        super()._end_flush(pending, error)


def canonical(entry: Entry) -> Entry:
    """The entry as the partition log holds it: a DATA batch with its offset and epoch stamped (a proposal's
    payload is the producer's unstamped batch; the same entry read back from a log is stamped)."""
    if entry.kind is not EntryKind.DATA:
        return entry
    batch = bytearray(entry.payload)
    rec.stamp_batch(batch, entry.base_offset, entry.term)
    return replace(entry, payload=bytes(batch))


class RuntimeSimulation:
    def __init__(self, seed: int, chaos_s: float = 3.0, replica_class: type[ObservedReplica] = ObservedReplica,
                 profile: RuntimeProfile | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        # Half the seeds give replicas the broker's other fsync path: small appends written on the loop and their
        # fsync run apart (Replica._write_then_sync). Drawn from a generator of its own, so each seed's run
        # otherwise stays what it was before this path existed.
        self.split_fsync = random.Random(f"split-fsync-{seed}").random() < 0.5
        self.profile = profile if profile is not None else RuntimeProfile.draw(self.rng)
        self.chaos_s = chaos_s
        self.replica_class = type("SimReplica", (replica_class,), {"sim": self})
        self.loop = SimEventLoop()
        self.checkers = Checkers()
        self.trace: deque[tuple[float, str]] = deque(maxlen=TRACE_LENGTH)
        self.stats: Counter[str] = Counter()
        self.membership = Membership.of(NODES)
        self.log_config = LogConfig(segment_bytes=self.profile.segment_bytes,
                                    index_interval_bytes=self.profile.index_interval_bytes)
        self.partitioned: dict[int, int] = {}  # node -> side; missing nodes share side 0
        self.write_count = 0
        self.acked_all: dict[int, Entry] = {}  # last offset -> the acks=all write acknowledged there
        self.violation: InvariantViolation | None = None
        self.healed = False  # the chaos is over: faults scheduled earlier no longer fire
        self.nodes: dict[int, SimNode] = {}
        for node_id in NODES:
            disk = SimDisk(random.Random(self.rng.random()), self._clock_ns)
            directory = Path(f"/sim/node-{node_id}/{TOPIC}-0")
            disk.mkdir(directory)
            self.nodes[node_id] = SimNode(node_id, disk, directory, self.profile.tick_skew[node_id])

    # ================================================================================== the run
    def run(self) -> RuntimeResult:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except InvariantViolation:
            raise
        except (AssertionError, RaftError) as error:
            raise InvariantViolation("runtime internal error", f"{type(error).__name__}: {error}") from error
        finally:
            self._shutdown()
        return RuntimeResult(
            self.seed, self.loop.time(), self.checkers.max_committed_offset,
            max((n.replica.term for n in self.nodes.values() if n.replica is not None), default=0),
            len(self.acked_all), dict(self.stats))

    def _shutdown(self) -> None:
        for sim_node in self.nodes.values():
            if sim_node.executor is not None:
                sim_node.executor.kill()
            if sim_node.replica is not None:
                sim_node.replica.closed = True
        with suppress(Exception):
            self.loop.run_until_complete(asyncio.sleep(0))
        asyncio.set_event_loop(None)
        self.loop.close()

    async def _main(self) -> None:
        for sim_node in self.nodes.values():
            self.open(sim_node, why="start")
        steps = round(self.chaos_s / STEP_S)
        for _ in range(steps):
            if self.rng.random() < self.profile.fault_rate:
                self.inject_fault()
            if self.rng.random() < self.profile.propose_rate:
                self.client_write()
            await self.step()
        await self.heal_and_check_liveness()

    async def step(self) -> None:
        await asyncio.sleep(STEP_S)
        self.check_now()

    def check_now(self) -> None:
        if self.violation is not None:
            raise self.violation
        if self.loop.errors:
            error = self.loop.errors[0]
            raise InvariantViolation("runtime internal error", f"unhandled in the event loop: {error!r}")
        self.checkers.after_step({i: n.replica.node for i, n in self.nodes.items() if self._alive(n)})

    def fail(self, invariant: str, detail: str) -> None:
        """Record a violation found inside a callback; the run stops at the next check."""
        if self.violation is None:
            self.violation = InvariantViolation(invariant, detail)
        raise self.violation

    def note(self, text: str) -> None:
        self.trace.append((self.loop.time(), text))

    def format_trace(self) -> list[str]:
        return [f"  {at * 1000:9.1f} ms  {text}" for at, text in self.trace]

    def _clock_ns(self) -> int:
        return int(self.loop.time() * 1e9)

    def _clock_ms(self) -> int:
        return int(self.loop.time() * 1000)

    @staticmethod
    def _alive(sim_node: SimNode) -> bool:
        replica = sim_node.replica
        return sim_node.up and replica is not None and not replica.closed

    # ================================================================================== nodes
    def open(self, sim_node: SimNode, why: str, damaged_from: int | None = None, high_watermark: int = 0) -> None:
        """Start (or restart) the node's replica from its disk, as the broker opens a partition."""
        if sim_node.executor is None or sim_node.executor.dead:
            latency = self._latency(sim_node)
            sim_node.executor = SimExecutor(self.loop, latency, split_replica_jobs)
        try:
            plog = PartitionLog.open(sim_node.directory, self.log_config, TOPIC, 0, fs=sim_node.disk)
            if damaged_from is not None and plog.log_start_offset <= damaged_from < plog.log_end_offset:
                if damaged_from < high_watermark:
                    self.fail("committed entry truncated", f"node {sim_node.node_id} reopens its replica cut at "
                              f"{damaged_from}, below its high watermark {high_watermark}")
                plog.truncate_to(damaged_from)
            if sim_node.state_log is None:
                # Small, so that runs rewrite it often (a rewrite is a crash window of its own).
                sim_node.state_log = RaftStateLog.open(sim_node.directory.parent, fs=sim_node.disk,
                                                       min_compact_bytes=STATE_LOG_COMPACT_BYTES)
            state_file = GroupStateFile(sim_node.state_log, GROUP)
            replica = self.replica_class(
                GROUP, plog, state_file, self.membership,
                RaftConfig(node_id=sim_node.node_id, election_timeout_ticks=ELECTION_TICKS,
                           max_msg_bytes=self.profile.max_msg_bytes,
                           max_inflight_bytes=self.profile.max_inflight_bytes),
                _Transport(self, sim_node, sim_node.incarnation), sim_node.executor,
                on_commit=self._on_commit, on_failure=self._on_failure, name=f"node-{sim_node.node_id}",
                clock_ms=self._clock_ms,
                rng=random.Random(self.seed * 7919 + sim_node.node_id * 104729 + sim_node.incarnation),
                syncer=SimSyncer(sim_node.executor) if self.split_fsync else None,
            )
        except (StorageError, OSError, ValueError) as exc:
            if not (sim_node.disk.full or sim_node.disk.fsync_error_rate) or isinstance(exc, ValueError):
                self.fail("reopen failed", f"node {sim_node.node_id} cannot open its replica ({why}): "
                          f"{type(exc).__name__}: {exc}")
            # The disk is failing right now: the broker logs it, and the replica stays down until a retry.
            self.note(f"node {sim_node.node_id} cannot open its replica yet ({why}): {exc}")
            sim_node.up = False
            sim_node.replica = None
            self.loop.call_later(FAILED_REPLICA_RETRY_S, self._retry_open, sim_node, sim_node.incarnation, why)
            return
        self.check_recovered(sim_node, replica, why)
        sim_node.replica = replica
        sim_node.up = True
        self.checkers.on_restart(sim_node.node_id, replica.node)
        # A partition's commit offset is volatile (saved only with term and vote): it may come back lower.
        self.checkers.on_log_cut(sim_node.node_id, replica.node.commit_offset)
        self.note(f"open node {sim_node.node_id} ({why}): log {plog.log_start_offset}..{plog.log_end_offset - 1}, "
                  f"t{replica.term}, vote {replica.node.vote}")
        replica.start()
        self._schedule_tick(sim_node, sim_node.incarnation, replica)

    def _retry_open(self, sim_node: SimNode, incarnation: int, why: str) -> None:
        if sim_node.incarnation == incarnation and not sim_node.up:
            self.open(sim_node, why)

    def _latency(self, sim_node: SimNode) -> Callable[[Callable[..., Any]], float]:
        rng = random.Random(self.rng.random())
        write_s, fsync_s = self.profile.write_latency_s, self.profile.fsync_latency_s

        def latency(fn: Callable[..., Any]) -> float:
            slow = fsync_s if getattr(fn, "__name__", "") in ("_fsync", "fsync") else write_s
            return rng.uniform(0.2 * slow, slow)
        return latency

    def _schedule_tick(self, sim_node: SimNode, incarnation: int, replica: Replica) -> None:
        def tick() -> None:
            if sim_node.incarnation != incarnation or sim_node.replica is not replica or not self._alive(sim_node):
                return
            replica.tick()
            self.loop.call_later(TICK_S * sim_node.skew, tick)
        self.loop.call_later(TICK_S * sim_node.skew * self.rng.random(), tick)

    def crash(self, sim_node: SimNode, power: bool, why: str) -> None:
        """The node's process dies (kill -9), or its machine loses power (unsynced writes lost or torn)."""
        if not sim_node.up:
            return
        replica = sim_node.replica
        assert replica is not None and sim_node.executor is not None
        sim_node.up = False
        sim_node.incarnation += 1
        sim_node.hw_at_crash = replica.high_watermark
        replica.closed = True  # the process is gone: nothing of it runs any more
        sim_node.executor.kill()
        sim_node.state_log = None
        if power:
            sim_node.disk.power_cut()
            self.stats["power_cut"] += 1
        else:
            sim_node.disk.kill()
            self.stats["kill"] += 1
        self.note(f"{'power cut' if power else 'kill -9'} node {sim_node.node_id} ({why}); HW was "
                  f"{sim_node.hw_at_crash}, promised {sim_node.promise}")

    def restart(self, sim_node: SimNode) -> None:
        sim_node.disk.full = False  # the operator freed space
        self.open(sim_node, why="restart after a crash")

    # ================================================================================== runtime checks
    def check_recovered(self, sim_node: SimNode, replica: Replica, why: str) -> None:
        """What a node promised must have survived; its Raft log must be its partition log."""
        node_id, plog, node = sim_node.node_id, replica.log, replica.node
        last = plog.log_end_offset - 1
        term_there = plog.epoch_at(last) if last >= plog.log_start_offset else node.log.last_term
        if node.log.last_offset != last or node.log.last_term != term_there:
            self.fail("replica log is not the partition log",
                      f"node {node_id} ({why}): Raft log ends at {node.log.last_offset}/t{node.log.last_term}, "
                      f"the partition log at {last}")
        promise = sim_node.promise
        if not promise.held_by(plog):
            held = plog.epoch_at(promise.offset) if plog.log_start_offset <= promise.offset <= last else None
            self.fail("promised entry lost",
                      f"node {node_id} ({why}) promised offset {promise.offset} of term {promise.term} durable "
                      f"({promise.why}), but its log after recovery ends at {last}"
                      + (f" with term {held} there" if held is not None else "")
                      + (f" (nor does it keep {promise.before_reset})" if promise.before_reset else ""))
        if plog.log_end_offset < sim_node.hw_at_crash:
            self.fail("committed entry truncated",
                      f"node {node_id} ({why}) had high watermark {sim_node.hw_at_crash}, its log after recovery "
                      f"ends at {last}")
        state = replica.state
        if state.term < sim_node.spoken_term:
            self.fail("promised term lost", f"node {node_id} ({why}) sent messages in term {sim_node.spoken_term}, "
                      f"but its Raft state after recovery has term {state.term}")
        for term, candidate in sim_node.granted.items():
            if state.term == term and state.vote != candidate:
                self.fail("promised vote lost", f"node {node_id} ({why}) granted its vote in term {term} to "
                          f"{candidate}, but its Raft state after recovery has vote {state.vote} in that term")

    def promise(self, sim_node: SimNode, offset: int, term: int, why: str) -> None:
        if offset > sim_node.promise.offset:
            sim_node.promise = Promise(offset, term, why)

    def current(self, replica: Replica) -> SimNode | None:
        """The replica's node, if the replica is the live one there (not a crashed process's leftover)."""
        sim_node = self.nodes[replica.node_id]
        return sim_node if sim_node.up and sim_node.replica is replica and not replica.closed else None

    def before_ready(self, replica: Replica, ready: Ready) -> None:
        sim_node = self.current(replica)
        if sim_node is None:
            return
        node_id = sim_node.node_id
        self.checkers.before_write(node_id, replica._storage, ready)  # type: ignore[arg-type]
        self.checkers.on_write(node_id, replica.node, ready)
        cut = None
        if ready.reset_log is not None:
            cut = ready.reset_log.start_offset
            if cut < replica.high_watermark:
                self.fail("committed entry truncated", f"node {node_id} resets its log to start at {cut}, below "
                          f"its high watermark {replica.high_watermark}")
        if ready.truncate_from is not None:
            if ready.truncate_from < replica.high_watermark:
                self.fail("committed entry truncated", f"node {node_id} truncates its log at {ready.truncate_from}, "
                          f"below its high watermark {replica.high_watermark}")
            cut = ready.truncate_from if cut is None else min(cut, ready.truncate_from)
        if ready.reset_log is not None:
            # The node's entries give way to the leader's start (prev_term is the leader's term there, not
            # something this node wrote): until the reset is durable, the log from before it may come back.
            start = ready.reset_log.start_offset
            sim_node.promise = Promise(start - 1, ready.reset_log.prev_term, f"log reset to start at {start}",
                                       before_reset=sim_node.promise)
        elif cut is not None and sim_node.promise.offset >= cut:
            # Raft may cut what a node acknowledged but was never committed; the promise moves back with it.
            sim_node.promise = Promise(cut - 1, replica._storage.term_at(cut - 1) or 0, f"cut back at {cut}")

    def after_ready(self, replica: Replica, ready: Ready) -> None:
        sim_node = self.current(replica)
        if sim_node is None:
            return
        canonical_ready = replace(ready, entries=tuple(canonical(e) for e in ready.entries))
        self.checkers.after_persist(sim_node.node_id, replica.node, canonical_ready)
        if ready.reset_log is not None and sim_node.promise.before_reset is not None:
            sim_node.promise = replace(sim_node.promise, before_reset=None)  # the reset is durable now
        if ready.entries:
            last = ready.entries[-1]
            self.promise(sim_node, last.last_offset, last.term, "reported persisted")

    def _on_commit(self, replica: Replica, entries: Sequence[Entry]) -> None:
        sim_node = self.current(replica)
        if sim_node is not None:
            self.checkers.on_committed(sim_node.node_id, replica.node, [canonical(e) for e in entries])

    def _on_failure(self, replica: Replica, exc: Exception) -> None:
        sim_node = self.nodes[replica.node_id]
        if not isinstance(exc, (StorageError, OSError, DamagedLogError)):
            self.fail("runtime internal error", f"node {sim_node.node_id}'s replica failed: {type(exc).__name__}: "
                      f"{exc}")
        self.stats["replica_failed"] += 1
        self.note(f"node {sim_node.node_id}'s replica stops: {exc}")
        incarnation = sim_node.incarnation
        self.loop.call_later(FAILED_REPLICA_RETRY_S, self.retry_failed, sim_node, replica, incarnation)

    def retry_failed(self, sim_node: SimNode, failed: Replica, incarnation: int) -> None:
        """As the broker does: once a probe write succeeds, close the replica and open it again."""
        if sim_node.incarnation != incarnation or sim_node.replica is not failed or not sim_node.up:
            return
        try:
            probe_write(sim_node.directory, size_bytes=4096, fs=sim_node.disk)
        except OSError:
            self.loop.call_later(FAILED_REPLICA_RETRY_S, self.retry_failed, sim_node, failed, incarnation)
            return
        with suppress(Exception):  # its files may be what failed; reopening recovers them
            failed.close()
        self.stats["replica_reopened"] += 1
        self.open(sim_node, why="reopen after a write failure", damaged_from=failed.damaged_from,
                  high_watermark=failed.high_watermark)

    # ================================================================================== network
    def send(self, sim_node: SimNode, incarnation: int, items: Sequence[tuple[str, Message]]) -> None:
        replica = sim_node.replica
        if sim_node.incarnation != incarnation or not sim_node.up:
            return  # a crashed process sends nothing
        for group, message in items:
            self.observe_sent(sim_node, replica, message)
            if self.rng.random() < self.profile.drop_rate:
                continue
            raw = raft_codec.encode_message(group, message).SerializeToString()
            copies = 2 if self.rng.random() < self.profile.duplicate_rate else 1
            for _ in range(copies):
                target = self.nodes[message.to_node]
                delay = self.rng.uniform(0.0001, self.profile.max_delay_s)
                self.loop.call_later(delay, self.deliver, raw, message.from_node, message.to_node, target.incarnation)

    def observe_sent(self, sim_node: SimNode, replica: Replica | None, message: Message) -> None:
        """What a message promises: its term (unless a pre-vote's), a vote granted, an acknowledged entry."""
        if message.type not in (MessageType.PRE_VOTE, MessageType.PRE_VOTE_RESP):
            sim_node.spoken_term = max(sim_node.spoken_term, message.term)
        if message.type is MessageType.VOTE_RESP and not message.reject:
            sim_node.granted[message.term] = message.to_node
        if message.type is MessageType.APPEND_RESP and not message.reject and message.match_offset >= 0 \
                and replica is not None:
            term = replica.node.log.term_at(message.match_offset)
            if term is not None:
                self.promise(sim_node, message.match_offset, term, f"acknowledged to node {message.to_node}")

    def deliver(self, raw: bytes, from_node: int, to_node: int, incarnation: int) -> None:
        target = self.nodes[to_node]
        if target.incarnation != incarnation or not self._alive(target) or not self.connected(from_node, to_node):
            return
        pb_message = raft_codec.pb.RaftMessage()
        pb_message.ParseFromString(raw)
        group, message = raft_codec.decode_message(pb_message, from_node, to_node)
        assert group == GROUP and target.replica is not None
        self.stats[message.type.value] += 1
        target.replica.step(message)

    def connected(self, a: int, b: int) -> bool:
        return self.partitioned.get(a, 0) == self.partitioned.get(b, 0)

    # ================================================================================== clients
    def leader(self) -> SimNode | None:
        leaders = [n for n in self.nodes.values() if self._alive(n) and n.replica is not None and n.replica.is_leader]
        return max(leaders, key=lambda n: n.replica.term if n.replica else 0) if leaders else None

    def client_write(self, marker: bool = False) -> tuple[SimNode, Entry, asyncio.Future[None]] | None:
        leaders = [n for n in self.nodes.values() if self._alive(n) and n.replica is not None and n.replica.is_leader]
        if not leaders:
            return None
        sim_node = self.rng.choice(leaders)
        replica = sim_node.replica
        assert replica is not None
        if replica.node.log.last_offset - replica.high_watermark > MAX_UNCOMMITTED_OFFSETS and not marker:
            return None
        self.write_count += 1
        count = self.rng.randint(1, 3)
        batch = rec.build_batch([(self._clock_ms(), None, f"s{self.seed}w{self.write_count}r{i}".encode(), [])
                                 for i in range(count)])
        acks_all = marker or self.rng.random() < self.profile.acks_all_share
        try:
            (entry,) = replica.propose([(batch, count)])
        except RaftError:
            return None
        waiter = replica.wait_committed(entry.last_offset) if acks_all else replica.wait_durable(entry.last_offset)
        waiter.add_done_callback(lambda future: self.on_ack(sim_node, replica, entry, acks_all, future))
        self.note(f"write at node {sim_node.node_id}: [{entry.base_offset}..{entry.last_offset}] t{entry.term} "
                  f"acks={'all' if acks_all else 1}")
        return sim_node, entry, waiter

    def on_ack(self, sim_node: SimNode, replica: Replica, entry: Entry, acks_all: bool,
               future: asyncio.Future[None]) -> None:
        if future.cancelled() or future.exception() is not None or self.current(replica) is None:
            return  # refused, or released by a crashed process: no producer hears of it
        if acks_all:
            known = self.checkers.committed.get(entry.last_offset)
            if known is None or known.term != entry.term or known.payload != canonical(entry).payload:
                self.fail("acknowledged write not committed",
                          f"node {sim_node.node_id} acknowledged [{entry.base_offset}..{entry.last_offset}] "
                          f"t{entry.term} to an acks=all producer, but the committed entry there is {known}")
            self.acked_all[entry.last_offset] = canonical(entry)
        else:
            self.promise(sim_node, entry.last_offset, entry.term, "acknowledged to an acks=1 producer")

    # ================================================================================== faults
    def inject_fault(self) -> None:
        fault = self.rng.choice((
            "partition", "isolate_leader", "heal", "heal",
            "power_cut", "power_cut_leader", "kill", "restart", "restart",
            "disk_full", "fsync_errors", "failing_disk", "retention", "transfer",
        ))
        self.stats[fault] += 1
        getattr(self, f"fault_{fault}")()

    def fault_partition(self) -> None:
        nodes = list(NODES)
        self.rng.shuffle(nodes)
        cut = self.rng.randint(1, len(nodes) - 1)
        self.partitioned = {node: 0 if i < cut else 1 for i, node in enumerate(nodes)}
        self.note(f"partition {sorted(nodes[:cut])} | {sorted(nodes[cut:])}")

    def fault_isolate_leader(self) -> None:
        leader = self.leader()
        if leader is not None:
            self.partitioned = {leader.node_id: 1}
            self.note(f"isolate leader {leader.node_id}")

    def fault_heal(self) -> None:
        self.partitioned = {}
        self.note("heal network")

    def fault_power_cut(self) -> None:
        up = [n for n in self.nodes.values() if n.up]
        if up and len(up) > 1:
            self.crash(self.rng.choice(up), power=True, why="at random")

    def fault_power_cut_leader(self) -> None:
        leader = self.leader()
        if leader is not None:
            self.crash(leader, power=True, why="the leader")

    def fault_kill(self) -> None:
        up = [n for n in self.nodes.values() if n.up]
        if up and len(up) > 1:
            self.crash(self.rng.choice(up), power=False, why="at random")

    def fault_restart(self) -> None:
        down = [n for n in self.nodes.values() if not n.up]
        if down:
            self.restart(self.rng.choice(down))

    def fault_disk_full(self) -> None:
        sim_node = self.rng.choice(list(self.nodes.values()))
        sim_node.disk.full = True
        duration = self.rng.uniform(0.05, 1.0)
        self.note(f"node {sim_node.node_id}'s disk is full for {duration * 1000:.0f} ms")
        self.loop.call_later(duration, self._free_space, sim_node)

    def _free_space(self, sim_node: SimNode) -> None:
        sim_node.disk.full = False
        self.note(f"node {sim_node.node_id}'s disk has room again")

    def fault_fsync_errors(self) -> None:
        self._fail_fsyncs()

    def _fail_fsyncs(self) -> SimNode:
        sim_node = self.rng.choice(list(self.nodes.values()))
        sim_node.disk.fsync_error_rate = self.rng.choice((0.05, 0.3))
        duration = self.rng.uniform(0.02, 0.5)
        self.note(f"node {sim_node.node_id}'s fsyncs fail with EIO at rate {sim_node.disk.fsync_error_rate} "
                  f"for {duration * 1000:.0f} ms")
        self.loop.call_later(duration, self._disk_healthy, sim_node)
        return sim_node

    def _disk_healthy(self, sim_node: SimNode) -> None:
        sim_node.disk.fsync_error_rate = 0.0

    def fault_failing_disk(self) -> None:
        """What an operator of a dying disk sees: fsyncs fail for a while, the process is killed (or crashes)
        and restarted at once, and later the machine loses power. A restart that trusts pages a failed fsync
        dropped acknowledges entries the power cut then takes."""
        sim_node = self._fail_fsyncs()
        kill_after_s = self.rng.uniform(0.01, 0.3)
        self._during_chaos(kill_after_s, self.crash, sim_node, False, "its disk was failing")
        self._during_chaos(kill_after_s + 0.05, self._restart_if_down, sim_node)
        self._during_chaos(kill_after_s + self.rng.uniform(0.2, 0.8), self.crash, sim_node, True,
                           "after its disk had failed")

    def _during_chaos(self, delay_s: float, fault: Callable[..., None], *args: Any) -> None:
        """Run fault after delay_s, unless the chaos is over by then (the liveness check runs undisturbed)."""
        self.loop.call_later(delay_s, lambda: None if self.healed else fault(*args))

    def _restart_if_down(self, sim_node: SimNode) -> None:
        if not sim_node.up:
            self.restart(sim_node)

    def fault_retention(self) -> None:
        """Delete closed segments below the high watermark, as the broker's retention does (the leader's, half
        the time: lagging followers then need a log reset)."""
        alive = [n for n in self.nodes.values() if self._alive(n)]
        leader = self.leader()
        sim_node = leader if leader is not None and self.rng.random() < 0.5 else (
            self.rng.choice(alive) if alive else None)
        if sim_node is None or sim_node.replica is None:
            return
        replica = sim_node.replica
        try:
            deleted = replica.truncate_prefix(replica.high_watermark)
        except (StorageError, OSError) as exc:
            self.note(f"retention on node {sim_node.node_id} failed: {exc}")
            return
        if deleted:
            self.stats["segments_deleted"] += deleted
            self.note(f"retention on node {sim_node.node_id}: log now starts at {replica.log.log_start_offset}")

    def fault_transfer(self) -> None:
        leader = self.leader()
        if leader is None or leader.replica is None:
            return
        target = self.rng.choice([n for n in NODES if n != leader.node_id])
        with suppress(RaftError):
            leader.replica.transfer_leadership(target)
            self.note(f"transfer leadership {leader.node_id} -> {target}")

    # ================================================================================== healing
    async def heal_and_check_liveness(self) -> None:
        """Repair everything; a fresh write must then commit, and reach every node."""
        self.healed = True
        self.partitioned = {}
        self.profile = replace(self.profile, drop_rate=0.0)
        for sim_node in self.nodes.values():
            sim_node.disk.full = False
            sim_node.disk.fsync_error_rate = 0.0
            if not sim_node.up:
                self.restart(sim_node)
            elif sim_node.replica is not None and sim_node.replica.closed:
                self.retry_failed(sim_node, sim_node.replica, sim_node.incarnation)
        self.note("healed: network repaired, disks healthy, every node up")
        marker: tuple[SimNode, Entry, asyncio.Future[None]] | None = None
        deadline = self.loop.time() + HEAL_BUDGET_S
        while True:
            if marker is not None and marker[2].done() and not marker[2].cancelled() \
                    and marker[2].exception() is None:
                break
            replica = marker[0].replica if marker is not None else None
            if marker is None or marker[2].done() or replica is None or not replica.is_leader \
                    or replica.term != marker[1].term:
                marker = self.client_write(marker=True)
            if self.loop.time() > deadline:
                raise InvariantViolation("liveness", f"no write committed within {HEAL_BUDGET_S} s after healing")
            await self.step()
        entry = marker[1]
        deadline = self.loop.time() + CATCH_UP_BUDGET_S
        while not all(self._holds(n, entry) for n in self.nodes.values()):
            if self.loop.time() > deadline:
                behind = [n.node_id for n in self.nodes.values() if not self._holds(n, entry)]
                raise InvariantViolation("catch-up", f"nodes {behind} lack the committed write at {entry.last_offset} "
                                         f"{CATCH_UP_BUDGET_S} s after it committed")
            await self.step()
        self.check_final_logs()

    @staticmethod
    def _holds(sim_node: SimNode, entry: Entry) -> bool:
        replica = sim_node.replica
        if replica is None or replica.closed or replica.high_watermark <= entry.last_offset:
            return False
        return replica.log.epoch_at(entry.last_offset) == entry.term

    def check_final_logs(self) -> None:
        """Every node's committed log holds every acknowledged acks=all write, byte for byte."""
        for sim_node in self.nodes.values():
            replica = sim_node.replica
            assert replica is not None
            plog = replica.log
            for last_offset, entry in self.acked_all.items():
                if last_offset < plog.log_start_offset:
                    continue
                data = plog.read(entry.base_offset, 1 << 20)
                header = rec.read_header(data)
                if header.base_offset != entry.base_offset or bytes(data[:len(entry.payload)]) != entry.payload:
                    raise InvariantViolation(
                        "acknowledged write lost",
                        f"node {sim_node.node_id} does not hold the acknowledged write [{entry.base_offset}.."
                        f"{last_offset}] t{entry.term} after healing")


class _Transport:
    """What a replica sends through: the simulated network of its node."""

    def __init__(self, sim: RuntimeSimulation, sim_node: SimNode, incarnation: int) -> None:
        self._sim = sim
        self._node = sim_node
        self._incarnation = incarnation

    def send_many(self, items: Sequence[tuple[str, Message]]) -> None:
        self._sim.send(self._node, self._incarnation, items)


def split_replica_jobs(fn: Callable[..., Any], args: tuple[Any, ...]) -> list[Job] | None:
    """Replica._write_and_fsync is a write and then an fsync in one trip to the thread pool: run the two as
    separate steps, so a simulated crash can land between them (written to the page cache, not yet durable)."""
    if getattr(fn, "__name__", "") != "_write_and_fsync":
        return None
    replica = fn.__self__  # type: ignore[attr-defined]
    data, timestamp_ms, state = args
    return [(replica._write, (data, timestamp_ms)), (replica._fsync, (state,))]
