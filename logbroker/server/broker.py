"""The broker's core, free of gRPC: the controller, partition replicas, produce, fetch, offsets.

Every partition is a Raft group over its replicas and the partition log is the Raft log; the cluster
metadata (topics, configs, replica assignments) is one more Raft group, the controller, over every
broker named in --peers. A single broker is a cluster of one: the same code path, with groups of one
voter. The gRPC layer (service.py) turns requests into calls here and exceptions into error codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logbroker_client import records as rec

from logbroker.cluster.liveness import Liveness
from logbroker.cluster.metadata import (
    CONTROLLER_GROUP,
    MAX_EPOCH,
    ClusterState,
    TopicEvent,
    TopicMetadata,
    decode_command,
    encode_command,
    new_topic_id,
    place_replicas,
)
from logbroker.cluster.producer_state import BatchIdentity, Outcome, SequenceVerdict
from logbroker.cluster.raft_storage import DamagedLogError, RecentEntries, ReplicaStateFile
from logbroker.cluster.replica import NotLeaderNow, Replica, ReplicaFailedError
from logbroker.cluster.topic_names import MAX_PARTITIONS, TopicNameError, check_topic_name
from logbroker.cluster.transport import RaftTransport
from logbroker.groups.coordinator import OFFSETS_TOPIC, GroupConfig, GroupCoordinatorShard
from logbroker.groups.runtime import GroupShardRuntime
from logbroker.groups.share import InvalidShareConfig, RecordState, ShareConfig, share_config_from
from logbroker.groups.share_runtime import ShareStateMachine
from logbroker.raft.errors import NotLeaderError, ProposalDroppedError
from logbroker.raft.membership import Membership
from logbroker.raft.types import Entry, EntryKind, Message, MessageType, RaftConfig, Role
from logbroker.server import errors
from logbroker.server.config import BrokerConfig
from logbroker.server.metrics import BrokerMetrics
from logbroker.server.quotas import Backpressure, DiskGuard, quotas_from
from logbroker.server.topic_admin import TopicAdmin
from logbroker.storage import filenames
from logbroker.storage.config import InvalidConfigError, LogConfig
from logbroker.storage.errors import OffsetOutOfRangeError, StorageError
from logbroker.storage.files import probe_write
from logbroker.storage.log import PartitionLog
from logbroker.storage.partition_metadata import TopicIdentity, read_identity, write_identity

log = logging.getLogger("logbroker.broker")

EARLIEST_TIMESTAMP = -2
LATEST_TIMESTAMP = -1
LEGACY_RAFT_STATE_DIR = "__raft"  # where Raft state files lived before they moved into partition directories
LEGACY_RAFT_STATE_SUFFIX = ".raftstate"
CONTROLLER_DIR = "__controller-0"
SHUTDOWN_TRANSFER_TIMEOUT_S = 3.0
MAX_LEADER_TRANSFERS_PER_ROUND = 100
LEADER_REPORT_INTERVAL_S = 0.2
MAINTENANCE_INTERVAL_S = 0.1
LEADER_REPORT_TIMEOUT_S = 5.0
FAILED_REPLICA_RETRY_S = 1.0  # how often a replica that could not write tries again
# __consumer_offsets: kept forever (snapshots bound it), in small segments (offsets_segment_bytes) so that
# the segments below a snapshot can be deleted soon.
OFFSETS_TOPIC_CONFIGS = {"retention.ms": "-1", "flush": "always"}
# A producer request carries up to 16 MiB; the pipe to each follower holds one such request, in 1 MiB
# appends. Small appends keep something arriving from a leader every few milliseconds even while it
# streams bulk (any message counts for liveness; one 4 MiB append took 170 ms on a loaded host), and the
# window bounds what a follower buffers per group before it is written.
RAFT_MAX_MESSAGE_BYTES = 1 << 20
RAFT_MAX_INFLIGHT_BYTES = 16 << 20


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def dead_letter_producer_id(group_id: str, topic: str, partition: int) -> int:
    """Fixed for (group, source partition): in [2^61, 2^62), away from clients' random 62-bit ids' usual range."""
    return (1 << 61) | (zlib.crc32(f"{group_id}\0{topic}\0{partition}".encode()) << 16)


@dataclass
class Handover:
    """A failed leader's request that another replica campaign, repeated until a later leader is heard."""

    name: str
    term: int
    voters: list[int]
    asked: int = 0


@dataclass
class ProduceResult:
    base_offset: int
    log_append_time_ms: int
    log_start_offset: int
    batch_base_offsets: list[int]


@dataclass
class FetchResult:
    records: bytes
    high_watermark: int
    log_start_offset: int


