"""The broker's replicas: opening, ticking, failing, handing over, reopening and forgetting them, and finding them.

Every Raft group this broker takes part in, the controller's included, is one Replica here. The controller
client (controller_client.py) decides which partitions this broker holds; this module opens and closes them
and answers "which replica serves this partition, and who leads it".
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import shutil
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from logbroker.cluster.liveness import LIVENESS_GROUP
from logbroker.cluster.metadata import CONTROLLER_GROUP, TopicMetadata
from logbroker.cluster.persist_queue import PersistQueue
from logbroker.cluster.raft_storage import RecentEntries
from logbroker.cluster.replica import Replica
from logbroker.cluster.state_log import STATE_LOG_FILE, GroupStateFile, RaftStateLog
from logbroker.cluster.tasks import cancel_and_wait
from logbroker.groups.coordinator import OFFSETS_TOPIC, GroupCoordinatorShard
from logbroker.groups.runtime import GroupShardRuntime
from logbroker.groups.share_runtime import ShareStateMachine
from logbroker.raft.membership import Membership
from logbroker.raft.types import Entry, Message, MessageType, RaftConfig, Role
from logbroker.server import errors
from logbroker.server.controller_client import CONTROLLER_DIR
from logbroker.storage import filenames
from logbroker.storage.files import FileSystemSync, fsync_dir, fsync_file, probe_write
from logbroker.storage.log import PartitionLog
from logbroker.storage.partition_metadata import TopicIdentity, read_identity, sync_identity, write_identity

if TYPE_CHECKING:
    from logbroker.server.broker import Broker

log = logging.getLogger("logbroker.broker")

LEGACY_RAFT_STATE_DIR = "__raft"  # where Raft state files lived before they moved into partition directories
LEGACY_RAFT_STATE_SUFFIX = ".raftstate"
SHUTDOWN_TRANSFER_TIMEOUT_S = 3.0
NAMES_SHOWN_MAX = 5  # partitions named in one log line; the rest are counted
FAILED_REPLICA_RETRY_S = 1.0  # how often a replica that could not write tries again
# A producer request carries up to 16 MiB; the pipe to each follower holds one such request, in 1 MiB
# appends. Small appends keep something arriving from a leader every few milliseconds even while it
# streams bulk (any message counts for liveness; one 4 MiB append took 170 ms on a loaded host), and the
# window bounds what a follower buffers per group before it is written.
RAFT_MAX_MESSAGE_BYTES = 1 << 20
RAFT_MAX_INFLIGHT_BYTES = 16 << 20
_NEW_DIRECTORY, _OURS = "new", "ours"  # what _claim_directory found
OPENER_THREADS = 4
EPOCH_SAVE_INTERVAL_TICKS = 20  # how often stale leader-epoch files are written (a second at the default tick)
TICK_FAILURE_LOG_EVERY = 1000  # a tick that fails every time is logged every 50 s at the default tick
# Raft messages for a group not open here yet: a new topic's replicas open a chunk at a time on each broker, and a
# preferred leader's vote request that reached a broker before its replica opened was dropped, costing that group
# an election timeout (a sixth of 10,000 new partitions). They are kept, this many per group, and stepped when the
# replica opens; kept for at most EARLY_MESSAGE_TTL_TICKS, for at most EARLY_MESSAGE_GROUPS_MAX groups, and only
# small ones (Raft resends whatever is dropped).
EARLY_MESSAGES_PER_GROUP_MAX = 4
EARLY_MESSAGE_GROUPS_MAX = 4096
EARLY_MESSAGE_TTL_TICKS = 40
EARLY_MESSAGE_MAX_BYTES = 4096
# A tick later than this many ticks means the event loop was held up (a long request, a starved CPU) for a
# good part of the liveness timeout: logged at WARNING, at most once per STALL_LOG_INTERVAL_S.
STALL_WARN_TICKS = 4
STALL_LOG_INTERVAL_S = 10.0
# A new group's replicas other than its preferred leader's stay quiet until that broker campaigns (or is found dead).
# A preferred broker that is alive but never opens its replica (cut off from the controller leader, it never learns
# of the partition) would leave the group without a leader for the whole cut: after this many election timeouts
# without any election, the others elect among themselves. Long enough that a slow mass creation, whose preferred
# leaders campaign seconds late, is not turned into thousands of colliding elections.
FIRST_LEADER_WAIT_ELECTION_TIMEOUTS = 10


@dataclass
class Handover:
    """A failed leader's request that another replica campaign, repeated until a later leader is heard."""

    name: str
    term: int
    voters: list[int]
    asked: int = 0


def pick_successor(group: str, voters: Iterable[int], dead: int, is_alive: Callable[[int], bool]) -> int | None:
    """The voter of a group that campaigns once its leader ``dead`` is gone: one of the live voters, picked by a
    hash of the group's key (crc32, the same in every process, unlike hash()), so that every survivor picks the
    same one and leaderships spread over the survivors. None when no voter is alive."""
    live = sorted(v for v in voters if v != dead and is_alive(v))
    if not live:
        return None
    return live[zlib.crc32(group.encode()) % len(live)]


