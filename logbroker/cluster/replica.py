"""The Raft runtime for one group: drives a pure RaftNode with the partition log as its Raft log.

The node is pure; this class does its I/O, following the Ready contract (docs/raft.md):
1. send the Ready's messages (a leader's appends) through the transport at once;
2. persist: reset and truncate on the event loop thread; append in the thread pool, in chunks, since a
   write blocks while the kernel writes back; then one fsync of the log and, when term or vote changed,
   of the state file, in the same trip to the pool as the last chunk's write (a Ready that only moves a
   partition's volatile commit offset skips the pool). A small append with no state to save is written on
   the loop instead and fsynced by the broker's native fsync threads (_write_then_sync). A failed fsync
   cuts the log back to what is durable at once (PartitionLog.forget_unsynced);
3. send the messages that wait for the persist (acknowledgements, votes), then report the log durable;
4. apply committed entries (advance the high watermark, or the controller's state machine);
5. advance().
Ready batches are handled one at a time, so proposals that arrive during an fsync share the next one:
that is group commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from typing import Protocol

from logbroker_client import records as rec

from logbroker.cluster.fsync_threads import Syncer
from logbroker.cluster.persist_queue import PersistQueue
from logbroker.cluster.producer_state import BatchIdentity, ProducerStateTable, rebuild_from_log
from logbroker.cluster.raft_storage import (
    DamagedLogError,
    PartitionLogStorage,
    RecentEntries,
    ReplicaState,
    StateFile,
    check_outgoing,
    entries_to_batches,
)
from logbroker.raft.membership import Membership
from logbroker.raft.node import RaftNode
from logbroker.raft.types import Entry, EntryKind, Message, MessageType, RaftConfig, Ready, Role
from logbroker.storage.errors import StorageError
from logbroker.storage.log import PartitionLog, PendingFlush

log = logging.getLogger("logbroker.replica")

QUIESCE_AFTER_TICKS = 4
# Appends are written in chunks of this size: the copy of the batches never exceeds it, and a closing
# replica waits for at most one chunk.
APPEND_CHUNK_BYTES = 4 << 20
# A Ready's append up to this size is written on the event loop when the broker has native fsync threads: a
# lone record's write into the page cache takes microseconds, and a trip to the pool much longer. Bigger ones
# go to the pool, where a write stalled by the kernel's write-back cannot hold up the loop.
LOOP_WRITE_MAX_BYTES = 64 << 10


class StateMachine(Protocol):
    """Something built from a partition's committed log, such as a group coordinator (Redpanda's state machine
    manager is the model): several can run on one replica, each fed the same committed entries in order."""

    def apply(self, entries: Sequence[Entry]) -> None: ...

    def on_leader_change(self, is_leader: bool, term: int) -> None: ...


class MessageSender(Protocol):
    def send_many(self, items: Sequence[tuple[str, Message]]) -> None: ...


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Replica:
    def __init__(
        self,
        group: str,
        plog: PartitionLog,
        state_file: StateFile,
        membership: Membership,
        raft_config: RaftConfig,
        transport: MessageSender,
        executor: Executor,
        on_commit: Callable[[Replica, Sequence[Entry]], None],
        on_leader_change: Callable[[Replica], None] = lambda replica: None,
        applied_offset: int | None = None,
        persist_commit: bool = False,
        name: str | None = None,
        on_failure: Callable[[Replica, Exception], None] = lambda replica, exc: None,
        cache: RecentEntries | None = None,
        clock_ms: Callable[[], int] = now_ms,
        rng: random.Random | None = None,
        state_executor: Executor | None = None,
        persist_queue: PersistQueue | None = None,
        syncer: Syncer | None = None,
    ) -> None:
        """transport, executor (the blocking appends and fsyncs run there), clock_ms (wall-clock milliseconds for
        the timestamps of the batches it writes) and rng (the node's election timeouts) are what a simulation
        replaces (tests/raft/runtime_sim); the file layer comes with plog and state_file. state_executor runs
        the state log's shared fdatasyncs (GroupStateFile.save_soon); executor unless given. persist_queue, shared
        by a broker's replicas, carries each Ready's write and fsync to executor (several in one trip when they
        queue); one of this replica's own unless given. syncer (the broker's native fsync threads) fsyncs a small
        Ready's entries once written on the event loop: see _write_then_sync."""
        self.group = group  # the Raft group's key on the wire
        self.name = name or group  # what logs and errors call it: topic-partition
        self.node_id = raft_config.node_id
        self.log = plog
        self._state_file = state_file
        self.state = state_file.load(membership)
        self._opened_without_its_log = plog.found_no_segments and self.state.term > 0
        # The end of what this replica's log once held, when it opened holding less (its newest segment files
        # deleted, or cut below what was fsynced) and its Raft state says it took part in the group: see
        # lost_its_log. Not a log cut at a damaged batch the replica found itself (ControllerClient.reopen, and the
        # broker's reopen of a failed replica): it then votes as before, for a replica that holds more.
        self._held_up_to: int | None = None
        if plog.lost_durable_records is not None and self.state.term > 0:
            self._held_up_to = plog.lost_durable_records[1]
        finish_log_cut(plog, self.state.log_start_offset)
        log_last = plog.log_end_offset - 1
        if self.state.commit_offset > log_last:
            # Recovery cut the log below what was committed (a damaged or lost file): this replica has lost
            # committed records. Raft treats the commit offset as volatile, so restart from what is here; with
            # other replicas the leader sends the rest again, alone the records are gone.
            log.error("%s: the log ends at offset %d but offset %d was committed; records %d..%d are lost on "
                      "this broker (other replicas, if any, will resend them)", self.name, log_last,
                      self.state.commit_offset, log_last + 1, self.state.commit_offset)
            self.state.commit_offset = log_last
        self._storage = PartitionLogStorage(plog, self.state, cache)
        self._clock_ms = clock_ms
        if rng is None:
            rng = random.Random(hash((group, self.node_id)))
        self.node = RaftNode(raft_config, self._storage, rng,
                             self.state.membership, self.state.hard_state, applied_offset)
        self._transport = transport
        self._executor = executor
        self._persist_queue = persist_queue or PersistQueue(executor, max_jobs=1)
        self._state_executor = state_executor or executor
        self._syncer = syncer if syncer is not None and syncer.supports(plog.fs) else None
        # The broker's shared state log saves from the loop (GroupStateFile.save_soon); a file of its own cannot.
        self._save_state_soon = getattr(state_file, "save_soon", None)
        self._on_commit = on_commit
        self._on_leader_change = on_leader_change
        self._on_failure = on_failure
        self.failure: Exception | None = None  # why the runtime stopped, once it has
        self.damaged_from: int | None = None  # the offset of a damaged batch that stopped it, if that was why
        self.state_machines: list[StateMachine] = []
        self._busy = False
        self._write_lock = threading.Lock()
        self._quiet = False  # an idle group neither ticks nor heartbeats; any message or proposal wakes it
        self.leader_since_s = 0.0  # when this replica last saw its leader change (Unix seconds; 0: no leader known)
        # A leader's followers whose broker was declared down and is back, not heard from since: what the core
        # last knew of their logs may be gone with a disk (peer_returned).
        self.unconfirmed_followers: set[int] = set()
        # Told when the group wakes from quiescence: the broker's ticker visits only awake groups.
        self.on_wake: Callable[[Replica], None] | None = None
        self.preferred_leader: int | None = None
        self._idle_ticks = 0
        self._settled_ticks = 0  # consecutive ticks a leader had nothing left to replicate
        # The controller persists its commit offset with every change, so a restart re-applies the whole
        # committed metadata at once; partitions persist it only with term and vote (their HW recovers
        # from the leader within a heartbeat, and an fsync per commit would halve their throughput).
        self._persist_commit = persist_commit
        self.closed = False
        self.producers = ProducerStateTable()
        rebuild_from_log(self.log, self.producers)
        self.high_watermark = max(self.state.commit_offset + 1, plog.log_start_offset)
        self.durable_offset = plog.log_end_offset
        self._saved_catching_up = self.state.catching_up  # the wait as last made durable (catching_up)
        self._commit_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._durable_waiters: list[tuple[int, asyncio.Future[None]]] = []

    # ------------------------------------------------------------------------------------ inputs

    @property
    def is_leader(self) -> bool:
        return self.node.role is Role.LEADER and self.failure is None

    @property
    def leader_id(self) -> int | None:
        if self.failure is not None and self.node.leader_id == self.node_id:
            return None  # it stopped: whatever its frozen node says, it leads nothing
        return self.node.leader_id

    @property
    def term(self) -> int:
        return int(self.node.term)

    def start(self) -> None:
        """Hand out what the node has ready at once (on restart: committed entries to re-apply)."""
        self._kick()

    @property
    def quiet(self) -> bool:
        return self._quiet

    @quiet.setter
    def quiet(self, quiet: bool) -> None:
        woken = self._quiet and not quiet
        self._quiet = quiet
        if woken and self.on_wake is not None:
            self.on_wake(self)

    def tick(self) -> None:
        self._idle_ticks += 1
        self.node.tick()
        if self._busy:
            # A Ready is being persisted (after a failover a new leader's first entry waits behind thousands of
            # fsyncs): its heartbeats leave now, or its followers, whose answers to them keep it leader, hear
            # nothing for an election timeout and check-quorum deposes it (then it campaigns again).
            self._send(self.node.take_messages_before_persist())
        self._kick()

    def step(self, message: Message, kick: bool = True) -> None:
        """Hand the node one message. kick=False leaves the Ready to a kick() after a whole batch of messages
        has been stepped, so that they share one Ready (one write, one round of answers), as a task used to."""
        if self.unconfirmed_followers and message.term == self.node.term:
            # An answer in the leader's term tells the core where the follower's log ends (a shorter log moves its
            # match back); one in an older term is dropped unread, and so tells nothing.
            self.unconfirmed_followers.discard(message.from_node)
        if self.node.role is Role.LEADER and message.type is MessageType.HEARTBEAT_RESP:
            # The answers to a leader's own heartbeats neither keep it awake nor wake it: it may go quiet right
            # after a heartbeat (or answers arriving after it went quiet would wake it, for ever), and wakes
            # only if an answer gives it work (a follower behind).
            self.node.step(message)
            if self._quiet and (self.node.has_ready() or self._follower_waits_to_catch_up(message.from_node)):
                self.quiet = False
        elif self._quiet and self.node.role is Role.FOLLOWER and self.node.leader_id not in (None, message.from_node):
            # A quiet follower went quiet because its leader's broker is alive (maybe_quiesce); if that broker dies,
            # liveness wakes it (leader_lost). A message from another node (a vote request from a node cut off
            # from the leader alone) is answered but does not wake it: awake, it would tick with a quiet leader
            # sending nothing, its lease would run out, and it would help depose a healthy leader.
            leader, term = self.node.leader_id, self.node.term
            self.node.step(message)
            if (self.node.role, self.node.leader_id, self.node.term) != (Role.FOLLOWER, leader, term):
                self.quiet = False  # the message changed the term or the leader: back to the usual rules
                self._idle_ticks = 0
        else:
            if self._quiet or self.node.role is not Role.LEADER:
                # Anything else wakes a quiet group; on a follower it also keeps the group awake. (The setter,
                # which tells the broker's ticker, only when the group actually wakes: this runs for every message.)
                if self._quiet:
                    self.quiet = False
                self._idle_ticks = 0
            self.node.step(message)
        if self._busy and message.type is MessageType.HEARTBEAT:
            # A Ready is being persisted (its fsync may wait behind a thousand others after a failover): answer
            # the leader's heartbeat now, or it hears nothing for an election timeout and steps down.
            self._send(self.node.take_messages_before_persist())
        if kick:
            self._kick()

    def kick(self) -> None:
        """Carry out what the node has ready (after messages stepped with kick=False)."""
        self._kick()

    def wake(self, fast_forward_ticks: int = 0) -> None:
        """Leave quiescence. fast_forward_ticks > 0 when the leader's broker died: count its silence now."""
        self.quiet = False
        self._idle_ticks = 0
        for _ in range(fast_forward_ticks):
            self.node.tick()
        self._kick()

    def leader_lost(self, leader_id: int, successor: bool) -> None:
        """The leader's broker went silent (the broker's liveness says so): forget it and, as the group's picked
        successor, campaign now (with a pre-vote round: in a cut between two brokers only, the leader is alive
        and a vote request would raise the successor's term and depose it when the cut heals); otherwise wait
        longer than the successor (RaftNode.leader_lost)."""
        self.quiet = False
        self._idle_ticks = 0
        self.node.leader_lost(leader_id, successor)
        self._kick()

    def peer_returned(self, peer: int) -> None:
        """A broker declared down is heard from again: a leader that went quiet without its replica there
        (maybe_quiesce) wakes, so its heartbeats show that follower where it stands and it catches up. Until
        that follower answers, its place in the log is unknown: the broker may have restarted on an empty disk,
        and its liveness heartbeats come before its replicas open. It counts as out of sync meanwhile
        (unconfirmed_followers)."""
        if not (self.is_leader and peer in self.node.membership.members and peer != self.node_id):
            return
        self.unconfirmed_followers.add(peer)
        if self._quiet:
            self.wake()

    def campaign_now(self) -> None:
        """Start a new group's first election at once (its preferred leader), instead of after a random timeout,
        and without a pre-vote round: a group that never had a leader has none to disrupt."""
        self.node.campaign(pre_vote=False)
        self._kick()

    @property
    def catching_up(self) -> bool:
        """Whether this replica waits to catch up (RaftNode.wait_to_catch_up), or its wait has ended in memory
        but not yet on disk (the entries that end it are still being written): what a restart now would do."""
        return self.node.catching_up or self._saved_catching_up

    @property
    def holds_nothing(self) -> bool:
        """No term, no vote and an empty log: a replica that never took part in its group, or lost its disk."""
        return self.node.term == 0 and self.node.vote is None and self.node.log.last_offset < 0

    @property
    def lost_its_log(self) -> bool:
        """Its log is gone while its Raft state stayed: opened on a directory holding no segment (deleted or
        emptied, as the broker's own error advises for a damaged replica) although its saved term says it took
        part in the group, and still empty. It may have acknowledged entries it no longer holds, so, as a
        replica holding nothing, it must catch up before it votes. (A replica new here has no saved term.) So must
        one whose log opened shorter than it once was (its newest segment files deleted, or cut below what was
        fsynced: PartitionLog.lost_durable_records) until it holds that much again: with another replica lacking
        the same entries it could otherwise elect a leader without them. Each such wait costs availability when a
        second replica of the group waits too (a majority of three then cannot vote): no leader until a replica
        that kept its data returns."""
        last = self.node.log.last_offset
        return ((self._opened_without_its_log and last < 0)
                or (self._held_up_to is not None and last < self._held_up_to - 1))

    def _lost_log_description(self) -> str:
        if self._opened_without_its_log or self._held_up_to is None:
            return "its directory held no segment; it was deleted or emptied"
        return (f"it ends at offset {self.log.log_end_offset}, below offset {self._held_up_to} that it once held; "
                "its newest segment files were deleted or cut short")

    @property
    def holds_no_log(self) -> bool:
        """holds_nothing or lost_its_log: an empty log that is new here, or one that may have held what it acknowledged
        (the broker decides which: ReplicaManager.rejoin_if_state_lost)."""
        return self.holds_nothing or self.lost_its_log

    def rejoin_after_losing_state(self, leader_hint: int | None, leader_term: int = 0, lost: bool = True) -> None:
        """This replica holds nothing (holds_nothing) of a group that has had a leader: its data is gone (a wiped
        or replaced disk), or it never had any. Either way it must not vote until it has caught up from a
        leader (RaftNode.wait_to_catch_up), or it could help elect a leader lacking what it once acknowledged.
        The stale answer sent to the last known leader wakes it if its group is quiescent: its heartbeats
        then show this replica's empty log, and it resends the log and counts the replica out of sync
        meanwhile. Sent in the leader's term as the metadata reports it (leader_term), the answer itself tells
        the leader where this log ends; if that term is out of date the leader's core drops it, and the
        wake-up alone leads to the same. It promises nothing (no vote, no entry), so it needs no saved term.
        Called again once the leader is known (the first call had no hint), it only sends that answer. lost=False
        when the broker knows the replica is new here (its partition is newer than the broker's disk): joining a
        group that elected before it opened is routine then (a big topic's replicas open a chunk at a time), so
        it is logged at DEBUG, not as lost state."""
        if not self.node.catching_up:
            self.node.wait_to_catch_up()
            # Saved now, not with the first append it acknowledges: its open created an empty segment, so after a
            # restart before any append nothing else would say this replica lost what it held (lost_its_log and
            # holds_nothing both need a directory without segments, or no saved term).
            self._kick()
            if lost and self.node.term > 0:
                log.warning("%s: broker %d lost this partition's log (%s) but kept its Raft state, term %d: it takes "
                            "no part in elections until it has caught up from the leader", self.name, self.node_id,
                            self._lost_log_description(), self.node.term)
            elif lost:
                log.warning("%s: broker %d holds no Raft state or log for this partition, which has had a leader or "
                            "is older than this broker's disk: it takes no part in elections until it has caught up "
                            "from the leader", self.name, self.node_id)
            else:
                log.debug("%s: new on broker %d, opened after its group elected a leader; it catches up before it "
                          "votes", self.name, self.node_id)
        if leader_hint is not None and leader_hint != self.node_id:
            self._transport.send_many([(self.group, Message(
                MessageType.HEARTBEAT_RESP, self.node_id, leader_hint, max(leader_term, self.node.term),
                last_log_offset=self.node.log.last_offset, last_log_term=self.node.log.last_term, reject=True))])

    def maybe_quiesce(self, is_alive: Callable[[int], bool]) -> None:
        """Go quiet when nothing is left to do: a leader whose log is committed on every replica and that
        has had no proposal for a while, or a follower whose leader's broker is alive but silent."""
        if self._idle_ticks < QUIESCE_AFTER_TICKS or self._busy or self.node.has_ready():
            return
        node = self.node
        if node.role is Role.LEADER:
            if not self._leader_settled(is_alive):
                self._settled_ticks = 0
                return
            # Followers learn the last commit offset from the next heartbeat: go quiet only once one has gone
            # out, or their high watermarks stay behind until the next write.
            self._settled_ticks += 1
            if self._settled_ticks > node.config.heartbeat_timeout_ticks:
                self._settled_ticks = 0
                self.quiet = True
        elif node.role is Role.FOLLOWER and node.leader_id is not None and is_alive(node.leader_id):
            self.quiet = True

    def _leader_settled(self, is_alive: Callable[[int], bool]) -> bool:
        """Every entry committed and on every replica whose broker is alive, each of those replicas having answered a
        heartbeat saying it does not wait to catch up, and nobody waiting for a write.

        A replica on a dead broker cannot catch up, and waiting for it kept every group it follows awake (ticks
        and heartbeats) until its broker came back: after one broker of three died, the survivors' thousands of
        groups heartbeated ten times a second. When it comes back, its replicas' first messages (a pre-vote,
        an answer) wake the leader, which then sends them what they miss."""
        node = self.node
        last = node.log.last_offset
        if node.commit_offset != last or self._commit_waiters or self._durable_waiters:
            return False
        for member in node.membership.members:
            if member == self.node_id or not is_alive(member):
                continue
            progress = node.progress(member)
            if progress is None or progress.match_offset != last or self._follower_waits_to_catch_up(member):
                # A follower waiting to catch up ends its wait only on a heartbeat (RaftNode._note_leader_commit): went
                # quiet after one that was lost, the leader would leave it out of elections until the next write.
                return False
        return True

    def _follower_waits_to_catch_up(self, member: int) -> bool:
        progress = self.node.progress(member)
        return progress is not None and not progress.reported_caught_up

    def propose(self, payloads: Sequence[tuple[bytes, int]]) -> list[Entry]:
        """Propose (batch bytes, record count) pairs; raises the core's NotLeaderError on a follower."""
        self.quiet = False
        self._idle_ticks = 0
        entries = []
        for payload, count in payloads:
            entry = self.node.propose(payload, count)
            # Recorded now, not only once persisted, so a quick retry of this batch is recognised too.
            self._record_producer(payload, entry.base_offset, entry.last_offset)
            entries.append(entry)
        self._kick()
        return entries

    def _record_producer(self, batch: bytes | memoryview, base_offset: int, last_offset: int) -> None:
        self.producers.record(BatchIdentity(*rec.producer_fields(batch)), base_offset, last_offset)

    def wait_committed(self, last_offset: int) -> asyncio.Future[None]:
        return self._waiter(self._commit_waiters, last_offset, self.high_watermark)

    def wait_durable(self, last_offset: int) -> asyncio.Future[None]:
        return self._waiter(self._durable_waiters, last_offset, self.durable_offset)

    @staticmethod
    def _waiter(waiters: list[tuple[int, asyncio.Future[None]]], last_offset: int,
                reached: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if last_offset < reached:
            future.set_result(None)
        else:
            waiters.append((last_offset, future))
        return future

    # ------------------------------------------------------------------------------- ready loop

    def _kick(self) -> None:
        """Carry out what the node has ready: at once, on this stack, while a Ready needs no I/O (a vote or
        heartbeat answer, a commit to apply, a leader's appends); from the first that does, in a task that
        awaits its write and fsync and then drains the rest. An election or a commit thus costs no task and no
        extra turn of the event loop (after a broker dies, thousands of groups elect at once)."""
        if self._busy or self.closed or not self.node.has_ready():
            return
        self._busy = True
        try:
            while not self.closed:
                ready = self._take_ready()
                if ready is None:
                    break
                if self._needs_io(ready):
                    asyncio.get_running_loop().create_task(self._drain_ready(ready))
                    return  # still busy: the task drains the rest
                self._handle_now(ready)
        except Exception as exc:
            self._stop_after_failure(exc)
        self._busy = False

    def _take_ready(self) -> Ready | None:
        ready = self.node.ready()
        if ready is not None and ready.leader_change is not None:
            # Wall clock, read later by operators and benchmarks (DescribeTopics): when a failover ended here. Taken
            # with the Ready, as Metadata answers show the change; its persist may come later (behind thousands of
            # others after a broker dies), and a new leader's first write waits for it.
            self.leader_since_s = time.time() if ready.leader_change.leader_id is not None else 0.0
        return ready

    async def _drain_ready(self, ready: Ready | None) -> None:
        try:
            while ready is not None and not self.closed:
                await self._handle(ready)
                ready = self._take_ready()
        except Exception as exc:
            self._stop_after_failure(exc)
        finally:
            self._busy = False
            if not self.closed and self.node.has_ready():
                self._kick()

    def stop_after_write_failure(self, exc: Exception) -> None:
        """A write or fsync made outside the Ready loop failed (the broker's flush.interval.ms fsync): stop as a
        failed Ready would, with what a failed fsync may have dropped cut from the log first."""
        if self.closed:
            return
        with contextlib.suppress(StorageError, OSError):
            self._forget_unsynced()
        self._stop_after_failure(exc)

    def _stop_after_failure(self, exc: Exception) -> None:
        """A write the Ready contract promised cannot be half undone: stop this replica (the group goes on
        without it); the broker hands its leadership over and reopens it from disk once writes succeed."""
        if self.closed:
            return  # closed on purpose (shutdown, topic deleted) while a Ready was being handled
        if isinstance(exc, (StorageError, OSError, DamagedLogError)):
            log.error("%s: cannot write this replica's log on broker %d (%s); the replica stops taking part in "
                      "its group until a write succeeds again", self.name, self.node_id, exc)
        else:
            log.exception("%s: the Raft runtime failed; this replica stops until it is reopened", self.name)
        self.closed = True
        self.failure = exc
        if isinstance(exc, DamagedLogError):
            self.damaged_from = exc.offset
        unsynced = self.log.unsynced_from
        if unsynced is not None and (self.damaged_from is None or unsynced < self.damaged_from):
            # An fsync failed: what was written since the last good one may be lost on the disk although reads
            # still show it, and no later fsync would write it. The reopened replica cuts its log there and
            # fetches the rest again, rather than acknowledge entries it does not hold.
            self.damaged_from = unsynced
        self._fail_waiters(ReplicaFailedError(self.name, self.node_id, exc))
        self._on_failure(self, exc)

    async def _handle(self, ready: Ready) -> None:
        committed = self._send_before_persist(ready)
        if ready.must_persist:
            await self._persist(ready)
        self._finish(ready, committed)

    def _handle_now(self, ready: Ready) -> None:
        """A Ready that needs no I/O (_needs_io is False), carried out synchronously."""
        committed = self._send_before_persist(ready)
        if ready.must_persist:
            self._note_persisted(ready)
        self._finish(ready, committed)

    def _send_before_persist(self, ready: Ready) -> Sequence[Entry]:
        """Steps 1 and 4 of the contract where they may come first; returns the committed entries still to
        apply after the persist."""
        # A leader's appends leave before its own write and fsync, which then run while followers write
        # theirs; the node counts the leader's log toward the commit only once persisted() reports it.
        self._send(ready.messages)
        committed = ready.committed_entries
        if (committed and ready.reset_log is None and ready.truncate_from is None
                and committed[-1].last_offset < self.durable_offset):
            # Committed on a quorum and already durable here (an earlier Ready wrote them): applied before this
            # Ready's fsync, not after it. Under a steady load every Ready both appends new entries and commits
            # the previous ones, and their producers' answers would otherwise wait out one more fsync. Not when
            # this Ready cuts or resets the log: what is on disk below durable_offset may then be the entries
            # being replaced, not the committed ones (the runtime simulation caught exactly that).
            self._apply(committed)
            return ()
        return committed

    def _finish(self, ready: Ready, committed: Sequence[Entry]) -> None:
        # Acknowledgements and votes only now: they promise what the persist just made durable.
        self._send(ready.messages_after_persist)
        if ready.entries:
            last = ready.entries[-1]
            self.node.persisted(last.last_offset, last.term)
        if committed:
            self._apply(committed)
        self.node.advance(ready)
        if ready.leader_change is not None:
            change = ready.leader_change
            self.unconfirmed_followers.clear()  # a new leader's progress of each follower starts from nothing
            # Leadership at INFO; the steps of an election at DEBUG (a thousand groups elect at once).
            level = logging.INFO if change.role is Role.LEADER else logging.DEBUG
            log.log(level, "%s: %s in term %d (leader %s)", self.name, change.role.value, change.term,
                    change.leader_id)
            if change.role is not Role.LEADER and (self._commit_waiters or self._durable_waiters):
                self._fail_waiters(NotLeaderNow(self.name, change.leader_id))  # built only when someone waits
            self._on_leader_change(self)
            for machine in self.state_machines:
                machine.on_leader_change(change.role is Role.LEADER, change.term)

    def _send(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        for message in messages:
            if message.entries:
                check_outgoing(self.name, message.entries)
        self._transport.send_many([(self.group, m) for m in messages])

    async def _persist(self, ready: Ready) -> None:
        state_changed = False
        if ready.reset_log is not None:
            reset = ready.reset_log
            # What the new start needs (the term before it, the membership) is saved first: a crash between
            # the two leaves a state the next open finishes (finish_log_cut), never a log it misdescribes.
            self.state.start_prev_term = reset.prev_term
            self.state.voters = tuple(sorted(reset.membership.voters))
            self.state.learners = tuple(sorted(reset.membership.learners))
            self.state.log_start_offset = reset.start_offset
            self.save_state()
            self.log.reset_to(reset.start_offset)
            self._storage.forget_from(-1)
            self.producers.clear()
            self.high_watermark = max(self.high_watermark, reset.start_offset)
            state_changed = True
            for machine in self.state_machines:  # what they derived from the old log is gone with it
                on_reset = getattr(machine, "on_log_reset", None)
                if on_reset is not None:
                    on_reset(reset.start_offset)
        if ready.truncate_from is not None:
            self.log.truncate_to(ready.truncate_from)
            self._storage.forget_from(ready.truncate_from)
            self.producers.truncate(ready.truncate_from)
        hard = ready.hard_state
        if hard is not None and (hard.term != self.state.term or hard.vote != self.state.vote
                                 or hard.catching_up is not self.state.catching_up):
            self.state.term, self.state.vote, self.state.catching_up = hard.term, hard.vote, hard.catching_up
            state_changed = True
        if hard is not None:
            if self._persist_commit and hard.commit_offset != self.state.commit_offset:
                state_changed = True
            self.state.commit_offset = hard.commit_offset
        snapshot = replace(self.state) if state_changed else None
        save_soon = self._save_state_soon
        if ready.entries:
            await self._append(ready.entries, snapshot)
        elif (snapshot is not None and ready.reset_log is None and ready.truncate_from is None
              and save_soon is not None):
            # Only term, vote or membership changed (an election): the broker's state log writes the record now
            # and one fdatasync covers every group's saves made meanwhile, with no pool worker held per save.
            # The log has nothing to fsync: every earlier Ready's entries were flushed in their own persist.
            await save_soon(snapshot, self._state_executor)
        elif snapshot is not None or ready.reset_log is not None or ready.truncate_from is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._fsync, snapshot)
        # Else only a partition's commit offset moved, which Raft keeps volatile (_needs_io is False, and the
        # Ready never comes here but to _handle_now).
        self._note_persisted(ready)

    def _needs_io(self, ready: Ready) -> bool:
        """Whether carrying out the Ready writes or fsyncs anything: a change of the log, of the term or vote,
        or of the controller's commit offset (which it persists). A partition's commit offset alone stays
        volatile, so a Ready that only moves it, like one with only messages, is carried out at once."""
        if ready.entries or ready.reset_log is not None or ready.truncate_from is not None:
            return True
        hard = ready.hard_state
        return hard is not None and (
            hard.term != self.state.term or hard.vote != self.state.vote
            or hard.catching_up is not self.state.catching_up
            or (self._persist_commit and hard.commit_offset != self.state.commit_offset))

    def _note_persisted(self, ready: Ready) -> None:
        if ready.hard_state is not None:
            self.state.commit_offset = ready.hard_state.commit_offset
            self._saved_catching_up = ready.hard_state.catching_up
        self.durable_offset = self.log.log_end_offset
        self._release(self._durable_waiters, self.durable_offset)

    async def _append(self, entries: Sequence[Entry], state: ReplicaState | None) -> None:
        """Write entries in the thread pool and fsync them (with state, if given), then cache them and learn
        their producers' sequences. The last chunk's write and the fsync are one trip to the pool: each trip
        costs a thread wake-up and a loop wake-up, a tenth of a lone record's commit.

        One Ready may carry many producers' requests or a follower's whole catch-up, and a write into the
        page cache blocks while the kernel writes back (measured: 4 MiB writes beside fsyncs, 100 ms at
        p99): on the event loop that would silence the broker's liveness heartbeats, and its peers would
        take its leaderships away. Only appends leave the loop; every other change to the log stays on it,
        and readers there see new batches only once whole (the log's end offset moves last)."""
        timestamp_ms = self._clock_ms()
        loop = asyncio.get_running_loop()
        chunks = list(_chunks(entries, APPEND_CHUNK_BYTES))
        for chunk in chunks[:-1]:
            # Copied here, not in the pool: glibc gives each thread its own heap, and the pool threads' heaps
            # kept the freed chunks (measured: tens of MB more RSS on an idle broker).
            await loop.run_in_executor(self._executor, self._write, entries_to_batches(chunk, timestamp_ms),
                                       timestamp_ms)
        data = entries_to_batches(chunks[-1], timestamp_ms)
        if self._writes_on_loop(data, entries[-1].last_offset, timestamp_ms, state, len(chunks)):
            await self._write_then_sync(data, timestamp_ms)
        else:
            await self._persist_queue.run(self._write_and_fsync, data, timestamp_ms, state)
        del data
        # Read back soon on a leader (to replicate) and on every replica (committed entries are handed to be
        # applied): from the cache, not the disk (a follower re-read and re-parsed each batch it had written).
        self._storage.remember(entries)
        for entry in entries:
            if entry.kind is EntryKind.DATA:
                self._record_producer(entry.payload, entry.base_offset, entry.last_offset)

    def _write(self, data: bytearray, timestamp_ms: int) -> None:
        """In the thread pool, under the lock close() takes: the log's files are never closed (and their
        descriptors reused) in the middle of a write."""
        with self._write_lock:
            if self.closed:
                raise ReplicaClosedError(f"{self.name}: replica closed while appending")
            try:
                self.log.append_replicated(data, timestamp_ms)
            except StorageError:
                self._forget_unsynced()  # sealing a full segment fsyncs it, and that may have failed
                raise

    def _writes_on_loop(self, data: bytearray, last_offset: int, timestamp_ms: int, state: ReplicaState | None,
                        chunks: int) -> bool:
        """Whether a Ready's append goes the split way (_write_then_sync): small, alone, no term or vote to save
        with it, no roll (which would seal, i.e. fsync, the active segment on the loop), and flush="always". Under
        flush="interval" dirty pages pile up between the timer's fsyncs, and the kernel throttles a writer once
        they pass its dirty limits: that writer must not be the event loop."""
        return (self._syncer is not None and state is None and chunks == 1 and len(data) <= LOOP_WRITE_MAX_BYTES
                and self.log.config.flush == "always" and not self.log.would_roll(len(data), last_offset, timestamp_ms))

    async def _write_then_sync(self, data: bytearray, timestamp_ms: int) -> None:
        """A small Ready's entries written here on the event loop (into the page cache: microseconds), then
        fsynced by the broker's native fsync threads while the loop goes on. A trip to the Python pool cost the
        three brokers of a replicated write half a core at 2,000 records/s (benchmarks.latency_floor), more than
        the fsyncs themselves; these threads take no GIL. Big writes still go to the pool (_append says why)."""
        self._write(data, timestamp_ms)
        pending = self.log.begin_flush()
        if pending is None:  # the log owes a new partition's deferred syncs first: flush() in the pool does all
            await asyncio.get_running_loop().run_in_executor(self._executor, self._fsync, None)
            return
        error: OSError | None = None
        if pending.fd is not None:
            assert self._syncer is not None
            try:
                fsync = self._syncer.fdatasync(self.log.fs, pending.fd)
            except OSError:  # not handed over (no descriptor left for its copy): the pool fsyncs the file itself
                fsync = asyncio.get_running_loop().run_in_executor(self._executor, self._fsync_open_file, pending.fd)
            try:
                await fsync
            except OSError as exc:
                error = exc
        self._end_flush(pending, error)

    def _fsync_open_file(self, fd: int) -> None:
        """In the thread pool, under the lock close() takes: fsync the log's own descriptor only while the log is
        open, so that a descriptor closed and reused meanwhile never gets another file's fsync (which would
        consume that file's write-back error, reported once per open file)."""
        with self._write_lock:
            if self.closed:
                raise ReplicaClosedError(f"{self.name}: replica closed before its fsync")
            self.log.fs.fsync(fd)

    def _end_flush(self, pending: PendingFlush, error: OSError | None) -> None:
        try:
            self.log.end_flush(pending, error)
        except StorageError:
            self._forget_unsynced()
            raise

    def _write_and_fsync(self, data: bytearray, timestamp_ms: int, state: ReplicaState | None) -> None:
        """In the thread pool: a Ready's last (usually only) write, then its fsync (the runtime simulation
        runs the two steps apart, so a power cut can fall between them)."""
        self._write(data, timestamp_ms)
        self._fsync(state)

    def _fsync(self, state: ReplicaState | None) -> None:
        if self.log.config.flush == "always":
            try:
                self.log.flush()
            except StorageError:
                self._forget_unsynced()
                raise
        # flush="interval": entries count as durable once written (the page cache), and the broker fsyncs
        # them every flush.interval.ms; a write then survives a process crash on one replica, and a machine
        # crash only if a majority of replicas is not lost at once: Kafka's default trade.
        if state is not None:  # term and vote must be durable before any message that depends on them
            self._state_file.save(state)

    def _forget_unsynced(self) -> None:
        """In the thread pool, right after a failed fsync, before the process can die: cut what may not be on
        the disk (PartitionLog.forget_unsynced says why). The replica stops anyway; this keeps a restart
        after kill -9, which never hears of the failure, from trusting those entries."""
        if self.log.unsynced_from is not None:
            self.log.forget_unsynced()

    def _apply(self, entries: Sequence[Entry]) -> None:
        self.high_watermark = max(self.high_watermark, entries[-1].last_offset + 1)
        self._release(self._commit_waiters, self.high_watermark)
        self._on_commit(self, entries)
        for machine in self.state_machines:
            machine.apply(entries)

    @staticmethod
    def _release(waiters: list[tuple[int, asyncio.Future[None]]], reached: int) -> None:
        keep = []
        for offset, future in waiters:
            if offset < reached:
                if not future.done():
                    future.set_result(None)
            else:
                keep.append((offset, future))
        waiters[:] = keep

    def _fail_waiters(self, exc: Exception) -> None:
        for waiters in (self._commit_waiters, self._durable_waiters):
            for _, future in waiters:
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # retrieved: a produce may have timed out and gone already
            waiters.clear()

    # -------------------------------------------------------------------------------- lifecycle

    def transfer_leadership(self, to_node: int) -> None:
        self.wake()  # the transfer needs ticks: it is abandoned after an election timeout
        self.node.transfer_leadership(to_node)
        self._kick()

    def read_committed(self, offset: int, max_bytes: int) -> bytes:
        """Whole batches from offset, none at or past the high watermark."""
        return bytes(self.log.read(offset, max_bytes, max_offset=self.high_watermark))

    def log_start(self) -> int:
        return self.log.log_start_offset

    def last_offset(self) -> int:
        return int(self.node.log.last_offset)

    def attach(self, machine: StateMachine) -> None:
        """Feed machine every entry committed from now on, and every leadership change."""
        self.state_machines.append(machine)

    def truncate_prefix(self, below_offset: int) -> int:
        """Delete whole closed segments holding only offsets below below_offset (a snapshot or retention
        point at or under the high watermark); returns how many. The term just before the new log start is
        saved with the Raft state first, since Raft's log matching asks for it and its batch is going."""
        plog = self.log
        below_offset = min(below_offset, self.high_watermark)
        new_start = plog.prefix_cut_point(below_offset)
        if new_start <= plog.log_start_offset:
            return 0
        membership = self.node.membership_at(new_start - 1)  # config entries below the cut go with it
        before = replace(self.state)
        self.state.start_prev_term = plog.epoch_at(new_start - 1)
        self.state.voters = tuple(sorted(membership.voters))
        self.state.learners = tuple(sorted(membership.learners))
        self.state.log_start_offset = new_start
        try:
            self.save_state()
            return plog.delete_segments_before(new_start)
        except BaseException:
            if plog.log_start_offset != new_start:
                # The log still starts where it did (a full disk): so must the state Raft reads the term before
                # the log start from, or that term reads as unknown and the leader's probes of a follower that
                # needs the log from its start never settle (runtime simulation seed 50990). A saved cut is
                # finished by the next open (finish_log_cut).
                self.state.start_prev_term, self.state.voters = before.start_prev_term, before.voters
                self.state.learners, self.state.log_start_offset = before.learners, before.log_start_offset
            raise

    def save_state(self) -> None:
        self._state_file.save(self.state)

    def close(self) -> None:
        self.closed = True
        self._fail_waiters(RuntimeError(f"{self.name}: replica closed"))
        with self._write_lock:  # an append in the thread pool finishes its chunk first (milliseconds)
            if self.state != self._state_file.last_saved:  # one fdatasync less per unchanged replica at shutdown
                self.save_state()
            self._state_file.close()
            self.log.close()


def _chunks(entries: Sequence[Entry], max_bytes: int) -> Iterator[Sequence[Entry]]:
    """Consecutive runs of entries of at most max_bytes each (an entry larger than that goes alone)."""
    start = 0
    size_bytes = 0
    for index, entry in enumerate(entries):
        if index > start and size_bytes + len(entry.payload) > max_bytes:
            yield entries[start:index]
            start, size_bytes = index, 0
        size_bytes += len(entry.payload)
    if start < len(entries):
        yield entries[start:]


class ReplicaClosedError(RuntimeError):
    """The replica was closed while its runtime was writing a Ready: the rest is not written."""


def finish_log_cut(plog: PartitionLog, saved_start: int) -> None:
    """The state says the log starts at saved_start, but a crash came between saving that and cutting the
    log: finish the cut (a prefix deletion at a segment boundary, else a reset to an empty log there)."""
    if saved_start <= plog.log_start_offset:
        return
    if saved_start <= plog.log_end_offset and plog.prefix_cut_point(saved_start) == saved_start:
        plog.delete_segments_before(saved_start)
    else:
        plog.reset_to(saved_start)
    log.warning("%s: finished a log cut interrupted by a crash: the log now starts at offset %d",
                plog.name, plog.log_start_offset)


class ReplicaFailedError(RuntimeError):
    """This broker's replica stopped because it could not write (a full or failing disk)."""

    def __init__(self, name: str, node_id: int, cause: Exception) -> None:
        super().__init__(f"{name}: broker {node_id} cannot write its replica ({cause})")
        self.cause = cause


class NotLeaderNow(Exception):
    """Leadership was lost while a produce waited; the client should retry at the new leader."""

    def __init__(self, group: str, leader_id: int | None) -> None:
        super().__init__(f"{group}: leadership moved to {leader_id} before the write was committed")
        self.leader_id = leader_id