class Broker:
    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.node_id = config.node_id
        self.peers = config.peer_addresses()
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=config.flush_threads, thread_name_prefix="flush")
        self._log_defaults = LogConfig.from_mapping(config.log_defaults)
        self.cluster = ClusterState()
        self.transport = RaftTransport(self.node_id, self.peers, self._on_raft_messages, secret=config.cluster_secret)
        self.liveness = Liveness(self.node_id, list(self.peers), config.liveness_timeout_ticks)
        self._recent_entries = RecentEntries(config.raft_entry_cache_bytes)  # shared by every replica
        self._replicas: dict[str, Replica] = {}  # group name -> replica, the controller included
        self._partitions: dict[tuple[str, int], Replica] = {}
        self.controller: Replica | None = None
        self._data_arrived = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None
        self._reporter: asyncio.Task[None] | None = None
        # (topic, partition) -> (epoch, topic id) of leaderships won here and not yet in the controller log
        self._leader_reports: dict[tuple[str, int], tuple[int, str]] = {}
        self.group_runtimes: dict[int, GroupShardRuntime] = {}  # __consumer_offsets partition -> its coordinator
        self.share_machines: dict[tuple[str, int], ShareStateMachine] = {}  # share-group state per partition
        self._share_ticks: dict[tuple[str, int], asyncio.Task[None]] = {}
        # Deterministic per source partition and group, so a dead letter retried after a failover is stored once.
        self.dead_letter_sender: Callable[[str, tuple[str, int], bytes], Awaitable[None]] | None = None
        # Set by the server layer: asks the controller leader at an address to create a topic (over gRPC).
        self.topic_creator: Callable[[str, str, int], Awaitable[None]] | None = None
        self.group_config = GroupConfig(session_timeout_ms=config.group_session_timeout_ms,
                                        heartbeat_interval_ms=config.group_heartbeat_interval_ms,
                                        offsets_retention_ms=config.offsets_retention_minutes * 60_000,
                                        snapshot_trigger_bytes=config.offsets_snapshot_trigger_bytes)
        self._handovers: dict[str, Handover] = {}  # Raft group -> leadership a failed replica is giving away
        self._next_handover_s = 0.0
        self._metadata_loaded = False  # see metadata_loaded()
        # (topic, partition) -> (replica that could not write, when to try again)
        self._failed_replicas: dict[tuple[str, int], tuple[Replica, float]] = {}
        self._last_flush_s: dict[str, float] = {}  # flush="interval" groups: when their log was last fsynced
        # Set by the server layer: sends leader reports to the controller leader at an address (over gRPC).
        self.send_leader_report: Callable[[str, int, list[list[Any]]], Awaitable[bool]] | None = None
        self.topic_admin = TopicAdmin(self)  # configs, partition counts and replica moves after creation
        self.metrics = BrokerMetrics(self)  # Prometheus: counters bumped below, gauges read when scraped
        self.backpressure = Backpressure(quotas_from(config), config.max_inflight_produce_bytes,
                                         config.produce_backpressure_wait_ms / 1000, config.node_id)
        self.disk_guard = DiskGuard(self.data_dir, config.min_free_disk_bytes)

    def raft_config(self) -> RaftConfig:
        return RaftConfig(node_id=self.node_id, election_timeout_ticks=self.config.raft_election_ticks,
                          heartbeat_timeout_ticks=self.config.raft_heartbeat_ticks,
                          max_msg_bytes=RAFT_MAX_MESSAGE_BYTES, max_inflight_bytes=RAFT_MAX_INFLIGHT_BYTES)

    # ------------------------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Open the controller log; its committed commands re-create every local replica as they apply."""
        plog = PartitionLog.open(self.data_dir / CONTROLLER_DIR, LogConfig(), CONTROLLER_GROUP, 0)
        voters = Membership.of(self.peers)
        self.controller = self._add_replica(CONTROLLER_GROUP, plog, voters, self._apply_controller, controller=True)
        self.controller.start()  # re-applies the committed prefix of the metadata log before any election
        await self.transport.start()
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())
        self._reporter = asyncio.get_running_loop().create_task(self._report_leaders_forever())
        log.info("broker %d up: peers %s, data under %s", self.node_id, self.peers, self.data_dir)

    def _add_replica(self, group: str, plog: PartitionLog, membership: Membership,
                     on_commit: Callable[[Replica, Sequence[Entry]], None], controller: bool = False,
                     applied_offset: int = -1) -> Replica:
        state_file = ReplicaStateFile(self._raft_state_path(plog))
        plog.flush_observer = self.metrics.observe_fsync
        replica = Replica(group, plog, state_file, membership, self.raft_config(), self.transport, self._executor,
                          on_commit, self._on_leader_change, applied_offset=applied_offset if controller else None,
                          persist_commit=controller, name=plog.directory.name, on_failure=self._on_replica_failed,
                          cache=self._recent_entries)
        self._replicas[group] = replica
        return replica

    def _raft_state_path(self, plog: PartitionLog) -> Path:
        """The Raft state file inside the partition directory; one left where older versions kept it moves in."""
        path = plog.directory / filenames.RAFT_STATE_FILE
        legacy = self.data_dir / LEGACY_RAFT_STATE_DIR / f"{plog.directory.name}{LEGACY_RAFT_STATE_SUFFIX}"
        if not path.exists() and legacy.exists():
            legacy.replace(path)
            log.info("%s: moved its Raft state from %s into the partition directory", plog.directory.name, legacy)
        return path

    async def _tick_forever(self) -> None:
        # One timer for every group on this broker, not one per partition; quiet groups cost nothing.
        interval_s = self.config.raft_tick_ms / 1000
        while True:
            await asyncio.sleep(interval_s)
            self._tick_once()

    def _tick_once(self) -> None:
        self.transport.send_many(self.liveness.heartbeats())
        for peer in self.liveness.tick():
            self._on_peer_down(peer)
        is_alive = self.liveness.is_alive
        for replica in list(self._replicas.values()):
            if not replica.quiet and not replica.closed:
                replica.tick()
                replica.maybe_quiesce(is_alive)

    def _on_peer_down(self, peer: int) -> None:
        """A broker went silent: the groups it led must elect, now rather than after another timeout."""
        woken = [r for r in self._replicas.values() if not r.closed and (
            r.leader_id == peer or (r.leader_id is None and r.preferred_leader == peer))]
        log.warning("broker %d silent for %d ticks; %d group(s) it led elect new leaders",
                    peer, self.liveness.timeout_ticks, len(woken))
        for replica in woken:
            replica.wake(fast_forward_ticks=self.config.raft_election_ticks)

    def _on_raft_messages(self, items: list[tuple[str, Message]]) -> None:
        heard = self.liveness.heard_from
        for group, message in items:
            heard(message.from_node)
            replica = self._replicas.get(group)
            if replica is not None and not replica.closed:
                replica.step(message)
            elif self._handovers:
                self._note_leader_elsewhere(group, message)

    def _on_leader_change(self, replica: Replica) -> None:
        self._wake_fetchers()
        if replica.group != CONTROLLER_GROUP:
            self.metrics.record_leader_change(replica.log.topic, replica.log.partition, replica.is_leader)
        if replica.is_leader and replica.group != CONTROLLER_GROUP:
            topic = self.cluster.topics.get(replica.log.topic)
            if topic is not None and topic.raft_group(replica.log.partition) == replica.group:
                self._leader_reports[(replica.log.topic, replica.log.partition)] = (replica.term, topic.topic_id)

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
                     and self.liveness.is_alive(voter)]
        # Asked again every retry round, of the next follower, until a leader of a later term is heard:
        # the first one asked may itself be unable to win (down, or its own disk full).
        self._handovers[replica.group] = Handover(replica.name, replica.term, sorted(node.membership.voters))
        if not followers:
            return
        _, target = max(followers)
        self._send_timeout_now(replica.group, target)

    def _send_timeout_now(self, group: str, target: int) -> None:
        handover = self._handovers[group]
        self.transport.send(group, Message(MessageType.TIMEOUT_NOW, self.node_id, target, handover.term))
        handover.asked += 1
        log.warning("%s: asked broker %d to take over leadership from broker %d, which cannot write (term %d)",
                    handover.name, target, self.node_id, handover.term)

    def _repeat_handovers(self) -> None:
        for group, handover in list(self._handovers.items()):
            live = [v for v in handover.voters if v != self.node_id and self.liveness.is_alive(v)]
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
            if now_s < retry_at_s:
                continue
            topic = self.cluster.topics.get(key[0])
            is_controller = replica.group == CONTROLLER_GROUP
            if not is_controller and (topic is None or topic.raft_group(key[1]) != replica.group):
                del self._failed_replicas[key]  # deleted meanwhile
                continue
            try:
                probe_write(replica.log.directory)
            except OSError as exc:
                log.debug("%s: still cannot write (%s); retrying", replica.name, exc)
                self._failed_replicas[key] = (replica, now_s + FAILED_REPLICA_RETRY_S)
                continue
            del self._failed_replicas[key]
            self._handovers.pop(replica.group, None)
            self._forget_replica(replica)
            if is_controller:
                self._reopen_controller(replica)
                reopened += 1
            elif topic is not None and self._open_partition(topic, key[1], damaged_from=replica.damaged_from):
                log.info("%s: writes succeed again on broker %d; the replica is reopened and catches up from "
                         "the leader", replica.name, self.node_id)
                reopened += 1
        return reopened

    def _reopen_controller(self, failed: Replica) -> None:
        """The metadata is already applied up to where the failed replica got: carry on from there."""
        plog = PartitionLog.open(self.data_dir / CONTROLLER_DIR, LogConfig(), CONTROLLER_GROUP, 0)
        if failed.damaged_from is not None and plog.log_start_offset <= failed.damaged_from < plog.log_end_offset:
            plog.truncate_to(failed.damaged_from)
            log.error("the controller log on broker %d is cut at offset %d, where a damaged batch was found; the "
                      "other brokers send the rest again", self.node_id, failed.damaged_from)
        applied = min(int(failed.node.applied_offset), plog.log_end_offset - 1)
        self.controller = self._add_replica(CONTROLLER_GROUP, plog, Membership.of(self.peers), self._apply_controller,
                                            controller=True, applied_offset=applied)
        self.controller.start()
        log.info("the controller replica on broker %d is reopened and catches up from the leader", self.node_id)

    def _forget_replica(self, replica: Replica) -> None:
        self._replicas.pop(replica.group, None)
        key = (replica.log.topic, replica.log.partition)
        if key[0] == OFFSETS_TOPIC and key[1] in self.group_runtimes \
                and self.group_runtimes[key[1]].replica is replica:
            del self.group_runtimes[key[1]]
        machine = self.share_machines.get(key)
        if machine is not None and machine.replica is replica:
            del self.share_machines[key]
        if self._partitions.get(key) is replica:
            del self._partitions[key]
        with contextlib.suppress(Exception):  # its files may be what failed; reopening recovers them
            replica.close()

    async def _report_leaders_forever(self) -> None:
        """Tell the controller which partitions this broker now leads (batched, retried until it lands)."""
        while True:
            await asyncio.sleep(LEADER_REPORT_INTERVAL_S)
            if not self._leader_reports:
                continue
            try:
                await self._report_leaders()
            except Exception as exc:  # the controller is moving or unreachable: the next round retries
                log.debug("leader report of %d partition(s) failed (%s); retrying", len(self._leader_reports), exc)

    async def _report_leaders(self) -> None:
        assert self.controller is not None
        reports = dict(self._leader_reports)
        leaders = [[t, p, self.node_id, epoch, topic_id] for (t, p), (epoch, topic_id) in reports.items()]
        leader_id = self.controller.leader_id
        if self.controller.is_leader:
            await self._propose_command({"op": "leaders", "leaders": leaders}, LEADER_REPORT_TIMEOUT_S)
        elif leader_id is None or self.send_leader_report is None or not await self.send_leader_report(
                self.peers[leader_id], self.node_id, leaders):
            return
        for key, value in reports.items():  # a newer report made meanwhile stays pending
            if self._leader_reports.get(key) == value:
                del self._leader_reports[key]

    async def accept_leader_report(self, from_node: int, leaders: list[list[Any]]) -> None:
        """On the controller leader: record another broker's leaderships in the metadata log.

        A broker reports only its own leaderships, of partitions placed on it, of the topic ID it holds:
        a report that says otherwise is refused whole, so it can never misdirect clients."""
        assert self.controller is not None
        if not self.controller.is_leader:
            raise errors.NotLeader("this broker does not lead the controller; report to the leader")
        for report in leaders:
            problem = self._leader_report_problem(from_node, report)
            if problem is not None:
                raise errors.InvalidRequest(f"leader report from broker {from_node} refused: {problem}")
        await self._propose_command({"op": "leaders", "leaders": leaders}, LEADER_REPORT_TIMEOUT_S)

    def _leader_report_problem(self, from_node: int, report: list[Any]) -> str | None:
        if from_node not in self.peers:
            return f"broker {from_node} is not a member of this cluster {sorted(self.peers)}"
        topic_name, partition, leader, epoch, topic_id = report
        topic = self.cluster.topics.get(topic_name)
        if topic is None or topic.topic_id != topic_id:
            return f"topic {topic_name!r} with ID {topic_id} does not exist"
        if leader != from_node:
            return f"it names broker {leader} as leader of {topic_name}-{partition}; a broker reports only itself"
        if not 0 <= partition < topic.partitions or from_node not in self.cluster.hosts(topic, partition):
            return f"broker {from_node} holds no replica of {topic_name}-{partition}"
        if not 0 <= epoch <= MAX_EPOCH:
            return f"epoch {epoch} is outside 0..{MAX_EPOCH}"
        return None

    def metadata_loaded(self) -> bool:
        """Whether this broker has loaded the cluster metadata since it started: a controller leader is known
        and every command known to be committed is applied. Until then "no such topic" may mean "not yet"."""
        controller = self.controller
        if self._metadata_loaded or controller is None:
            return self._metadata_loaded
        node = controller.node
        if controller.leader_id is not None and node.applied_offset >= node.commit_offset:
            self._metadata_loaded = True
        return self._metadata_loaded

    def _live_brokers(self) -> list[int]:
        return [node for node in self.peers if self.liveness.is_alive(node)]

    def live_brokers(self) -> list[int]:
        return self._live_brokers()

    def known_leader(self, topic: str, index: int) -> int | None:
        """The partition's leader: from the local replica if there is one, else as reported to the controller."""
        replica = self._partitions.get((topic, index))
        if replica is not None and not replica.closed:
            return replica.leader_id
        reported = self.cluster.leaders.get((topic, index))
        if reported is None or (replica is not None and reported[0] == self.node_id):
            return None  # this broker's own replica failed: it leads nothing, whatever was reported
        if not self.liveness.is_alive(reported[0]):
            return None  # reported before its broker went down: the partition is offline or electing
        return reported[0]

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
        still = [r.group for r in led if r.is_leader]
        if still:
            log.warning("leadership of %s not handed over in time; followers will elect after a timeout", still)
        elif led:
            log.info("handed leadership of %d group(s) to other brokers", len(led))

    async def close(self) -> None:
        self.topic_admin.close()
        for task in (self._ticker, self._reporter):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.transport.stop()
        for replica in list(self._replicas.values()):
            try:
                replica.close()
            except Exception as exc:  # a replica whose disk failed may fail to close too; recovery handles it
                log.warning("%s: not closed cleanly (%s); the next start recovers its log", replica.name, exc)
        self._replicas.clear()
        self._partitions.clear()
        self._executor.shutdown(wait=True)
        log.info("broker %d closed every partition cleanly", self.node_id)

    # ------------------------------------------------------------------------- controller

    def _apply_controller(self, replica: Replica, entries: Sequence[Entry]) -> None:
        for entry in entries:
            if entry.kind is not EntryKind.DATA:
                continue
            try:
                command = decode_command(entry.payload)
            except rec.CorruptBatchError as exc:
                # Damaged on this broker's disk: cut the metadata log here and fetch the rest from the others.
                raise DamagedLogError(CONTROLLER_GROUP, entry.base_offset, str(exc)) from None
            event = self.cluster.apply(command, entry.base_offset)
            if event is None:
                continue
            if event.kind == "created":
                self._start_topic(event.topic)
            elif event.kind == "deleted":
                self._stop_topic(event.topic)
            else:
                self._on_topic_changed(event)
        self._wake_fetchers()

    def _on_topic_changed(self, event: TopicEvent) -> None:
        """A topic changed after its creation: act on this broker's replicas of it."""
        topic = event.topic
        if event.kind == "configs_altered":
            self._reconfigure_topic(topic)
            return
        for index in event.partitions:
            replica = self.hosted_replica(topic.name, index)
            if replica is not None and replica.group != topic.raft_group(index):
                continue  # a replica of an older topic of this name, left to its own delete
            if event.kind == "moved" and self.node_id in event.removed:
                self._drop_moved_replica(topic, index)
            elif replica is None and self.node_id in self.cluster.hosts(topic, index):
                self._open_partition(topic, index)  # a new partition, or a move to this broker
            elif replica is not None:
                replica.preferred_leader = self._preferred_leader(topic, index)

    def _reconfigure_topic(self, topic: TopicMetadata) -> None:
        """New retention, segment size, flush and size limits for every open log of the topic, at once."""
        try:
            config = self._log_config(topic.configs)
        except InvalidConfigError as exc:  # validated before it was proposed; only a broker default can clash
            log.error("topic %s: new configs not applied on broker %d: %s", topic.name, self.node_id, exc)
            return
        for index in range(topic.partitions):
            replica = self.hosted_replica(topic.name, index)
            if replica is not None and replica.group == topic.raft_group(index):
                replica.log.update_config(config)

    def _drop_moved_replica(self, topic: TopicMetadata, index: int) -> None:
        """This broker's replica was moved away and is no longer a member of the group: delete it."""
        replica = self._partitions.pop((topic.name, index), None)
        if replica is not None:
            self._forget_replica(replica)
        directory = self.data_dir / filenames.partition_dir_name(topic.name, index)
        identity = read_identity(directory) if directory.exists() else None
        if identity is not None and identity.topic_id == topic.topic_id:
            shutil.rmtree(directory)
            log.info("%s: replica moved to brokers %s; deleted here", directory.name, topic.assignment[index])

    def _preferred_leader(self, topic: TopicMetadata, index: int) -> int:
        """The first broker of a move's target while it runs (so balancing does not pull leadership back to a
        broker on its way out), else of the assignment."""
        return self.cluster.moves.get((topic.name, index), topic.assignment[index])[0]

    def _start_topic(self, topic: TopicMetadata) -> None:
        for index, replicas in enumerate(topic.assignment):
            if self.node_id in replicas:
                self._open_partition(topic, index)

    def _open_partition(self, topic: TopicMetadata, index: int, damaged_from: int | None = None) -> Replica | None:
        replicas = topic.assignment[index]
        directory = self.data_dir / filenames.partition_dir_name(topic.name, index)
        try:
            if not self._claim_directory(topic, directory):
                return None
            plog = PartitionLog.open(directory, self._log_config(topic.configs), topic.name, index)
            if damaged_from is not None and plog.log_start_offset <= damaged_from < plog.log_end_offset:
                # A damaged batch stopped the replica: what follows it here is lost; the leader resends it.
                plog.truncate_to(damaged_from)
                log.error("%s: cut the log at offset %d, where a damaged batch was found; the other replicas "
                          "send the rest again", directory.name, damaged_from)
            replica = self._add_replica(topic.raft_group(index), plog, Membership.of(replicas),
                                        self._on_partition_commit)
        except Exception:
            # One unreadable partition must not take the broker (and every other partition) down.
            log.exception("%s: cannot open this replica; the partition is unavailable on broker %d until "
                          "the problem above is fixed and the broker restarted", directory.name, self.node_id)
            return None
        self._partitions[(topic.name, index)] = replica
        replica.preferred_leader = self._preferred_leader(topic, index)
        if topic.name == OFFSETS_TOPIC:
            self._attach_group_runtime(replica, index)
        elif not topic.name.startswith("__"):
            machine = ShareStateMachine(replica, directory, topic.name, index, self.share_config)
            replica.attach(machine)
            self.share_machines[(topic.name, index)] = machine
        if replica.term == 0:
            # A new group: its preferred leader campaigns at once and the others stay quiet until it
            # calls (or its broker is found dead), so a thousand new partitions elect without split
            # votes, and leadership spreads as the placement intended. When the preferred broker is
            # already down, the first live one in the placement stands in (nobody would wake the others).
            first_live = next((n for n in replicas if self.liveness.is_alive(n)), self.node_id)
            if first_live == self.node_id:
                replica.campaign_now()
            else:
                replica.quiet = True
        return replica

    def _attach_group_runtime(self, replica: Replica, index: int) -> None:
        runtime = GroupShardRuntime(replica, lambda: GroupCoordinatorShard(self.topic_partition_counts,
                                                                           self.group_config))
        replica.attach(runtime)
        self.group_runtimes[index] = runtime

    def topic_partition_counts(self) -> dict[str, int]:
        return {name: topic.partitions for name, topic in self.cluster.topics.items()}

    async def ensure_offsets_topic(self, timeout_s: float) -> bool:
        """Create __consumer_offsets on first use; True once it exists. Only the controller leader creates it
        (False elsewhere: the caller forwards to the controller leader)."""
        if OFFSETS_TOPIC in self.cluster.topics:
            return True
        assert self.controller is not None
        if not self.controller.is_leader:
            return False
        partitions = self.config.offsets_topic_partitions
        replication_factor = min(3, len(self.peers))
        assignment = place_replicas(list(self.peers), partitions, replication_factor, salt=0)
        await self._propose_command({"op": "create_topic", "name": OFFSETS_TOPIC, "topic_id": new_topic_id(),
                                     "partitions": partitions, "replication_factor": replication_factor,
                                     "configs": {**OFFSETS_TOPIC_CONFIGS,
                                                 "segment.bytes": str(self.config.offsets_segment_bytes)},
                                     "assignment": assignment}, timeout_s)
        await self.wait_for_leaders(OFFSETS_TOPIC, timeout_s)
        log.info("created %s: %d partition(s), replication factor %d", OFFSETS_TOPIC, partitions, replication_factor)
        return OFFSETS_TOPIC in self.cluster.topics

    def _claim_directory(self, topic: TopicMetadata, directory: Path) -> bool:
        """Make directory hold this topic's partition; False when it belongs to a newer topic of the name.

        At start-up the controller re-applies its whole log, so the create of a topic deleted long ago is
        applied again while the directory already holds the partition of a newer topic of that name: that
        directory is not this topic's to open, and the replayed delete that follows will not touch it."""
        identity = read_identity(directory)
        ours = TopicIdentity(topic.topic_id, topic.created_offset)
        if identity is None:
            write_identity(directory, ours)  # a new partition, or one written before topic IDs existed
            return True
        if identity.topic_id == topic.topic_id:
            return True
        if identity.created_offset > topic.created_offset:
            log.debug("%s: holds topic ID %s, newer than the replayed %s; left alone", directory.name,
                      identity.topic_id, topic.topic_id)
            return False
        # Left by an older topic of this name whose delete did not finish (a crash in between): it is garbage.
        log.warning("%s: removing the leftover replica of an older, deleted topic (ID %s) before creating topic "
                    "ID %s", directory.name, identity.topic_id, topic.topic_id)
        shutil.rmtree(directory)
        write_identity(directory, ours)
        return True

    def _stop_topic(self, topic: TopicMetadata) -> None:
        """Close and delete this topic's replicas, and only its own: found by topic ID, not by name."""
        deleted = 0
        for index in range(topic.partitions):
            replica = self._partitions.get((topic.name, index))
            if replica is not None and replica.group == topic.raft_group(index):
                del self._partitions[(topic.name, index)]
                del self._replicas[replica.group]
                replica.close()
                if topic.name == OFFSETS_TOPIC:
                    self.group_runtimes.pop(index, None)
                self.share_machines.pop((topic.name, index), None)
            directory = self.data_dir / filenames.partition_dir_name(topic.name, index)
            identity = read_identity(directory) if directory.exists() else None
            if identity is not None and identity.topic_id == topic.topic_id:
                shutil.rmtree(directory)
                deleted += 1
        if deleted:
            log.info("deleted topic %s (ID %s) and its %d local replica(s)", topic.name, topic.topic_id, deleted)
        self._drop_committed_offsets(topic.name)

    def _drop_committed_offsets(self, name: str) -> None:
        """A deleted topic takes the groups' committed offsets for it along (written by each coordinator)."""
        for runtime in self.group_runtimes.values():
            if runtime.replica.is_leader:
                task = asyncio.get_running_loop().create_task(
                    runtime.run(lambda shard: (None, shard.drop_topic(name))))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _on_partition_commit(self, replica: Replica, entries: Sequence[Entry]) -> None:
        self._wake_fetchers()

    async def controller_leader_address(self, timeout_s: float) -> str | None:
        """Where CreateTopics and DeleteTopics must go; None when this broker is the controller leader.

        Right after start-up no leader may be elected yet; wait for one rather than fail at once."""
        assert self.controller is not None
        deadline = time.monotonic() + timeout_s
        while self.controller.leader_id is None and time.monotonic() < deadline:
            await asyncio.sleep(self.config.raft_tick_ms / 1000)
        if self.controller.is_leader:
            return None
        leader = self.controller.leader_id
        if leader is None:
            raise errors.LeaderNotAvailable(
                f"no controller leader elected within {timeout_s:.0f}s; is a majority of {sorted(self.peers)} up?")
        return self.peers[leader]

    async def wait_for_metadata(self, condition: Callable[[], bool], timeout_s: float) -> None:
        """Wait (bounded) until this broker's copy of the cluster metadata satisfies condition."""
        deadline = time.monotonic() + timeout_s
        while not condition() and time.monotonic() < deadline:
            await asyncio.sleep(self.config.raft_tick_ms / 1000)

    async def wait_for_leaders(self, name: str, timeout_s: float) -> None:
        """After a create: wait until every partition this broker hosts has elected a leader."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            hosted = [r for (topic, _), r in self._partitions.items() if topic == name]
            # A leader is ready once its no-op entry is committed: the high watermark then reaches the log end.
            if all(r.leader_id is not None and (not r.is_leader or r.node.commit_offset >= r.node.log.last_offset)
                   for r in hosted):
                return
            await asyncio.sleep(self.config.raft_tick_ms / 1000)

    async def propose_command(self, command: dict[str, Any], timeout_s: float) -> None:
        """Commit one controller command (on the controller leader)."""
        await self._propose_command(command, timeout_s)

    async def _propose_command(self, command: dict, timeout_s: float) -> None:  # type: ignore[type-arg]
        assert self.controller is not None
        try:
            entries = self.controller.propose([encode_command(command, now_ms())])
        except (NotLeaderError, ProposalDroppedError):
            raise errors.LeaderNotAvailable("the controller leader changed; retry") from None
        try:
            await asyncio.wait_for(self.controller.wait_committed(entries[-1].last_offset), timeout_s)
        except TimeoutError:
            raise errors.RequestTimedOut(
                f"the controller did not commit within {timeout_s:.0f}s; is a majority of brokers up?") from None

    # ---------------------------------------------------------------------------------- topics

    async def create_topic(self, name: str, partitions: int, replication_factor: int,
                           configs: dict[str, str], validate_only: bool = False, timeout_s: float = 30.0) -> None:
        try:
            check_topic_name(name)
        except TopicNameError as exc:
            raise errors.InvalidTopic(str(exc)) from None
        if name in self.cluster.topics:
            raise errors.TopicAlreadyExists(f"topic {name!r} already exists")
        partitions = self.config.default_partitions if partitions == -1 else partitions
        if replication_factor == -1:
            replication_factor = self.config.default_replication_factor or min(3, len(self._live_brokers()))
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise errors.InvalidPartitions(f"partitions must be between 1 and {MAX_PARTITIONS}, got {partitions}")
        if not 1 <= replication_factor <= len(self.peers):
            raise errors.InvalidReplicationFactor(
                f"replication factor {replication_factor} needs that many brokers; this cluster has {len(self.peers)}")
        self.checked_log_config(name, configs)
        if validate_only:
            return
        assignment = place_replicas(list(self.peers), partitions, replication_factor, salt=hash(name) & 0xFFFF)
        topic_id = new_topic_id()
        await self._propose_command({"op": "create_topic", "name": name, "topic_id": topic_id,
                                     "partitions": partitions, "replication_factor": replication_factor,
                                     "configs": dict(configs), "assignment": assignment}, timeout_s)
        created = self.cluster.topics.get(name)
        if created is None or created.topic_id != topic_id:
            # Another request created (and maybe deleted) this name first; its partition count won, not ours.
            raise errors.TopicAlreadyExists(
                f"topic {name!r} was created by a concurrent request"
                + (f" with {created.partitions} partition(s)" if created is not None else " and deleted since"))
        await self.wait_for_leaders(name, timeout_s)
        log.info("created topic %s (ID %s): %d partition(s), replication factor %d", name, topic_id, partitions,
                 replication_factor)

    async def delete_topic(self, name: str, timeout_s: float = 30.0) -> None:
        topic = self._require_topic(name)
        await self._propose_command({"op": "delete_topic", "name": name, "topic_id": topic.topic_id}, timeout_s)

    def topics(self) -> list[TopicMetadata]:
        return sorted(self.cluster.topics.values(), key=lambda t: t.name)

    def topic(self, name: str) -> TopicMetadata:
        return self._require_topic(name)

    def checked_log_config(self, name: str, configs: dict[str, str]) -> LogConfig:
        """The log config a topic's overrides make, or InvalidConfig naming the bad key or value (for create
        and alter alike)."""
        try:
            log_config = self._log_config(configs)
        except InvalidConfigError as exc:
            raise errors.InvalidConfig(f"topic {name!r}: {exc}") from None
        if log_config.compacted:
            # Compaction leaves offset gaps, and Raft ships a partition's log as contiguous entries; until the
            # replication path can carry compacted ranges, refuse rather than accept a setting that is not run.
            raise errors.InvalidConfig(
                f"topic {name!r}: cleanup.policy=compact is not supported for replicated topics yet; "
                "use cleanup.policy=delete with retention.ms / retention.bytes")
        return log_config

    def hosted_replica(self, topic: str, index: int) -> Replica | None:
        """This broker's replica of the partition, if it holds one (no check that the topic exists)."""
        return self._partitions.get((topic, index))

    def effective_configs(self, name: str) -> dict[str, str]:
        return self._log_config(self._require_topic(name).configs).to_mapping()

    def _log_config(self, overrides: dict[str, str]) -> LogConfig:
        return LogConfig.from_mapping({**self._log_defaults.to_mapping(), **overrides})

    def _require_topic(self, name: str) -> TopicMetadata:
        topic = self.cluster.topics.get(name)
        if topic is None:
            raise errors.UnknownTopicOrPartition(
                f"topic {name!r} does not exist; create it with `lb topic create {name} --partitions N`")
        return topic

    def replica(self, topic: str, index: int) -> Replica | None:
        """The local replica, or None if this broker holds none (UnknownTopicOrPartition if none exists)."""
        spec = self._require_topic(topic)
        if not 0 <= index < spec.partitions:
            raise errors.UnknownTopicOrPartition(
                f"topic {topic!r} has partitions 0..{spec.partitions - 1}; partition {index} does not exist")
        return self._partitions.get((topic, index))

    def local_partitions(self) -> list[tuple[tuple[str, int], Replica]]:
        """Every partition replica this broker holds now, with its (topic, partition)."""
        return list(self._partitions.items())

    def local_replica(self, topic: str, index: int) -> Replica | None:
        """This broker's replica of the partition, if it holds one (no error for an unknown topic)."""
        return self._partitions.get((topic, index))

    def leader_replica(self, topic: str, index: int) -> Replica:
        replica = self.replica(topic, index)
        if replica is not None and replica.is_leader and not replica.closed:
            return replica
        if replica is not None and replica.failure is not None:
            if len(replica.node.membership.voters) == 1:
                raise errors.StorageFailure(
                    f"{replica.name}: broker {self.node_id} cannot write this partition's only replica "
                    f"({replica.failure}); free space or fix the disk under {replica.log.directory}: the broker "
                    f"reopens it by itself once a write succeeds")
            hint = self.known_leader(topic, index)
            raise errors.NotLeader(
                f"{replica.name}: broker {self.node_id} cannot write its replica ({replica.failure}); "
                + (f"broker {hint} leads now" if hint is not None else "another replica takes over; retry"),
                leader_id=hint if hint is not None else -1,
                leader_address=self.peers.get(hint, "") if hint is not None else "")
        if replica is None:  # no local replica: the reported leader, else a replica that knows it
            hint = self.known_leader(topic, index) or self.cluster.topics[topic].assignment[index][0]
            raise errors.NotLeader(f"{topic}-{index}: broker {self.node_id} holds no replica; ask broker {hint}",
                                   leader_id=hint, leader_address=self.peers.get(hint, ""))
        leader = replica.leader_id
        address = self.peers.get(leader, "") if leader is not None else ""
        if leader is None or not address:
            # Either an election is under way or a majority of the replicas is unreachable; both clear
            # up only when enough replicas talk to each other again.
            raise errors.NotEnoughReplicas(
                f"{topic}-{index}: no leader: a majority of replicas {sorted(replica.node.membership.voters)} "
                "must be up and connected to elect one; retrying clients succeed once it is")
        raise errors.NotLeader(f"{topic}-{index}: broker {self.node_id} is not the leader; broker {leader} at "
                               f"{address} is", leader_id=leader, leader_address=address)

    # --------------------------------------------------------------------------------- produce

    async def produce(self, topic: str, index: int, records: bytes, acks: int, timeout_s: float) -> ProduceResult:
        if topic.startswith("__"):
            raise errors.InvalidTopic(f"topic {topic!r} is internal: only the broker writes to it")
        replica = self.leader_replica(topic, index)
        self.disk_guard.check(topic, index)
        payloads = self._validated(replica, records)
        del records  # the batches are copied out: an acks=all wait must not keep the request's bytes too
        base_offsets, last_offset = self._propose_new_batches(replica, payloads)
        self.metrics.record_produced(topic, index, payloads)
        if acks != 0:
            waiter = replica.wait_committed(last_offset) if acks == -1 else replica.wait_durable(last_offset)
            await self._await_write(replica, waiter, acks, timeout_s)
        return ProduceResult(base_offsets[0], now_ms(), replica.log.log_start_offset, base_offsets)

    @staticmethod
    def _propose_new_batches(replica: Replica, payloads: list[tuple[bytes, int]]) -> tuple[list[int], int]:
        """Propose the batches not stored yet; return every batch's base offset and the last offset to await.

        Every batch is checked against the producer-state table first (producer_state.py), and nothing is
        proposed if one is refused. A batch an idempotent producer retries after a lost answer is answered
        with its first copy's offset."""
        identities = [BatchIdentity(*rec.producer_fields(payload)) for payload, _ in payloads]
        verdicts = replica.producers.check_request(identities)
        for identity, verdict in zip(identities, verdicts, strict=True):
            _refuse_if_refused(replica.name, identity, verdict)
        fresh = [payload for payload, verdict in zip(payloads, verdicts, strict=True) if verdict.duplicate_of is None]
        try:
            entries = iter(replica.propose(fresh)) if fresh else iter(())
        except (NotLeaderError, ProposalDroppedError):
            raise errors.NotLeader(f"{replica.name}: leadership is moving; retry", leader_id=-1) from None
        base_offsets = []
        last_offset = -1
        for verdict in verdicts:
            stored = verdict.duplicate_of
            if stored is None:
                entry = next(entries)
                base_offsets.append(entry.base_offset)
                last_offset = max(last_offset, entry.last_offset)
            else:
                base_offsets.append(stored.base_offset)
                last_offset = max(last_offset, stored.last_offset)
        return base_offsets, last_offset

    @staticmethod
    async def _await_write(replica: Replica, waiter: asyncio.Future[None], acks: int, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            if acks == -1:
                raise errors.NotEnoughReplicas(
                    f"{replica.name}: not committed by a majority of {sorted(replica.node.membership.voters)} "
                    f"within {timeout_s:.1f}s; the write may still commit later") from None
            raise errors.RequestTimedOut(f"{replica.name}: write not durable within {timeout_s:.1f}s") from None
        except NotLeaderNow as exc:
            raise errors.NotLeader(str(exc), leader_id=exc.leader_id or -1) from None
        except ReplicaFailedError as exc:
            if len(replica.node.membership.voters) > 1:  # nothing unwritten was sent: a retry elsewhere is safe
                raise errors.NotLeader(f"{exc}; leadership moves to another replica, retry", leader_id=-1) from None
            raise errors.StorageFailure(f"{replica.name}: write failed: {exc.cause}") from None
        except (StorageError, OSError) as exc:
            raise errors.StorageFailure(f"{replica.name}: write failed: {exc}") from None
        except RuntimeError as exc:
            raise errors.StorageFailure(str(exc)) from None

    def _validated(self, replica: Replica, records: bytes) -> list[tuple[bytes, int]]:
        """Check every batch: header and CRC, then its records agree with the header (validate_records walks
        them: the broker's only per-record work). Nothing is proposed if any batch fails."""
        if not records:
            raise errors.CorruptBatch(f"{replica.name}: the request carries no record batch")
        limit = replica.log.config.max_message_bytes
        payloads = []
        pos = 0
        end = len(records)
        view = memoryview(records)
        while pos < end:
            try:
                header = rec.validate_batch(records, pos, end)
            except rec.CorruptBatchError as exc:
                raise errors.CorruptBatch(
                    f"{replica.name}: batch at byte {pos} of the request rejected: {exc}; nothing was written"
                ) from None
            if header.size > limit:
                raise errors.RecordTooLarge(
                    f"{replica.name}: batch of {header.size} bytes exceeds max.message.bytes={limit}; "
                    "send smaller batches or raise the topic's max.message.bytes")
            if header.attributes & rec.CONTROL_FLAG:
                raise errors.CorruptBatch(f"{replica.name}: clients may not write control batches")
            codec = header.attributes & rec.COMPRESSION_MASK
            if codec not in rec.SUPPORTED_CODECS:
                raise errors.CorruptBatch(f"{replica.name}: compression codec {codec} is not supported; use none "
                                          "(0), gzip (1), snappy (2), lz4 (3) or zstd (4)")
            try:  # a batch whose records contradict its header would break every consumer of the partition
                rec.validate_records(records, pos, header)
            except rec.CorruptBatchError as exc:
                raise errors.CorruptBatch(
                    f"{replica.name}: batch at byte {pos} of the request rejected: {exc}; nothing was written"
                ) from None
            payloads.append((bytes(view[pos:pos + header.size]) if pos or header.size != end else records,
                             header.records_count))
            pos += header.size
        return payloads

    # ----------------------------------------------------------------------------------- fetch

    def _wake_fetchers(self) -> None:
        self._data_arrived.set()
        self._data_arrived = asyncio.Event()

    def read(self, topic: str, index: int, offset: int, max_bytes: int) -> FetchResult:
        replica = self.leader_replica(topic, index)
        hw = replica.high_watermark
        start = replica.log.log_start_offset
        end = replica.log.log_end_offset
        # Past the high watermark but within the log: a new leader whose high watermark has not caught up
        # yet (it does once its first entry commits). Kafka answers such a fetch with nothing rather than an
        # error, which would send a consumer back to its reset policy and re-read the partition.
        if offset > max(hw, end) or offset < start:
            raise errors.OffsetOutOfRange(
                f"{replica.name}: offset {offset} is out of range; valid offsets are {start}..{hw} "
                "(log start..high watermark); seek to an offset in that range")
        try:
            data = b"" if offset >= hw else replica.log.read(offset, max_bytes, max_offset=hw)
        except OffsetOutOfRangeError as exc:
            raise errors.OffsetOutOfRange(str(exc)) from None
        return FetchResult(data, hw, start)

    async def wait_for_data(self, timeout_s: float) -> None:
        """Sleep until any partition's high watermark or leadership moves, or the timeout passes."""
        event = self._data_arrived
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    # ---------------------------------------------------------------------------- list offsets

    def list_offset(self, topic: str, index: int, timestamp_ms: int) -> tuple[int, int]:
        """(offset, timestamp) for earliest (-2), latest (-1) or the first record at or after a time."""
        replica = self.leader_replica(topic, index)
        if timestamp_ms == EARLIEST_TIMESTAMP:
            return replica.log.log_start_offset, -1
        if timestamp_ms == LATEST_TIMESTAMP:
            return replica.high_watermark, -1
        if timestamp_ms < 0:
            raise errors.InvalidRequest(f"timestamp {timestamp_ms} is neither -1 (latest), -2 (earliest) nor >= 0")
        batch_offset = replica.log.offset_for_timestamp(timestamp_ms)
        if batch_offset is None or batch_offset >= replica.high_watermark:
            return -1, -1
        return self._first_record_at_or_after(replica, batch_offset, timestamp_ms)

    @staticmethod
    def _first_record_at_or_after(replica: Replica, batch_offset: int, timestamp_ms: int) -> tuple[int, int]:
        # The time index finds the first batch whose maxTimestamp reaches the target; decoding the batches
        # from there (off the hot path) finds the exact record, as Kafka does.
        offset = batch_offset
        while offset < replica.high_watermark:
            data = replica.log.read(offset, 64 * 1024, max_offset=replica.high_watermark)
            if not data:
                break
            for pos, header in rec.iter_batch_headers(data):
                offset = header.base_offset + header.last_offset_delta + 1
                if header.is_control or header.max_timestamp < timestamp_ms:
                    continue
                for record in rec.decode_records(data, pos, header):
                    if record.offset >= batch_offset and record.timestamp >= timestamp_ms:
                        return record.offset, record.timestamp
        return -1, -1

    # ------------------------------------------------------------------------------- describe

    def in_sync_replicas(self, replica: Replica | None, assignment: list[int]) -> list[int]:
        """The leader's view: live replicas whose log reaches the high watermark; others see the assignment.

        A follower's match offset is what it last acknowledged; one that lost its data since (a wiped or
        truncated disk) says so in its next answer, which moves its match back (see RaftNode), and one that
        is down is not in sync however far it had got."""
        if replica is None or not replica.is_leader:
            return list(assignment)
        caught_up = [self.node_id]
        for node in assignment:
            progress = replica.node.progress(node) if node != self.node_id else None
            if (progress is not None and progress.match_offset >= replica.high_watermark - 1
                    and self.liveness.is_alive(node)):
                caught_up.append(node)
        return sorted(caught_up)

    # ---------------------------------------------------------------------------- maintenance

    async def run_maintenance(self) -> None:
        """Interval flushes, leader balancing and retention, forever (cancelled at shutdown)."""
        loop = asyncio.get_running_loop()
        next_balance = loop.time() + self.config.leader_balance_interval_ms / 1000
        next_retention = loop.time() + self.config.retention_check_interval_ms / 1000
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL_S)
            await self.flush_interval_partitions(loop.time())
            self.retry_failed_replicas(time.monotonic())
            self.tick_group_coordinators()
            self.topic_admin.drive_moves()
            if loop.time() >= next_balance:
                next_balance = loop.time() + self.config.leader_balance_interval_ms / 1000
                self.balance_leaders()
            if loop.time() >= next_retention:
                next_retention = loop.time() + self.config.retention_check_interval_ms / 1000
                self.apply_retention()

    def tick_group_coordinators(self) -> None:
        """Session and rebalance timeouts, snapshots and log cuts of every local coordinator partition; lock
        expiry, dead letters and snapshots of every share-group partition this broker leads."""
        for runtime in list(self.group_runtimes.values()):
            runtime.schedule_tick()
        for key, machine in list(self.share_machines.items()):
            running = self._share_ticks.get(key)
            if machine.groups and machine.replica.is_leader and (running is None or running.done()):
                self._share_ticks[key] = asyncio.get_running_loop().create_task(self._tick_share(key, machine))

    async def _tick_share(self, key: tuple[str, int], machine: ShareStateMachine) -> None:
        try:
            await machine.tick(lambda group, partition, items: self._dead_letter(key[0], group, partition, items))
        except Exception as exc:  # leadership moving, the dead-letter topic unavailable: the next round retries
            log.debug("%s-%d: share maintenance skipped: %s", key[0], key[1], exc)

    # ------------------------------------------------------------------------------ share groups

    def share_config(self, group_id: str) -> ShareConfig:
        try:
            return share_config_from(self.cluster.group_configs.get(group_id, {}))
        except InvalidShareConfig:
            return ShareConfig()  # validated before it was proposed; a newer version's key: use defaults

    def share_machine(self, topic: str, index: int) -> ShareStateMachine:
        if topic.startswith("__"):
            raise errors.InvalidTopic(f"topic {topic!r} is internal; share groups read user topics")
        replica = self.leader_replica(topic, index)
        machine = self.share_machines.get((topic, index))
        if machine is None or machine.replica is not replica:
            raise errors.NotLeader(f"{topic}-{index}: share state is not loaded here; retry", leader_id=-1)
        return machine

    async def alter_group_configs(self, group_id: str, configs: dict[str, str], timeout_s: float) -> None:
        merged = {**self.cluster.group_configs.get(group_id, {}), **configs}
        try:
            share_config_from({k: v for k, v in merged.items() if v != ""})
        except InvalidShareConfig as exc:
            raise errors.InvalidRequest(f"group {group_id!r}: {exc}") from None
        await self._propose_command({"op": "group_configs", "group": group_id, "configs": dict(configs)}, timeout_s)

    async def _dead_letter(self, topic: str, group_id: str, partition: int,
                           items: list[tuple[int, RecordState, rec.Record]]) -> None:
        """Append records to the group's dead-letter topic (created on demand) with headers saying where
        they came from. Each batch carries a producer id fixed for (group, source partition) and the source
        offset as sequence, so a copy retried after a failover is recognised and stored once."""
        config = self.share_config(group_id)
        dlq = config.dlq_topic or f"{topic}.dlq"
        if dlq not in self.cluster.topics:
            await self.ensure_topic(dlq, self.cluster.topics[topic].partitions)
        target = partition % self.cluster.topics[dlq].partitions
        producer_id = dead_letter_producer_id(group_id, topic, partition)
        for offset, state, record in items:
            builder = rec.BatchBuilder()
            builder.append(record.timestamp, record.key, record.value, [
                *record.headers, ("lb.dlq.topic", topic.encode()), ("lb.dlq.partition", str(partition).encode()),
                ("lb.dlq.offset", str(offset).encode()), ("lb.dlq.delivery.count", str(state.count).encode()),
                ("lb.dlq.group", group_id.encode()), ("lb.dlq.reason", state.reason.encode())])
            batch = builder.build(producer_id=producer_id, producer_epoch=0, base_sequence=state.dlq_seq & 0x7FFFFFFF)
            # DuplicateSequence: written before a failover, and older than the partition remembers: it is there.
            with contextlib.suppress(errors.DuplicateSequence):
                await self._produce_anywhere(dlq, target, batch)

    async def ensure_topic(self, name: str, partitions: int, timeout_s: float = 30.0) -> None:
        """Create a topic the broker itself needs (a dead-letter topic) unless it exists: on the controller
        leader directly, elsewhere through it."""
        if name in self.cluster.topics:
            return
        assert self.controller is not None
        if self.controller.is_leader:
            with contextlib.suppress(errors.TopicAlreadyExists):
                await self.create_topic(name, partitions, -1, {}, timeout_s=timeout_s)
            return
        address = await self.controller_leader_address(timeout_s)
        if address is None or self.topic_creator is None:
            raise errors.LeaderNotAvailable(f"no controller leader to create topic {name!r}; retrying")
        await self.topic_creator(address, name, partitions)
        await self.wait_for_metadata(lambda: name in self.cluster.topics, timeout_s)

    async def _produce_anywhere(self, topic: str, index: int, batch: bytes) -> None:
        replica = self.replica(topic, index)
        if replica is not None and replica.is_leader:
            await self._produce_internal(topic, index, batch)
            return
        if self.dead_letter_sender is None:
            raise errors.LeaderNotAvailable(f"{topic}-{index} is led elsewhere and no sender is set")
        leader = self.known_leader(topic, index)
        if leader is None or leader not in self.peers:
            raise errors.LeaderNotAvailable(f"{topic}-{index} has no leader now; the dead letter is retried")
        await self.dead_letter_sender(self.peers[leader], (topic, index), batch)

    async def _produce_internal(self, topic: str, index: int, batch: bytes) -> None:
        replica = self.leader_replica(topic, index)
        payloads = self._validated(replica, batch)
        _, last_offset = self._propose_new_batches(replica, payloads)
        self.metrics.record_produced(topic, index, payloads)
        await self._await_write(replica, replica.wait_committed(last_offset), -1, 30.0)

    async def flush_interval_partitions(self, now_s: float) -> None:
        """fsync the logs of flush="interval" topics whose flush.interval.ms has passed (in the thread pool)."""
        loop = asyncio.get_running_loop()
        for replica in list(self._partitions.values()):
            config = replica.log.config
            if config.flush == "always" or replica.closed:
                continue
            if now_s - self._last_flush_s.setdefault(replica.group, now_s) >= config.flush_interval_ms / 1000:
                self._last_flush_s[replica.group] = now_s
                await loop.run_in_executor(self._executor, replica.log.flush)

    def balance_leaders(self) -> int:
        """Hand groups this broker leads back to their preferred leader (the first replica placed), when
        that broker is alive and caught up, so leadership stays spread as placement intended after
        failovers and restarts. Returns the number of transfers started."""
        started = 0
        for replica in list(self._partitions.values()):
            if started >= MAX_LEADER_TRANSFERS_PER_ROUND:
                break
            preferred = replica.preferred_leader
            if (not replica.is_leader or preferred is None or preferred == self.node_id
                    or not self.liveness.is_alive(preferred)):
                continue
            progress = replica.node.progress(preferred)
            if progress is None or progress.match_offset < replica.node.log.last_offset:
                continue
            with contextlib.suppress(Exception):
                replica.transfer_leadership(preferred)
                started += 1
        if started:
            log.info("moving leadership of %d group(s) back to their preferred brokers", started)
        return started

    def apply_retention(self) -> int:
        """Delete expired segments: never at or past the high watermark, nor past the oldest share-group
        snapshot a rebuild needs; the term before the new log start is saved first (Raft asks for it)."""
        deleted = 0
        for replica in list(self._partitions.values()):
            if replica.closed:
                continue
            bound = replica.high_watermark
            share = self.share_machines.get((replica.log.topic, replica.log.partition))
            kept = share.retain_from() if share is not None else None
            if kept is not None:
                bound = min(bound, kept)
            cut = replica.log.retention_cut_point(now_ms(), max_offset=bound)
            count = replica.truncate_prefix(cut) if cut > replica.log.log_start_offset else 0
            if count:
                log.info("%s: retention deleted %d segment(s); log now starts at offset %d",
                         replica.name, count, replica.log.log_start_offset)
            deleted += count
        return deleted


def _refuse_if_refused(partition: str, batch: BatchIdentity, verdict: SequenceVerdict) -> None:
    """Raise the error a refused batch is answered with (nothing of the request is written)."""
    outcome = verdict.outcome
    if outcome is Outcome.FENCED_EPOCH:
        raise errors.InvalidProducerEpoch(
            f"{partition}: producer {batch.producer_id} sent epoch {batch.epoch}, but epoch {verdict.known_epoch} "
            "already wrote here: a newer instance of this producer took over; nothing was written. Close this "
            "producer")
    if outcome is Outcome.OUT_OF_ORDER:
        raise errors.OutOfOrderSequence(
            f"{partition}: producer {batch.producer_id} epoch {batch.epoch} sent sequence {batch.base_sequence}, "
            f"expected {verdict.expected_sequence}: an earlier batch is missing; nothing was written. The "
            "producer resends in order once the earlier batch is stored")
    if outcome is Outcome.STORED_LONG_AGO:
        raise errors.DuplicateSequence(
            f"{partition}: producer {batch.producer_id} retried sequence {batch.base_sequence}, stored too long "
            f"ago to find its offset; it is not written again {errors.ALREADY_STORED_MARKER}")