class ReplicaManager:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.node_id = broker.node_id
        self._recent_entries = RecentEntries(broker.config.raft_entry_cache_bytes)  # shared by every replica
        # Every group's term and vote in one file, fsynced for many groups at once (docs/raft.md): thousands
        # of new or failed-over groups elect without an fsync, a file and a descriptor each.
        state_log_lost = _state_log_was_lost(broker.data_dir)
        self.state_log = RaftStateLog.open(broker.data_dir)
        # Set by the controller log's open when the state log was lost (deleted while the partition directories
        # stayed): replicas of topics created below this metadata offset that hold nothing lost their state too,
        # whatever the metadata says of their topic's age (rejoin_if_state_lost).
        self.state_log_lost_below: int | None = -1 if state_log_lost else None
        # The controller's writes get a thread of their own: behind a thousand new partitions' first fsyncs in
        # the shared pool, its heartbeats (sent between its Readys) stopped and the controller lost its leader.
        self._controller_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="controller-flush")
        # The state log's shared fdatasyncs (elections' term and vote saves) too: queued behind the pool's appends
        # (a failover makes thousands, each a write and fsyncs), the votes of one survivor's own campaigns waited
        # seconds, and its groups' Ready loops with them, so their leaders heard nothing and stepped down.
        self._state_sync_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-sync")
        # New replicas' files are created here (see open_partitions), several at a time: a creation waits while
        # the file system's journal commits, and concurrent ones share the commit.
        self._opener = ThreadPoolExecutor(max_workers=OPENER_THREADS, thread_name_prefix="open")
        # Leader-epoch files are rewritten here, a sweep every EPOCH_SAVE_INTERVAL_TICKS, not by the appends that
        # begin an epoch (PartitionLog.save_epochs): after a failover, each of thousands of first appends waited on
        # a file rewrite as long as its fsync, in the pool every append queues for.
        self._epochs_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epochs")
        # The partitions' writes and fsyncs go to the flush pool through one queue, which shares a trip among
        # several when all its threads are busy (after a failover, thousands of first entries at once).
        self._persist_queue = PersistQueue(broker.executor, max_jobs=broker.config.flush_threads)
        self._epochs_saving: Future[None] | None = None
        self._ticks = 0
        self._early_messages: dict[str, tuple[int, list[Message]]] = {}  # group -> (tick first kept, messages)
        # Bumped whenever a partition replica opens or closes here, or a topic's configs change: what looks over
        # every partition for something rare (the interval flusher) does so only after a change.
        self.layout_version = 0
        self._stall_logged_at = -STALL_LOG_INTERVAL_S
        self._stalls_unlogged, self._longest_stall_s = 0, 0.0  # since the last warning about them
        self._replicas: dict[str, Replica] = {}  # group name -> replica, the controller included
        self._partitions: dict[tuple[str, int], Replica] = {}
        # Replicas opened holding nothing (no term, vote or log) of a group with no known leader yet: checked
        # again as leader reports arrive (check_replicas_holding_nothing).
        self._holding_nothing: dict[tuple[str, int], Replica] = {}
        # Replicas waiting to catch up because this broker's disk registration was not applied yet when they opened
        # (_older_than_disk): end_waits_of_a_first_disk reconsiders them once it is.
        self._waiting_for_registration: dict[tuple[str, int], Replica] = {}
        self._handovers: dict[str, Handover] = {}  # Raft group -> leadership a failed replica is giving away
        self._next_handover_s = 0.0
        # (topic, partition) -> (replica that could not write, when to try again)
        self._failed_replicas: dict[tuple[str, int], tuple[Replica, float]] = {}
        self._ticker: asyncio.Task[None] | None = None
        # The groups that are not quiet, in an insertion-ordered dict used as a set: the ticker visits these
        # only (walking ten thousand quiet ones 20 times a second was most of an idle broker's CPU).
        self._awake: dict[Replica, None] = {}
        # (tick due, replica): new groups waiting quietly for their preferred leader's first campaign, in the order
        # opened, so due ones are at the front (wake_groups_never_elected).
        self._first_leader_due: deque[tuple[int, Replica]] = deque()
        # Each peer's term in the metadata log, as its last liveness heartbeat said (0: it holds none).
        self.peer_metadata_terms: dict[int, int] = {}

    def raft_config(self) -> RaftConfig:
        config = self.broker.config
        return RaftConfig(node_id=self.node_id, election_timeout_ticks=config.raft_election_ticks,
                          heartbeat_timeout_ticks=config.raft_heartbeat_ticks,
                          max_msg_bytes=RAFT_MAX_MESSAGE_BYTES, max_inflight_bytes=RAFT_MAX_INFLIGHT_BYTES)

    # ------------------------------------------------------------------------------- registry

    def add_replica(self, group: str, plog: PartitionLog, membership: Membership,
                    on_commit: Callable[[Replica, Sequence[Entry]], None], controller: bool = False,
                    applied_offset: int = -1) -> Replica:
        broker = self.broker
        state_file = GroupStateFile(self.state_log, group, legacy_path=self._raft_state_path(plog))
        plog.flush_observer = broker.metrics.observe_fsync
        executor = self._controller_executor if controller else broker.executor
        replica = Replica(group, plog, state_file, membership, self.raft_config(), broker.transport, executor,
                          on_commit, self._on_leader_change, applied_offset=applied_offset if controller else None,
                          persist_commit=controller, name=plog.directory.name, on_failure=self._on_replica_failed,
                          cache=self._recent_entries, state_executor=self._state_sync_executor,
                          persist_queue=None if controller else self._persist_queue,
                          syncer=None if controller else broker.fsync_threads)
        self._replicas[group] = replica
        replica.on_wake = self._note_awake
        self._awake[replica] = None
        return replica

    def _note_awake(self, replica: Replica) -> None:
        self._awake[replica] = None

    def _raft_state_path(self, plog: PartitionLog) -> Path:
        """Where an older version kept this group's Raft state file (moved into the state log at its load)."""
        path = plog.directory / filenames.RAFT_STATE_FILE
        legacy = self.broker.data_dir / LEGACY_RAFT_STATE_DIR / f"{plog.directory.name}{LEGACY_RAFT_STATE_SUFFIX}"
        if not path.exists() and legacy.exists():
            legacy.replace(path)
            log.info("%s: moved its Raft state from %s into the partition directory", plog.directory.name, legacy)
        return path

    def all_replicas(self) -> list[Replica]:
        """Every Raft group's replica on this broker, the controller's included."""
        return list(self._replicas.values())

    def forget_replica(self, replica: Replica) -> None:
        broker = self.broker
        self._replicas.pop(replica.group, None)
        key = (replica.log.topic, replica.log.partition)
        if key[0] == OFFSETS_TOPIC and key[1] in broker.group_runtimes \
                and broker.group_runtimes[key[1]].replica is replica:
            del broker.group_runtimes[key[1]]
        machine = broker.share_machines.get(key)
        if machine is not None and machine.replica is replica:
            del broker.share_machines[key]
        if self._partitions.get(key) is replica:
            del self._partitions[key]
            self.layout_version += 1
        with contextlib.suppress(Exception):  # its files may be what failed; reopening recovers them
            replica.close()

    def forget_group_state(self, group: str) -> None:
        """The replica's directory is deleted here: its term, vote and log start go too, as they did with the
        state file in that directory (a replica moved back must not find a log start its new log lacks)."""
        if self.state_log.state_of(group) is not None:
            self.state_log.forget(group)

    # ---------------------------------------------------------------------------------- ticking

    def start_ticking(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())

    async def _tick_forever(self) -> None:
        # One timer for every group on this broker, not one per partition; quiet groups cost nothing.
        interval_s = self.broker.config.raft_tick_ms / 1000
        loop = asyncio.get_running_loop()
        failed_ticks = 0
        while True:
            due = loop.time() + interval_s
            await asyncio.sleep(interval_s)
            self._note_tick_delay(loop.time() - due, interval_s)
            try:
                self.tick_once()
            except Exception:
                # A bug, but one that must not stop every group's elections and heartbeats on this broker (the
                # ticker task ended silently on one). Logged on the first failure and every TICK_FAILURE_LOG_EVERY.
                failed_ticks += 1
                if failed_ticks % TICK_FAILURE_LOG_EVERY == 1:
                    log.exception("broker %d: a Raft tick failed (%d so far); ticking goes on; please report this "
                                  "with the log", self.node_id, failed_ticks)

    def _note_tick_delay(self, late_s: float, interval_s: float) -> None:
        """How late the tick ran is how long the event loop could not run it: every Raft group and the brokers'
        liveness heartbeats waited as long. Observed always; long stalls are logged for the operator (at most
        one line per STALL_LOG_INTERVAL_S, counting those in between), since a stall near the liveness timeout
        makes the other brokers take this one for dead and its groups elect new leaders."""
        self.broker.metrics.observe_loop_stall(late_s)
        if late_s < STALL_WARN_TICKS * interval_s:
            return
        self._stalls_unlogged += 1
        self._longest_stall_s = max(self._longest_stall_s, late_s)
        now = time.monotonic()
        if now - self._stall_logged_at < STALL_LOG_INTERVAL_S:
            return
        log.warning("broker %d: the event loop was held up for %.0f ms%s (Raft ticks and liveness heartbeats ran "
                    "late; peers take a broker silent for %d ms for dead); look for CPU starvation or a request "
                    "that holds the loop, and see logbroker_event_loop_stall_seconds", self.broker.node_id,
                    self._longest_stall_s * 1000,
                    f" (the longest of {self._stalls_unlogged} stalls in the last {now - self._stall_logged_at:.0f} s)"
                    if self._stalls_unlogged > 1 else "",
                    self.broker.liveness.timeout_ticks * self.broker.config.raft_tick_ms)
        self._stall_logged_at, self._stalls_unlogged, self._longest_stall_s = now, 0, 0.0

    def tick_once(self) -> None:
        liveness = self.broker.liveness
        controller = self.broker.controller
        self.broker.transport.send_many(liveness.heartbeats(controller.node.term if controller is not None else 0,
                                                            self.broker.controller_client.disk_registered))
        self.broker.controller_client.end_metadata_catch_up(self.peer_metadata_terms)
        for peer in liveness.tick():
            self._on_peer_down(peer)
        is_alive = liveness.is_alive
        self._ticks += 1
        if self._ticks % EPOCH_SAVE_INTERVAL_TICKS == 0:
            self._save_epochs_soon()
            self._forget_old_early_messages()
        for replica in list(self._awake):
            if replica.quiet or replica.closed:
                del self._awake[replica]  # back when it wakes (Replica.on_wake)
                continue
            replica.tick()
            replica.maybe_quiesce(is_alive)
        self.wake_groups_never_elected()

    def wake_groups_never_elected(self) -> None:
        """New groups still without any election FIRST_LEADER_WAIT_ELECTION_TIMEOUTS after they opened here: their
        preferred leader never campaigned, so this replica wakes and takes part in an ordinary election."""
        due = self._first_leader_due
        woken: list[str] = []
        while due and due[0][0] <= self._ticks:
            replica = due.popleft()[1]
            if replica.closed or not replica.quiet or replica.term != 0 or replica.leader_id is not None:
                continue
            replica.wake()
            woken.append(replica.name)
        if woken:
            log.warning("broker %d: %d new partition(s) had no election %d ms after they were created here (%s): "
                        "their preferred leader's broker never campaigned (it may be cut off from the controller "
                        "leader); the other replicas elect a leader among themselves", self.node_id, len(woken),
                        self._first_leader_wait_ticks() * self.broker.config.raft_tick_ms,
                        some_of(woken))

    def _first_leader_wait_ticks(self) -> int:
        return FIRST_LEADER_WAIT_ELECTION_TIMEOUTS * self.broker.config.raft_election_ticks

    def _save_epochs_soon(self) -> None:
        """Write the leader-epoch files that appends left stale, in one job off the flush pool."""
        if self._epochs_saving is not None and not self._epochs_saving.done():
            return
        logs = [replica.log for replica in self._replicas.values() if replica.log.epochs_unsaved]
        if logs:
            self._epochs_saving = self._epochs_executor.submit(_save_epochs, logs)

    def _on_peer_down(self, peer: int) -> None:
        """A broker went silent: the groups it led must elect, now rather than after another timeout.

        Each group's survivors agree on one successor (pick_successor: the same pick on every broker that sees the
        same live voters), which campaigns at once while the others hold back: when a broker leading thousands
        of groups dies, letting every survivor campaign at once made most elections collide and repeat (10,000
        partitions at RF3 took 36 s to settle after one broker's SIGKILL). Groups still waiting for their
        preferred leader's first campaign elect as before."""
        woken = 0
        is_alive = self.broker.liveness.is_alive
        for replica in list(self._replicas.values()):
            if replica.closed:
                continue
            if replica.leader_id == peer:
                successor = pick_successor(replica.group, replica.node.membership.voters, peer, is_alive)
                replica.leader_lost(peer, successor=successor == self.node_id)
            elif replica.leader_id is None and replica.preferred_leader == peer:
                replica.wake(fast_forward_ticks=self.broker.config.raft_election_ticks)
            else:
                continue
            woken += 1
        log.warning("broker %d silent for %d ticks; %d group(s) it led elect new leaders",
                    peer, self.broker.liveness.timeout_ticks, woken)

    def on_raft_messages(self, items: list[tuple[str, Message]]) -> None:
        heard = self.broker.liveness.heard_from
        stepped: dict[Replica, None] = {}
        for group, message in items:
            if heard(message.from_node):
                self._peer_returned(message.from_node)
            replica = self._replicas.get(group)
            if replica is not None and not replica.closed:
                replica.step(message, kick=False)
                stepped[replica] = None
            elif group == LIVENESS_GROUP:
                self.peer_metadata_terms[message.from_node] = message.term
                self.broker.liveness.note_heartbeat(message)
            else:
                if replica is None:
                    self._keep_early(group, message)
                if self._handovers:
                    self._note_leader_elsewhere(group, message)
        # Each group's Ready once the whole batch is stepped: a group's messages in one batch (two followers'
        # acknowledgements, a vote and an append) make one Ready, not one each.
        for replica in stepped:
            replica.kick()

    def _peer_returned(self, peer: int) -> None:
        """A broker declared down is heard from again. Its leaders here learn it at once, before its message is
        stepped and before anything reads their in-sync sets: the broker is alive again from this moment, and
        its replicas' places in their logs are unknown until they answer (Replica.peer_returned)."""
        for replica in list(self._replicas.values()):
            replica.peer_returned(peer)

    def _keep_early(self, group: str, message: Message) -> None:
        """A message for a group with no replica here (yet): kept for the replica about to open (see
        EARLY_MESSAGES_PER_GROUP_MAX), within the bounds there."""
        if sum(len(entry.payload) for entry in message.entries) > EARLY_MESSAGE_MAX_BYTES:
            return
        kept = self._early_messages.get(group)
        if kept is None:
            if len(self._early_messages) >= EARLY_MESSAGE_GROUPS_MAX:
                return
            kept = self._early_messages[group] = (self._ticks, [])
        if len(kept[1]) < EARLY_MESSAGES_PER_GROUP_MAX:
            kept[1].append(message)

    def _forget_old_early_messages(self) -> None:
        oldest = self._ticks - EARLY_MESSAGE_TTL_TICKS
        for group in [g for g, (kept_at, _) in self._early_messages.items() if kept_at < oldest]:
            del self._early_messages[group]

    def _step_early_messages(self, replica: Replica) -> None:
        kept = self._early_messages.pop(replica.group, None)
        if kept is None:
            return
        for message in kept[1]:
            replica.step(message, kick=False)
        replica.kick()

    def _on_leader_change(self, replica: Replica) -> None:
        broker = self.broker
        broker.data.wake_fetchers()
        if replica.group != CONTROLLER_GROUP:
            broker.metrics.record_leader_change(replica.log.topic, replica.log.partition, replica.is_leader)
            if replica.is_leader:
                broker.controller_client.note_leadership(replica)

    # --------------------------------------------------------------------- failures and handovers

    def _on_replica_failed(self, replica: Replica, exc: Exception) -> None:
        """A replica could not write (a full or failing disk): it must not keep a leadership it cannot use,
        nor take one back, until writes succeed again (Kafka takes a failed log directory offline)."""
        led = replica.node.role is Role.LEADER
        if led:
            self._hand_over_failed_leadership(replica)
        key = (replica.log.topic, replica.log.partition)
        self._failed_replicas[key] = (replica, time.monotonic() + FAILED_REPLICA_RETRY_S)
        log.error("%s: %sbroker %d retries every %.0f s and reopens the replica once a write succeeds; free "
                  "space or fix the disk under %s", replica.name,
                  "leadership handed to another replica; " if led else "", self.node_id, FAILED_REPLICA_RETRY_S,
                  replica.log.directory)

    def _hand_over_failed_leadership(self, replica: Replica) -> None:
        """Ask the most caught-up live follower to campaign at once (TIMEOUT_NOW), since this replica can
        neither write nor go on heartbeating; without it, quiet followers would wait for a leader forever."""
        node = replica.node
        followers = [(progress.match_offset, voter) for voter in node.membership.voters
                     if voter != self.node_id and (progress := node.progress(voter)) is not None
                     and self.broker.liveness.is_alive(voter)]
        # Asked again every retry round, of the next follower, until a leader of a later term is heard:
        # the first one asked may itself be unable to win (down, or its own disk full).
        self._handovers[replica.group] = Handover(replica.name, replica.term, sorted(node.membership.voters))
        if not followers:
            return
        _, target = max(followers)
        self._send_timeout_now(replica.group, target)

    def _send_timeout_now(self, group: str, target: int) -> None:
        handover = self._handovers[group]
        self.broker.transport.send(group, Message(MessageType.TIMEOUT_NOW, self.node_id, target, handover.term))
        handover.asked += 1
        log.warning("%s: asked broker %d to take over leadership from broker %d, which cannot write (term %d)",
                    handover.name, target, self.node_id, handover.term)

    def _repeat_handovers(self) -> None:
        for group, handover in list(self._handovers.items()):
            live = [v for v in handover.voters if v != self.node_id and self.broker.liveness.is_alive(v)]
            if live:
                self._send_timeout_now(group, live[handover.asked % len(live)])

    def _note_leader_elsewhere(self, group: str, message: Message) -> None:
        """A message for a group whose replica here has failed: a leader of a later term ends the hand-over."""
        handover = self._handovers.get(group)
        if handover is None:
            return
        if message.term > handover.term and message.type in (MessageType.APPEND, MessageType.HEARTBEAT):
            del self._handovers[group]
            log.info("%s: broker %d leads now (term %d)", handover.name, message.from_node, message.term)
        else:
            handover.term = max(handover.term, message.term)

    def retry_failed_replicas(self, now_s: float) -> int:
        """Reopen failed replicas whose disk takes writes again; returns how many were reopened."""
        if now_s >= self._next_handover_s:
            self._next_handover_s = now_s + FAILED_REPLICA_RETRY_S
            self._repeat_handovers()
        reopened = 0
        for key, (replica, retry_at_s) in list(self._failed_replicas.items()):
            if now_s >= retry_at_s and self._retry_failed_replica(key, replica, now_s):
                reopened += 1
        return reopened

    def _retry_failed_replica(self, key: tuple[str, int], replica: Replica, now_s: float) -> bool:
        """Reopen one failed replica if its disk takes a write now; True when it was reopened."""
        topic = self.broker.cluster.topics.get(key[0])
        is_controller = replica.group == CONTROLLER_GROUP
        if not is_controller and (topic is None or topic.raft_group(key[1]) != replica.group):
            del self._failed_replicas[key]  # deleted meanwhile
            return False
        try:
            probe_write(replica.log.directory)
        except OSError as exc:
            log.debug("%s: still cannot write (%s); retrying", replica.name, exc)
            self._failed_replicas[key] = (replica, now_s + FAILED_REPLICA_RETRY_S)
            return False
        del self._failed_replicas[key]
        self._handovers.pop(replica.group, None)
        self.forget_replica(replica)
        if is_controller:
            self.broker.controller_client.reopen(replica)
            return True
        if topic is not None and self.open_partition(topic, key[1], damaged_from=replica.damaged_from):
            log.info("%s: writes succeed again on broker %d; the replica is reopened and catches up from "
                     "the leader", replica.name, self.node_id)
            return True
        return False

    # --------------------------------------------------------------------- opening and closing

    def open_partition(self, topic: TopicMetadata, index: int, damaged_from: int | None = None) -> Replica | None:
        plog = self._open_log(topic, index, damaged_from)
        return self._start_replica(topic, index, plog) if plog is not None else None

    async def open_partitions(self, topic: TopicMetadata, indexes: list[int]) -> None:
        """Open many of a new topic's replicas: their files are created in a thread of their own, so the event
        loop never waits for the disk (creating a file waits while the journal commits the pool's fsyncs: a
        millisecond each, thousands of times). The replicas start on the loop, if the topic is still this one
        and the partition still unopened (a delete or move may have come meanwhile)."""
        loop = asyncio.get_running_loop()
        # One syncfs makes the whole chunk's new files durable (opened first: see FileSystemSync), where each new
        # partition cost three fsyncs (its identity file, its directory, the data directory's entry for it).
        chunk_sync = FileSystemSync(self.broker.data_dir)
        try:
            # One job per opener thread, each opening its share of the chunk in turn: a job per partition cost a
            # trip to the pool and back for each (thread wake-ups and GIL hand-offs: strace counted 260 futex
            # calls per new partition), and concurrent creations still share the journal's commits.
            shares = [indexes[i::OPENER_THREADS] for i in range(min(OPENER_THREADS, len(indexes)))]
            opened = await asyncio.gather(*(loop.run_in_executor(self._opener, self._open_logs, topic, share)
                                            for share in shares))
            by_index = {index: plog for share, plogs in zip(shares, opened, strict=True)
                        for index, plog in zip(share, plogs, strict=True)}
            logs = [by_index[index] for index in indexes]
            # Before any replica starts: the chunk's files and names durable, by one syncfs or file by file.
            await loop.run_in_executor(self._opener, self._make_creation_durable, chunk_sync, logs)
        finally:
            chunk_sync.close()
        for index, plog in zip(indexes, logs, strict=True):
            if plog is None:
                continue
            current = self.broker.cluster.topics.get(topic.name)
            if (current is not None and current.topic_id == topic.topic_id and self.hosted_replica(topic.name, index)
                    is None and self.node_id in self.broker.cluster.hosts(current, index)):
                self._start_replica(current, index, plog)
                continue
            plog.close()
            if current is None or current.topic_id != topic.topic_id:
                self.remove_directory(topic, index)  # deleted while its files were being created
        # The replicas just opened live as long as their topic: out of the cyclic collector's sight. Python
        # collects its oldest generation each time it grows by a quarter, scanning every object: with 4,000
        # replicas that held the event loop for two seconds, the broker's heartbeats stopped and its peers
        # took its 1,345 leaderships away. Frozen objects are still freed by reference counting.
        gc.freeze()

    def _open_logs(self, topic: TopicMetadata, indexes: list[int]) -> list[PartitionLog | None]:
        """In an opener thread: several new partitions' logs, one after the other (see open_partitions)."""
        return [self._open_log(topic, index, None, True) for index in indexes]

    def _make_creation_durable(self, chunk_sync: FileSystemSync, logs: list[PartitionLog | None]) -> None:
        """In an opener thread: the chunk's new files and names durable, by one syncfs (then the logs' first
        flushes owe nothing for them), else by fsyncing each new identity file and the data directory (the logs'
        first flushes then fsync their own directories)."""
        opened = [plog for plog in logs if plog is not None]
        if chunk_sync.sync():
            for plog in opened:
                plog.creation_made_durable()
            return
        for plog in opened:
            fsync_file(plog.directory / filenames.PARTITION_METADATA_FILE)
        fsync_dir(self.broker.data_dir)

    def _open_log(self, topic: TopicMetadata, index: int, damaged_from: int | None = None,
                  in_opener: bool = False) -> PartitionLog | None:
        """The partition's log, its directory claimed for this topic (created if new); None if it cannot be.

        A new directory is made durable before anything in it is: in_opener, by open_partitions for the whole
        chunk (_make_creation_durable) before any replica starts; otherwise its identity file by the log's first
        flush; and the directory's own entries by that flush unless open_partitions' syncfs covered them."""
        directory = self.broker.data_dir / filenames.partition_dir_name(topic.name, index)
        try:
            claim = self._claim_directory(topic, directory)
            if claim is None:
                return None
            plog = PartitionLog.open(directory, self.broker.controller_client.log_config(topic.configs),
                                     topic.name, index)
            if claim is _NEW_DIRECTORY and not in_opener:  # open_partitions makes the opener's durable
                plog.sync_at_first_flush(lambda: sync_identity(directory))
            if damaged_from is not None and plog.log_start_offset <= damaged_from < plog.log_end_offset:
                # A damaged batch stopped the replica: what follows it here is lost; the leader resends it.
                plog.truncate_to(damaged_from)
                log.error("%s: cut the log at offset %d, where a damaged batch was found; the other replicas "
                          "send the rest again", directory.name, damaged_from)
            return plog
        except Exception:
            # One unreadable partition must not take the broker (and every other partition) down.
            log.exception("%s: cannot open this replica; the partition is unavailable on broker %d until "
                          "the problem above is fixed and the broker restarted", directory.name, self.node_id)
            return None

    def _start_replica(self, topic: TopicMetadata, index: int, plog: PartitionLog) -> Replica | None:
        try:
            replica = self.add_replica(topic.raft_group(index), plog, Membership.of(topic.assignment[index]),
                                       self._on_partition_commit)
        except Exception:
            log.exception("%s: cannot open this replica; the partition is unavailable on broker %d until "
                          "the problem above is fixed and the broker restarted", plog.directory.name, self.node_id)
            with contextlib.suppress(Exception):
                plog.close()
            return None
        self._partitions[(topic.name, index)] = replica
        self.layout_version += 1
        replica.preferred_leader = self.preferred_leader(topic, index)
        replica.node.vote_while_catching_up_for = self.safe_vote_while_catching_up(topic, index, replica)
        self._attach_state_machines(replica, topic.name, index, plog.directory)
        self._start_election(replica, topic.assignment[index], topic.name, index)
        self._step_early_messages(replica)
        return replica

    def _attach_state_machines(self, replica: Replica, name: str, index: int, directory: Path) -> None:
        if name == OFFSETS_TOPIC:
            self._attach_group_runtime(replica, index)
        elif not name.startswith("__"):
            machine = ShareStateMachine(replica, directory, name, index, self.broker.share_groups.share_config)
            replica.attach(machine)
            self.broker.share_groups.add_machine(name, index, machine)

    def rejoin_if_state_lost(self, topic_name: str, index: int, replica: Replica) -> bool:
        """A replica holding nothing must catch up from a leader before it votes (Replica.rejoin_after_losing_state)
        when its group has had a leader (the metadata names one) or its partition is older than this broker's disk
        (a replaced disk's replica), whether or not the metadata applied so far names the group's leader: a leader
        may die before its election is recorded. True once it waits to catch up and the leader the metadata names,
        if any, was told to resend the log."""
        lost_log = replica.lost_its_log or (replica.holds_nothing and self._created_before_state_loss(topic_name))
        if replica.closed or not (replica.holds_nothing or lost_log):
            return False
        if replica.node.membership.voters == {self.node_id}:
            return False  # its only replica: nobody to catch up from, and nobody it could help elect wrongly
        known = self.broker.cluster.leaders.get((topic_name, index))
        older = self._older_than_disk(topic_name)
        if known is None and not older and not lost_log:
            return False
        leader, term = known if known is not None else (None, 0)
        replica.rejoin_after_losing_state(leader, term, lost=older or lost_log)
        if known is None and not lost_log and self.broker.controller_client.disk_registered_at is None:
            self._waiting_for_registration[(topic_name, index)] = replica  # reconsidered once it is applied
        return known is not None

    def safe_vote_while_catching_up(self, topic: TopicMetadata, index: int, replica: Replica) -> int | None:
        """The one replica this replica may vote for while it waits to catch up (RaftNode.wait_to_catch_up): the
        other of exactly two voters, when the partition has had those two since it was created (no replica move
        ever named it). Every entry ever committed in such a group was acknowledged by both, so the other holds
        them all; without this vote a two-replica partition one of whose disks was replaced could elect nobody."""
        membership = replica.node.membership
        if (len(membership.voters) != 2 or membership.learners or index in topic.reconfigured
                or self.node_id not in membership.voters or membership.voters != set(topic.assignment[index])):
            return None
        (other,) = membership.voters - {self.node_id}
        return other

    def _created_before_state_loss(self, topic_name: str) -> bool:
        topic = self.broker.cluster.topics.get(topic_name)
        return (self.state_log_lost_below is not None and topic is not None
                and topic.created_offset < self.state_log_lost_below)

    def _older_than_disk(self, topic_name: str) -> bool:
        """Whether the topic was created before this broker's disk was registered (disk_identity.py) and that disk
        replaced an earlier one of this broker, or the disk is not registered (yet, or any more): then a replica
        of it holding nothing may have lost what it held on the earlier disk. Judged by the commands' places in
        the metadata log, never by when the replica happens to open (a big topic's replicas open in chunks, some
        after the replay has applied the registration). A broker's first disk replaced nothing: a topic created
        before its registration (a broker starting late, or a new cluster's first second) is new on it, and at
        RF2 its vote is the only one the other replica can win with."""
        registered_at = self.broker.controller_client.disk_registered_at
        if registered_at is None:
            return True  # until the registration is applied: waits, reconsidered then (end_waits_of_a_first_disk)
        topic = self.broker.cluster.topics.get(topic_name)
        return (topic is not None and topic.created_offset < registered_at
                and self.broker.cluster.replaced_a_disk(self.node_id, self.broker.disk_id, registered_at))

    def end_waits_of_a_first_disk(self) -> None:
        """This broker's disk registration is applied: replicas that wait to catch up only because it was not
        (_waiting_for_registration), still empty, with no leader recorded and nothing saying they lost a log, stop
        waiting if the disk is this broker's first: they never held anything. Each was a group member that could
        not vote: at RF2, or with another broker down, its group could elect no leader. (Their term may have moved
        meanwhile, with the other replicas' campaigns: an empty log has acknowledged nothing in any term.)"""
        waiting, self._waiting_for_registration = self._waiting_for_registration, {}
        for key, replica in waiting.items():
            if (replica.closed or not replica.node.catching_up or replica.node.log.last_offset >= 0
                    or replica.lost_its_log or self.broker.cluster.leaders.get(key) is not None
                    or self._older_than_disk(key[0])):
                continue
            replica.node.stop_waiting_to_catch_up()
            replica.wake()
            log.info("%s: broker %d's disk is its first: its empty replica is new here and takes part in elections",
                     replica.name, self.node_id)

    def check_replicas_holding_nothing(self) -> None:
        """After leader reports were applied: the replicas opened holding nothing whose group has had a leader
        since (at start-up, the metadata log names a partition's leader after the partition itself)."""
        for key, replica in list(self._holding_nothing.items()):
            if not replica.holds_no_log or self.rejoin_if_state_lost(key[0], key[1], replica):
                del self._holding_nothing[key]  # closed replicas hold nothing: rejoin_if_state_lost is False

    def _start_election(self, replica: Replica, replicas: list[int], topic_name: str, index: int) -> None:
        if replica.holds_no_log:
            if self.rejoin_if_state_lost(topic_name, index, replica):
                return
            self._holding_nothing[(topic_name, index)] = replica
        if replica.node.catching_up:
            replica.quiet = True  # older than this disk: it waits for a leader's appends, which wake it
            return
        if replica.term == 0:
            # A new group: its preferred leader campaigns at once and the others stay quiet until it
            # calls (or its broker is found dead), so a thousand new partitions elect without split
            # votes, and leadership spreads as the placement intended. When the preferred broker is
            # already down, the first live one in the placement stands in (nobody would wake the others).
            first_live = next((n for n in replicas if self.broker.liveness.is_alive(n)), self.node_id)
            if first_live == self.node_id:
                replica.campaign_now()
            else:
                replica.quiet = True
                self._first_leader_due.append((self._ticks + self._first_leader_wait_ticks(), replica))

    def _attach_group_runtime(self, replica: Replica, index: int) -> None:
        broker = self.broker
        runtime = GroupShardRuntime(replica, lambda: GroupCoordinatorShard(
            broker.controller_client.topic_partition_counts, broker.group_config))
        replica.attach(runtime)
        broker.group_runtimes[index] = runtime

    def _on_partition_commit(self, replica: Replica, entries: Sequence[Entry]) -> None:
        self.broker.data.wake_fetchers()

    def preferred_leader(self, topic: TopicMetadata, index: int) -> int:
        """The first broker of a move's target while it runs (so balancing does not pull leadership back to a
        broker on its way out), else of the assignment."""
        return self.broker.cluster.moves.get((topic.name, index), topic.assignment[index])[0]

    def _claim_directory(self, topic: TopicMetadata, directory: Path) -> str | None:
        """Make directory hold this topic's partition; None when it belongs to a newer topic of the name, else
        _NEW_DIRECTORY (created now, not yet durable: its log's first flush makes it so) or _OURS.

        At start-up the controller re-applies its whole log, so the create of a topic deleted long ago is
        applied again while the directory already holds the partition of a newer topic of that name: that
        directory is not this topic's to open, and the replayed delete that follows will not touch it."""
        identity = read_identity(directory)
        ours = TopicIdentity(topic.topic_id, topic.created_offset)
        if identity is None:
            if not directory.exists():
                # Thousands of partitions are created at once: no fsync here, on the event loop, but in the
                # first flush of the new log, in the thread pool, before anything in it is durable.
                write_identity(directory, ours, durable=False)
                return _NEW_DIRECTORY
            write_identity(directory, ours)  # one written before topic IDs existed
            return _OURS
        if identity.topic_id == topic.topic_id:
            return _OURS
        if identity.created_offset > topic.created_offset:
            log.debug("%s: holds topic ID %s, newer than the replayed %s; left alone", directory.name,
                      identity.topic_id, topic.topic_id)
            return None
        # Left by an older topic of this name whose delete did not finish (a crash in between): it is garbage.
        log.warning("%s: removing the leftover replica of an older, deleted topic (ID %s) before creating topic "
                    "ID %s", directory.name, identity.topic_id, topic.topic_id)
        shutil.rmtree(directory)
        write_identity(directory, ours)
        return _OURS

    def close_partition(self, topic: TopicMetadata, index: int) -> None:
        """Close this broker's replica of a deleted topic's partition, if it is that topic's (by topic ID)."""
        replica = self._partitions.get((topic.name, index))
        if replica is not None and replica.group == topic.raft_group(index):
            del self._partitions[(topic.name, index)]
            self.layout_version += 1
            del self._replicas[replica.group]
            replica.close()
            if topic.name == OFFSETS_TOPIC:
                self.broker.group_runtimes.pop(index, None)
            self.broker.share_machines.pop((topic.name, index), None)

    def drop_moved_replica(self, topic: TopicMetadata, index: int) -> None:
        """This broker's replica was moved away and is no longer a member of the group: delete it."""
        replica = self._partitions.pop((topic.name, index), None)
        self.layout_version += 1
        if replica is not None:
            self.forget_replica(replica)
        self.forget_group_state(topic.raft_group(index))
        directory = self.remove_directory(topic, index)
        if directory is not None:
            log.info("%s: replica moved to brokers %s; deleted here", directory.name, topic.assignment[index])

    def remove_directory(self, topic: TopicMetadata, index: int) -> Path | None:
        """Delete the partition's directory if it holds this topic ID (never a newer topic's); the path if so."""
        directory = self.broker.data_dir / filenames.partition_dir_name(topic.name, index)
        identity = read_identity(directory) if directory.exists() else None
        if identity is None or identity.topic_id != topic.topic_id:
            return None
        self.forget_group_state(topic.raft_group(index))
        shutil.rmtree(directory)
        return directory

    async def hand_over_leadership(self) -> None:
        """Graceful shutdown: move every group this broker leads to another voter, then wait briefly."""
        led = [r for r in self._replicas.values() if r.is_leader and len(r.node.membership.voters) > 1]
        for replica in led:
            target = next((v for v in sorted(replica.node.membership.voters) if v != self.node_id), None)
            if target is not None:
                with contextlib.suppress(Exception):
                    replica.transfer_leadership(target)
        deadline = time.monotonic() + SHUTDOWN_TRANSFER_TIMEOUT_S
        while any(r.is_leader for r in led) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        still = [r.name for r in led if r.is_leader]
        if still:
            log.warning("leadership of %d of %d partition(s) led here (%s) not handed over in %.0f s; their followers "
                        "elect a leader after an election timeout", len(still), len(led), some_of(still),
                        SHUTDOWN_TRANSFER_TIMEOUT_S)
        elif led:
            log.info("handed leadership of %d group(s) to other brokers", len(led))

    async def stop_ticking(self) -> None:
        if self._ticker is not None:
            await cancel_and_wait(self._ticker)

    def close_all(self) -> None:
        for replica in list(self._replicas.values()):
            try:
                replica.close()
            except Exception as exc:  # a replica whose disk failed may fail to close too; recovery handles it
                log.warning("%s: not closed cleanly (%s); the next start recovers its log", replica.name, exc)
        self._replicas.clear()
        self._partitions.clear()
        self._controller_executor.shutdown(wait=True)
        self._state_sync_executor.shutdown(wait=True)
        self._opener.shutdown(wait=True)
        self._epochs_executor.shutdown(wait=True)
        self.state_log.close()

    def flush_backlog(self) -> int:
        """Jobs waiting for a thread of the flush pool (appends, fsyncs, state saves of every partition)."""
        # CPython's ThreadPoolExecutor keeps its queue here; no public way to ask how long it is.
        return self.broker.executor._work_queue.qsize()

    # ---------------------------------------------------------------------------------- lookups

    def hosted_replica(self, topic: str, index: int) -> Replica | None:
        """This broker's replica of the partition, if it holds one (no check that the topic exists)."""
        return self._partitions.get((topic, index))

    def local_partitions(self) -> list[tuple[tuple[str, int], Replica]]:
        """Every partition replica this broker holds now, with its (topic, partition)."""
        return list(self._partitions.items())

    def local_replica(self, topic: str, index: int) -> Replica | None:
        """This broker's replica of the partition, if it holds one (no error for an unknown topic)."""
        return self._partitions.get((topic, index))

    def replica(self, topic: str, index: int) -> Replica | None:
        """The local replica, or None if this broker holds none (UnknownTopicOrPartition if none exists)."""
        spec = self.broker.controller_client.topic(topic)
        if not 0 <= index < spec.partitions:
            raise errors.UnknownTopicOrPartition(
                f"topic {topic!r} has partitions 0..{spec.partitions - 1}; partition {index} does not exist")
        return self._partitions.get((topic, index))

    def leader_replica(self, topic: str, index: int) -> Replica:
        replica = self.replica(topic, index)
        if replica is not None and replica.is_leader and not replica.closed:
            return replica
        if replica is not None and replica.failure is not None:
            raise self._failed_replica_error(replica, topic, index)
        peers = self.broker.client_addresses
        if replica is None:  # no local replica: the reported leader, else a replica that knows it
            hint = self.known_leader(topic, index) or self.broker.cluster.topics[topic].assignment[index][0]
            raise errors.NotLeader(f"{topic}-{index}: broker {self.node_id} holds no replica; ask broker {hint}",
                                   leader_id=hint, leader_address=peers.get(hint, ""))
        leader = replica.leader_id
        address = peers.get(leader, "") if leader is not None else ""
        if leader is None or not address:
            # Either an election is under way or a majority of the replicas is unreachable; both clear
            # up only when enough replicas talk to each other again.
            raise errors.NotEnoughReplicas(
                f"{topic}-{index}: no leader: a majority of replicas {sorted(replica.node.membership.voters)} "
                "must be up and connected to elect one; retrying clients succeed once it is")
        raise errors.NotLeader(f"{topic}-{index}: broker {self.node_id} is not the leader; broker {leader} at "
                               f"{address} is", leader_id=leader, leader_address=address)

    def _failed_replica_error(self, replica: Replica, topic: str, index: int) -> errors.BrokerError:
        if len(replica.node.membership.voters) == 1:
            return errors.StorageFailure(
                f"{replica.name}: broker {self.node_id} cannot write this partition's only replica "
                f"({replica.failure}); free space or fix the disk under {replica.log.directory}: the broker "
                f"reopens it by itself once a write succeeds")
        hint = self.known_leader(topic, index)
        return errors.NotLeader(
            f"{replica.name}: broker {self.node_id} cannot write its replica ({replica.failure}); "
            + (f"broker {hint} leads now" if hint is not None else "another replica takes over; retry"),
            leader_id=hint if hint is not None else -1,
            leader_address=self.broker.client_addresses.get(hint, "") if hint is not None else "")

    def known_leader(self, topic: str, index: int) -> int | None:
        """The partition's leader: from the local replica if there is one, else as reported to the controller."""
        replica = self._partitions.get((topic, index))
        if replica is not None and not replica.closed:
            return replica.leader_id
        reported = self.broker.cluster.leaders.get((topic, index))
        if reported is None or (replica is not None and reported[0] == self.node_id):
            return None  # this broker's own replica failed: it leads nothing, whatever was reported
        if not self.broker.liveness.is_alive(reported[0]):
            return None  # reported before its broker went down: the partition is offline or electing
        return reported[0]

    def in_sync_replicas(self, replica: Replica | None, assignment: list[int]) -> list[int]:
        """The leader's view: live replicas whose log reaches the high watermark; others see the assignment.

        A follower's match offset is what it last acknowledged; one that lost its data since (a wiped or
        truncated disk) says so in its next answer, which moves its match back (see RaftNode), and one that
        is down is not in sync however far it had got, nor one back from being down until it has answered."""
        if replica is None or not replica.is_leader:
            return list(assignment)
        caught_up = [self.node_id]
        unconfirmed = replica.unconfirmed_followers
        for node in assignment:
            progress = replica.node.progress(node) if node != self.node_id else None
            if (progress is not None and progress.match_offset >= replica.high_watermark - 1
                    and self.broker.liveness.is_alive(node) and node not in unconfirmed):
                caught_up.append(node)
        return sorted(caught_up)

    def live_brokers(self) -> list[int]:
        return [node for node in self.broker.peers if self.broker.liveness.is_alive(node)]


def _state_log_was_lost(data_dir: Path) -> bool:
    """Whether the broker's Raft state log is missing from a data directory whose metadata log exists, with no
    state file of an older version (moved into the state log at its first load) to take its place: deleted. Every
    group's term and vote went with it, and a replica whose directory went too holds nothing as a new one does."""
    controller_dir = data_dir / CONTROLLER_DIR
    legacy = (controller_dir / filenames.RAFT_STATE_FILE,
              data_dir / LEGACY_RAFT_STATE_DIR / f"{CONTROLLER_DIR}{LEGACY_RAFT_STATE_SUFFIX}")
    return (not (data_dir / STATE_LOG_FILE).exists() and any(controller_dir.glob("*.log"))
            and not any(path.exists() for path in legacy))


def _save_epochs(logs: list[PartitionLog]) -> None:
    for partition_log in logs:
        partition_log.save_epochs()  # a closed log skips it; a failed write is logged and repaired at open


def some_of(names: list[str], shown: int = NAMES_SHOWN_MAX) -> str:
    """The first few names of a list that can hold thousands (a log line names a few, and says more exist)."""
    return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")
