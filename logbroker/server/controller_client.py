"""This broker's side of the controller: the metadata Raft group, its commands, and what they make it do.

The controller is one more Raft group over every broker in --peers; its log holds JSON commands (topic
creates and deletes with replica placement, config changes, leader reports) and every broker applies them,
so any broker answers metadata. Applying a create opens this broker's replicas of the topic (through the
replica manager); a delete closes and removes them. Only the controller leader proposes commands: the
front-ends forward topic changes to it (forwarding.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from logbroker_client import records as rec

from logbroker.cluster.metadata import (
    CONTROLLER_GROUP,
    MAX_EPOCH,
    TopicEvent,
    TopicMetadata,
    decode_command,
    encode_command,
    new_topic_id,
    place_new_topic,
    place_replicas,
)
from logbroker.cluster.raft_storage import DamagedLogError
from logbroker.cluster.replica import Replica, now_ms
from logbroker.cluster.tasks import cancel_and_wait
from logbroker.cluster.topic_names import MAX_PARTITIONS, TopicNameError, check_topic_name
from logbroker.groups.coordinator import OFFSETS_TOPIC
from logbroker.raft.errors import NotLeaderError, ProposalDroppedError
from logbroker.raft.membership import Membership
from logbroker.raft.quorum import has_quorum
from logbroker.raft.types import Entry, EntryKind
from logbroker.server import errors
from logbroker.server.disk_identity import METADATA_CATCH_UP_FILE, is_disk_id, mark_metadata_catch_up
from logbroker.storage.config import InvalidConfigError, LogConfig
from logbroker.storage.files import fsync_dir
from logbroker.storage.log import PartitionLog

if TYPE_CHECKING:
    from logbroker.server.broker import Broker

log = logging.getLogger("logbroker.broker")

CONTROLLER_DIR = "__controller-0"
LEADER_REPORT_INTERVAL_S = 0.2
# A topic of up to this many replicas here opens at once, on the event loop; a bigger one this many per trip to
# the opening threads.
OPEN_PARTITIONS_AT_ONCE = 32
OPEN_PARTITIONS_PER_TURN = 64
MAX_FLUSH_BACKLOG_TO_OPEN = 32  # jobs queued for the flush pool above which opening more replicas waits
MAX_GROUPS_ELECTING = 128  # new groups here without a leader above which opening more replicas waits
MAX_OPEN_WAIT_S = 5.0  # ...but no longer than this per chunk
LEADER_REPORT_TIMEOUT_S = 5.0
# How often a broker whose disk is not yet registered asks the controller leader to register it, and how long it
# then waits for the registration to reach its own replica of the metadata log (a long replay) before asking again.
DISK_REGISTRATION_RETRY_S = 0.2
DISK_REGISTRATION_APPLY_WAIT_S = 30.0
# __consumer_offsets: kept forever (snapshots bound it), in small segments (offsets_segment_bytes) so that
# the segments below a snapshot can be deleted soon.
OFFSETS_TOPIC_CONFIGS = {"retention.ms": "-1", "flush": "always"}


class ControllerClient:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.node_id = broker.node_id
        self._log_defaults = LogConfig.from_mapping(broker.config.log_defaults)
        # (topic, partition) -> (epoch, topic id) of leaderships won here and not yet in the controller log
        self._leader_reports: dict[tuple[str, int], tuple[int, str]] = {}
        self._reporter: asyncio.Task[None] | None = None
        self._disk_registration: asyncio.Task[None] | None = None
        self._metadata_loaded = False  # see metadata_loaded()
        self._opening: set[asyncio.Task[None]] = set()  # big topics' replicas being opened (_open_in_turns)
        self._opening_lock = asyncio.Lock()
        self._metadata_catch_up = False  # this broker's metadata log waits to catch up (a new disk)

    # ------------------------------------------------------------------------------- lifecycle

    def open(self) -> None:
        """Open the controller log; its committed commands re-create every local replica as they apply."""
        plog = PartitionLog.open(self.broker.data_dir / CONTROLLER_DIR, LogConfig(), CONTROLLER_GROUP, 0)
        replicas = self.broker.replicas
        if replicas.state_log_lost_below is not None:
            replicas.state_log_lost_below = plog.log_end_offset
            log.warning("broker %d: its Raft state log is gone (deleted?) while its metadata log is not: the replicas "
                        "of the %d metadata entries' topics that hold nothing wait to catch up before they vote",
                        self.node_id, plog.log_end_offset)
        voters = Membership.of(self.broker.peers)
        controller = self.broker.replicas.add_replica(CONTROLLER_GROUP, plog, voters, self._apply, controller=True)
        self.broker.controller = controller
        self._wait_to_catch_up_if_disk_is_new(controller)
        controller.start()  # re-applies the committed prefix of the metadata log before any election

    # ------------------------------------------------------------------ a new disk's metadata log

    def _wait_to_catch_up_if_disk_is_new(self, controller: Replica) -> None:
        """A new disk holding no metadata log is a new cluster's, or a replaced disk of a broker that voted in the
        metadata log before: it must not vote until it knows which (disk_identity.py, METADATA_CATCH_UP_FILE).
        A metadata log deleted while the broker's Raft state stayed (Replica.lost_its_log) waits too: its saved
        term says it voted, so only a leader's log ends its wait, never the new-cluster rule."""
        marker = self.broker.data_dir / METADATA_CATCH_UP_FILE
        # The wait is also in the log's saved Raft state (HardState.catching_up), which may outlive the file:
        # the file goes as the wait ends, and a crash can come before the state saying so is written. Such a
        # broker waits again, and this rule ends it (a new cluster whose brokers all restarted at that moment
        # would otherwise wait for ever).
        lost_on_a_known_disk = False
        if not marker.exists() and not controller.node.catching_up:
            # A known disk holding no metadata log and no Raft state for it lost both (the directory and the state
            # log deleted): it waits as a replaced disk does, or it could vote a leader lacking what it held.
            if not controller.holds_no_log:
                return
            lost_on_a_known_disk = not self.broker.disk_is_new
            mark_metadata_catch_up(self.broker.data_dir)
        controller.node.wait_to_catch_up()
        self._metadata_catch_up = True
        if controller.lost_its_log or lost_on_a_known_disk:
            log.warning("broker %d: its metadata log (%s) is gone or cut short%s: it takes no part in metadata "
                        "elections until it has caught up from the controller leader", self.node_id,
                        self.broker.data_dir / CONTROLLER_DIR,
                        f" but its Raft state (term {controller.term}) is not" if controller.lost_its_log
                        else " from a disk the cluster knows")
            return
        log.info("broker %d: new disk without a metadata log: it votes in the metadata log once it has caught up "
                 "from a leader, or once a majority of the brokers hold no metadata either (a new cluster)",
                 self.node_id)

    def end_metadata_catch_up(self, peer_metadata_terms: dict[int, int]) -> None:
        """Each tick while this broker's metadata log waits to catch up (cheap otherwise). A majority of the voters
        (this one included) saying they hold no metadata log (term 0 in their liveness heartbeats), and none saying
        otherwise, is a cluster starting for the first time: nobody acknowledged anything, so this empty log may
        vote. Once caught up (the node's own rule) and durable up to the commit offset, the marker goes."""
        if not self._metadata_catch_up:
            return
        controller = self._controller()
        node = controller.node
        if node.catching_up:
            if not controller.holds_nothing or any(peer_metadata_terms.values()):
                return
            fresh = {self.node_id, *peer_metadata_terms}
            if not has_quorum(node.membership.voters, fresh.__contains__):
                return
            node.stop_waiting_to_catch_up()
            self._end_metadata_catch_up()
            log.info("broker %d: brokers %s hold no metadata log either: a new cluster, whose first controller "
                     "leader they now elect", self.node_id, sorted(fresh))
            return
        if controller.durable_offset - 1 >= node.commit_offset:  # what it caught up is on its disk
            self._end_metadata_catch_up()
            log.info("broker %d: its metadata log has caught up and takes part in elections", self.node_id)

    def _end_metadata_catch_up(self) -> None:
        (self.broker.data_dir / METADATA_CATCH_UP_FILE).unlink(missing_ok=True)
        fsync_dir(self.broker.data_dir)  # once per disk: a moment of the event loop
        self._metadata_catch_up = False

    def start_reporting(self) -> None:
        loop = asyncio.get_running_loop()
        self._reporter = loop.create_task(self._report_leaders_forever())
        self._disk_registration = loop.create_task(self._register_disk())

    async def stop_reporting(self) -> None:
        for task in list(self._opening):  # shutting down: open no more replicas
            task.cancel()
        for running in (self._reporter, self._disk_registration):
            if running is not None:
                await cancel_and_wait(running)

    # -------------------------------------------------------------------------------- this broker's disk

    @property
    def disk_registered_at(self) -> int | None:
        """The metadata offset of this disk's registration, if the metadata applied here names this broker's disk:
        a partition created before it is older than the disk, one created after it is new (disk_identity.py)."""
        return self.broker.cluster.disk_registrations.get((self.node_id, self.broker.disk_id))

    @property
    def disk_registered(self) -> bool:
        return self.disk_registered_at is not None

    def _note_disk_registration(self, command: dict[str, Any]) -> None:
        """Applied: a disk registration. Another disk registered under this node id after this broker's own is
        what only a second broker started with the same id (or a forged report) makes: said once per such disk
        (those before this disk's own registration are the disks this node id had before)."""
        if command["node"] == self.node_id and command["disk_id"] != self.broker.disk_id and self.disk_registered:
            log.warning("broker %d: the cluster metadata names another disk (ID %s) for node id %d besides this one "
                        "(%s in %s): is another broker running with this node id? Each broker needs an id of its own",
                        self.node_id, command["disk_id"], self.node_id, self.broker.disk_id, self.broker.data_dir)

    async def _register_disk(self) -> None:
        """Register this broker's disk in the metadata log unless the log applied here already has it: once for the
        life of a data directory, when the broker first starts on it."""
        loop = asyncio.get_running_loop()
        tick_s = self.broker.config.raft_tick_ms / 1000
        while not self.disk_registered:
            sent = False
            try:
                sent = await self._send_disk_registration()
            except Exception as exc:  # the controller is moving or unreachable: try again
                log.debug("registering disk %s of broker %d failed (%s); retrying", self.broker.disk_id,
                          self.node_id, exc)
            if sent:
                log.info("broker %d: registered its disk (ID %s, %s) in the cluster metadata", self.node_id,
                         self.broker.disk_id, self.broker.data_dir)
            deadline = loop.time() + (DISK_REGISTRATION_APPLY_WAIT_S if sent else DISK_REGISTRATION_RETRY_S)
            while not self.disk_registered and loop.time() < deadline:
                await asyncio.sleep(tick_s)

    async def _send_disk_registration(self) -> bool:
        controller = self._controller()
        if controller.is_leader:
            await self.propose_command(self._disk_command(self.node_id, self.broker.disk_id), LEADER_REPORT_TIMEOUT_S)
            return True
        leader_id, send = controller.leader_id, self.broker.send_leader_report
        if leader_id is None or send is None:
            return False
        return await send(self.broker.peers[leader_id], self.node_id, [], disk_id=self.broker.disk_id)

    @staticmethod
    def _disk_command(node_id: int, disk_id: str) -> dict[str, Any]:
        return {"op": "broker_disk", "node": node_id, "disk_id": disk_id}

    def reopen(self, failed: Replica) -> None:
        """The metadata is already applied up to where the failed replica got: carry on from there."""
        plog = PartitionLog.open(self.broker.data_dir / CONTROLLER_DIR, LogConfig(), CONTROLLER_GROUP, 0)
        if failed.damaged_from is not None and plog.log_start_offset <= failed.damaged_from < plog.log_end_offset:
            plog.truncate_to(failed.damaged_from)
            log.error("the controller log on broker %d is cut at offset %d, where a damaged batch was found; the "
                      "other brokers send the rest again", self.node_id, failed.damaged_from)
        applied = min(int(failed.node.applied_offset), plog.log_end_offset - 1)
        controller = self.broker.replicas.add_replica(CONTROLLER_GROUP, plog, Membership.of(self.broker.peers),
                                                      self._apply, controller=True, applied_offset=applied)
        self.broker.controller = controller
        controller.start()
        log.info("the controller replica on broker %d is reopened and catches up from the leader", self.node_id)

    def _controller(self) -> Replica:
        controller = self.broker.controller
        assert controller is not None
        return controller

    # ---------------------------------------------------------------------------- applying commands

    def _apply(self, replica: Replica, entries: Sequence[Entry]) -> None:
        for entry in entries:
            if entry.kind is not EntryKind.DATA:
                continue
            try:
                command = decode_command(entry.payload)
            except rec.CorruptBatchError as exc:
                # Damaged on this broker's disk: cut the metadata log here and fetch the rest from the others.
                raise DamagedLogError(CONTROLLER_GROUP, entry.base_offset, str(exc)) from None
            event = self.broker.cluster.apply(command, entry.base_offset)
            if command.get("op") == "broker_disk":
                self._note_disk_registration(command)
                if command["node"] == self.node_id and command["disk_id"] == self.broker.disk_id:
                    self.broker.replicas.end_waits_of_a_first_disk()
            if event is None:
                continue
            if event.kind == "created":
                self._start_topic(event.topic)
            elif event.kind == "deleted":
                self._stop_topic(event.topic)
            else:
                self._on_topic_changed(event)
        self.broker.replicas.check_replicas_holding_nothing()
        self.broker.data.wake_fetchers()

    def _on_topic_changed(self, event: TopicEvent) -> None:
        """A topic changed after its creation: act on this broker's replicas of it."""
        topic = event.topic
        if event.kind == "configs_altered":
            self._reconfigure_topic(topic)
            return
        replicas = self.broker.replicas
        for index in event.partitions:
            replica = replicas.hosted_replica(topic.name, index)
            if replica is not None and replica.group != topic.raft_group(index):
                continue  # a replica of an older topic of this name, left to its own delete
            if event.kind == "moved" and self.node_id in event.removed:
                replicas.drop_moved_replica(topic, index)
            elif replica is None and self.node_id in self.broker.cluster.hosts(topic, index):
                replicas.open_partition(topic, index)  # a new partition, or a move to this broker
            elif replica is not None:
                replica.preferred_leader = replicas.preferred_leader(topic, index)
                replica.node.vote_while_catching_up_for = replicas.safe_vote_while_catching_up(topic, index, replica)

    def _reconfigure_topic(self, topic: TopicMetadata) -> None:
        """New retention, segment size, flush and size limits for every open log of the topic, at once."""
        try:
            config = self.log_config(topic.configs)
        except InvalidConfigError as exc:  # validated before it was proposed; only a broker default can clash
            log.error("topic %s: new configs not applied on broker %d: %s", topic.name, self.node_id, exc)
            return
        for index in range(topic.partitions):
            replica = self.broker.replicas.hosted_replica(topic.name, index)
            if replica is not None and replica.group == topic.raft_group(index):
                replica.log.update_config(config)
        self.broker.replicas.layout_version += 1  # flush="interval" may have come or gone

    def _start_topic(self, topic: TopicMetadata) -> None:
        local = [index for index, replicas in enumerate(topic.assignment) if self.node_id in replicas]
        if len(local) <= OPEN_PARTITIONS_AT_ONCE:  # a small topic opens at once, as it always did
            for index in local:
                self.broker.replicas.open_partition(topic, index)
        else:  # a big one's files are created off the event loop, all of them (on a loaded disk, 32 took 0.5 s)
            task = asyncio.get_running_loop().create_task(self._open_in_turns(topic, local))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _open_in_turns(self, topic: TopicMetadata, indexes: list[int]) -> None:
        """Open a big topic's replicas a chunk at a time, their files created off the event loop: opening a
        thousand at once on it held it for seconds, the brokers' heartbeats stopped, and their peers took
        every group's leadership away (an election storm).

        And no faster than their groups elect: every new group's first election and first entry are fsyncs
        in the flush pool, and a group whose Ready waits in a long queue sends no heartbeat meanwhile, so its
        followers elect again, which queues more (10,000 new partitions never settled). A chunk is opened
        once few of the groups opened before it still lack a leader, or after a while regardless (another
        broker may be slow to open its side)."""
        async with self._opening_lock:  # one topic at a time: topics created back to back share the pace
            await self._open_paced(topic, indexes)

    async def _open_paced(self, topic: TopicMetadata, indexes: list[int]) -> None:
        tick_s = self.broker.config.raft_tick_ms / 1000
        opened: list[int] = []
        for start in range(0, len(indexes), OPEN_PARTITIONS_PER_TURN):
            waited_s = 0.0
            while (self._electing(topic, opened) > MAX_GROUPS_ELECTING
                   or self.broker.replicas.flush_backlog() > MAX_FLUSH_BACKLOG_TO_OPEN) and waited_s < MAX_OPEN_WAIT_S:
                await asyncio.sleep(tick_s)
                waited_s += tick_s
            current = self.broker.cluster.topics.get(topic.name)
            if current is None or current.topic_id != topic.topic_id:
                return  # deleted meanwhile (its delete closed what was opened)
            chunk = indexes[start:start + OPEN_PARTITIONS_PER_TURN]
            await self.broker.replicas.open_partitions(current, chunk)
            opened = [*opened[-MAX_GROUPS_ELECTING:], *chunk]

    def _electing(self, topic: TopicMetadata, indexes: list[int]) -> int:
        """How many of these partitions' replicas here know no leader yet."""
        replicas = self.broker.replicas
        return sum(1 for index in indexes
                   if (replica := replicas.hosted_replica(topic.name, index)) is not None and replica.leader_id is None)

    def _stop_topic(self, topic: TopicMetadata) -> None:
        """Close and delete this topic's replicas, and only its own: found by topic ID, not by name."""
        deleted = 0
        for index in range(topic.partitions):
            self.broker.replicas.close_partition(topic, index)
            if self.broker.replicas.remove_directory(topic, index) is not None:
                deleted += 1
        if deleted:
            log.info("deleted topic %s (ID %s) and its %d local replica(s)", topic.name, topic.topic_id, deleted)
        self._drop_committed_offsets(topic.name)

    def _drop_committed_offsets(self, name: str) -> None:
        """A deleted topic takes the groups' committed offsets for it along (written by each coordinator)."""
        for runtime in self.broker.group_runtimes.values():
            if runtime.replica.is_leader:
                task = asyncio.get_running_loop().create_task(
                    runtime.run(lambda shard: (None, shard.drop_topic(name))))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # ---------------------------------------------------------------------------- leader reports

    def note_leadership(self, replica: Replica) -> None:
        """A partition replica here became leader: report it to the controller (batched, see below)."""
        topic = self.broker.cluster.topics.get(replica.log.topic)
        if topic is not None and topic.raft_group(replica.log.partition) == replica.group:
            self._leader_reports[(replica.log.topic, replica.log.partition)] = (replica.term, topic.topic_id)

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
        controller = self._controller()
        reports = dict(self._leader_reports)
        leaders = [[t, p, self.node_id, epoch, topic_id] for (t, p), (epoch, topic_id) in reports.items()]
        leader_id = controller.leader_id
        send = self.broker.send_leader_report
        if controller.is_leader:
            await self.propose_command({"op": "leaders", "leaders": leaders}, LEADER_REPORT_TIMEOUT_S)
        elif leader_id is None or send is None or not await send(self.broker.peers[leader_id], self.node_id,
                                                                 leaders):
            return
        for key, value in reports.items():  # a newer report made meanwhile stays pending
            if self._leader_reports.get(key) == value:
                del self._leader_reports[key]

    async def accept_leader_report(self, from_node: int, leaders: list[list[Any]], disk_id: str = "") -> None:
        """On the controller leader: record another broker's leaderships (and its disk, when disk_id is given) in
        the metadata log.

        A broker reports only its own leaderships, of partitions placed on it, of the topic ID it holds:
        a report that says otherwise is refused whole, so it can never misdirect clients."""
        if not self._controller().is_leader:
            raise errors.NotLeader("this broker does not lead the controller; report to the leader")
        for report in leaders:
            problem = self._leader_report_problem(from_node, report)
            if problem is not None:
                raise errors.InvalidRequest(f"leader report from broker {from_node} refused: {problem}")
        if disk_id:
            if from_node not in self.broker.peers or not is_disk_id(disk_id):
                raise errors.InvalidRequest(f"disk registration from broker {from_node} refused: a member of this "
                                            f"cluster {sorted(self.broker.peers)} registers a 32-hex-digit disk ID")
            if (from_node, disk_id) not in self.broker.cluster.disk_registrations:
                await self.propose_command(self._disk_command(from_node, disk_id), LEADER_REPORT_TIMEOUT_S)
        if leaders:
            await self.propose_command({"op": "leaders", "leaders": leaders}, LEADER_REPORT_TIMEOUT_S)

    def _leader_report_problem(self, from_node: int, report: list[Any]) -> str | None:
        if from_node not in self.broker.peers:
            return f"broker {from_node} is not a member of this cluster {sorted(self.broker.peers)}"
        topic_name, partition, leader, epoch, topic_id = report
        topic = self.broker.cluster.topics.get(topic_name)
        if topic is None or topic.topic_id != topic_id:
            return f"topic {topic_name!r} with ID {topic_id} does not exist"
        if leader != from_node:
            return f"it names broker {leader} as leader of {topic_name}-{partition}; a broker reports only itself"
        if not 0 <= partition < topic.partitions or from_node not in self.broker.cluster.hosts(topic, partition):
            return f"broker {from_node} holds no replica of {topic_name}-{partition}"
        if not 0 <= epoch <= MAX_EPOCH:
            return f"epoch {epoch} is outside 0..{MAX_EPOCH}"
        return None

    # ---------------------------------------------------------------------------- waiting and proposing

    def controller_id(self) -> int:
        """The controller leader's node id as this broker knows it; -1 when none is known."""
        controller = self.broker.controller
        leader = controller.leader_id if controller is not None else None
        return leader if leader is not None else -1

    def metadata_loaded(self) -> bool:
        """Whether this broker has loaded the cluster metadata since it started: a controller leader is known
        and every command known to be committed is applied. Until then "no such topic" may mean "not yet"."""
        controller = self.broker.controller
        if self._metadata_loaded or controller is None:
            return self._metadata_loaded
        node = controller.node
        if controller.leader_id is not None and node.applied_offset >= node.commit_offset:
            self._metadata_loaded = True
        return self._metadata_loaded

    async def controller_leader_address(self, timeout_s: float) -> str | None:
        """Where CreateTopics and DeleteTopics must go; None when this broker is the controller leader.

        Right after start-up no leader may be elected yet; wait for one rather than fail at once."""
        controller = self._controller()
        deadline = time.monotonic() + timeout_s
        while controller.leader_id is None and time.monotonic() < deadline:
            await asyncio.sleep(self.broker.config.raft_tick_ms / 1000)
        if controller.is_leader:
            return None
        leader = controller.leader_id
        if leader is None:
            raise errors.LeaderNotAvailable(f"no controller leader elected within {timeout_s:.0f}s; is a majority "
                                            f"of {sorted(self.broker.peers)} up?")
        return self.broker.peers[leader]

    async def wait_for_metadata(self, condition: Callable[[], bool], timeout_s: float) -> None:
        """Wait (bounded) until this broker's copy of the cluster metadata satisfies condition."""
        deadline = time.monotonic() + timeout_s
        while not condition() and time.monotonic() < deadline:
            await asyncio.sleep(self.broker.config.raft_tick_ms / 1000)

    async def await_disks_registered(self, assignment: list[list[int]], what: str, timeout_s: float) -> None:
        """Before new partitions are recorded: wait until every live broker they are placed on has its disk
        registered in the metadata. A replica that holds nothing of a partition created before its broker's disk
        registration waits to catch up from a leader (disk_identity.py), so a topic created in a new cluster's
        first second, before its brokers had registered, had every replica waiting and never a leader. A broker
        whose disk was replaced has its old disk registered: its liveness heartbeats say whether the disk it runs
        on is (a two-replica partition created before the new disk's registration never elected: its replica
        there waited for a leader only the other replica could become, with that one's vote). A broker that is
        down is not waited for: its replicas catch up from the others' leader when it starts."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        nodes = {node for replicas in assignment for node in replicas}
        while starting := sorted(node for node in nodes if self.broker.liveness.is_alive(node)
                                 and not self._disk_registered(node)):
            if loop.time() >= deadline:
                raise errors.LeaderNotAvailable(
                    f"{what}: broker(s) {', '.join(map(str, starting))} are starting and have not registered their "
                    "disks in the cluster metadata yet; retry in a moment")
            await asyncio.sleep(self.broker.config.raft_tick_ms / 1000)

    def _disk_registered(self, node: int) -> bool:
        """Whether the disk broker ``node`` runs on is registered: this broker's own, from the metadata applied here;
        a peer's, from the metadata and the peer's last liveness heartbeat."""
        if node == self.node_id:
            return self.disk_registered
        return self.broker.cluster.has_disk_of(node) and self.broker.liveness.says_disk_registered(node)

    async def wait_for_leaders(self, name: str, timeout_s: float) -> None:
        """After a create: wait until every partition this broker hosts has elected a leader. Each round looks
        only at the partitions still waiting (a round over every replica of the broker, a thousand times per
        topic created, was a sixteenth of the loop's time while 10,000 partitions were created)."""
        deadline = time.monotonic() + timeout_s
        waiting: list[int] | None = None
        while time.monotonic() < deadline:
            topic = self.broker.cluster.topics.get(name)
            if topic is None:
                return
            if waiting is None:
                waiting = [index for index in range(topic.partitions)
                           if self.node_id in self.broker.cluster.hosts(topic, index)]
            waiting = [index for index in waiting if not self._leader_ready(name, index)]
            if not waiting:
                return
            await asyncio.sleep(self.broker.config.raft_tick_ms / 1000)

    def _leader_ready(self, name: str, index: int) -> bool:
        """The local replica knows its leader, and if it is the leader, its no-op entry is committed (the high
        watermark reaches the log end). A big topic's replicas open a few per loop turn (_open_in_turns): one
        not open yet is not ready."""
        replica = self.broker.replicas.hosted_replica(name, index)
        return replica is not None and replica.leader_id is not None and (
            not replica.is_leader or replica.node.commit_offset >= replica.node.log.last_offset)

    async def propose_command(self, command: dict[str, Any], timeout_s: float) -> None:
        """Commit one controller command (on the controller leader)."""
        controller = self._controller()
        try:
            entries = controller.propose([encode_command(command, now_ms())])
        except (NotLeaderError, ProposalDroppedError):
            raise errors.LeaderNotAvailable("the controller leader changed; retry") from None
        try:
            await asyncio.wait_for(controller.wait_committed(entries[-1].last_offset), timeout_s)
        except TimeoutError:
            raise errors.RequestTimedOut(
                f"the controller did not commit within {timeout_s:.0f}s; is a majority of brokers up?") from None

    # ---------------------------------------------------------------------------------- topics

    async def _await_caught_up_leader(self, timeout_s: float) -> None:
        """On a controller leader just elected: wait until it has applied what earlier leaders committed, so that
        a create or delete is checked against every topic that exists (a new leader answered 'already exists'
        for a topic whose committed delete it had not applied yet, and the create was taken as done)."""
        controller = self._controller()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while controller.is_leader and not controller.node.leader_caught_up:
            if asyncio.get_running_loop().time() > deadline:
                raise errors.LeaderNotAvailable("the controller leader is still applying what earlier leaders "
                                                "committed; retry shortly")
            await asyncio.sleep(self.broker.config.raft_tick_ms / 1000)

    async def create_topic(self, name: str, partitions: int, replication_factor: int,
                           configs: dict[str, str], validate_only: bool = False, timeout_s: float = 30.0) -> None:
        await self._await_caught_up_leader(timeout_s)
        partitions, replication_factor = self._checked_new_topic(name, partitions, replication_factor, configs)
        if validate_only:
            return
        assignment = self._place_new_topic(name, partitions, replication_factor)
        await self.await_disks_registered(assignment, f"topic {name!r}", timeout_s)
        topic_id = new_topic_id()
        await self.propose_command({"op": "create_topic", "name": name, "topic_id": topic_id,
                                    "partitions": partitions, "replication_factor": replication_factor,
                                    "configs": dict(configs), "assignment": assignment}, timeout_s)
        created = self.broker.cluster.topics.get(name)
        if created is None or created.topic_id != topic_id:
            # Another request created (and maybe deleted) this name first; its partition count won, not ours.
            raise errors.TopicAlreadyExists(
                f"topic {name!r} was created by a concurrent request"
                + (f" with {created.partitions} partition(s)" if created is not None else " and deleted since"))
        await self.wait_for_leaders(name, timeout_s)
        log.info("created topic %s (ID %s): %d partition(s), replication factor %d", name, topic_id, partitions,
                 replication_factor)

    def _place_new_topic(self, name: str, partitions: int, replication_factor: int) -> list[list[int]]:
        """Placed by place_new_topic; refused (nothing created) if a partition could elect no leader."""
        live = self.broker.replicas.live_brokers()
        assignment, stranded = place_new_topic(list(self.broker.peers), live, partitions, replication_factor,
                                               salt=hash(name) & 0xFFFF)
        if stranded:
            down = ", ".join(str(node) for node in sorted(self.broker.peers) if node not in live)
            raise errors.InvalidReplicationFactor(
                f"topic {name!r}: with broker(s) {down} down, {len(stranded)} of its {partitions} partition(s) "
                f"would have no majority of their {replication_factor} replicas alive and could elect no leader; "
                f"start broker(s) {down} and create it again (nothing was created)")
        return assignment

    def _checked_new_topic(self, name: str, partitions: int, replication_factor: int,
                           configs: dict[str, str]) -> tuple[int, int]:
        """The partition count and replication factor a create asks for (defaults filled in), once valid."""
        try:
            check_topic_name(name)
        except TopicNameError as exc:
            raise errors.InvalidTopic(str(exc)) from None
        if name in self.broker.cluster.topics:
            raise errors.TopicAlreadyExists(f"topic {name!r} already exists")
        config = self.broker.config
        peers = self.broker.peers
        partitions = config.default_partitions if partitions == -1 else partitions
        if replication_factor == -1:
            replication_factor = config.default_replication_factor or min(3, len(self.broker.replicas.live_brokers()))
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise errors.InvalidPartitions(f"partitions must be between 1 and {MAX_PARTITIONS}, got {partitions}")
        if not 1 <= replication_factor <= len(peers):
            raise errors.InvalidReplicationFactor(
                f"replication factor {replication_factor} needs that many brokers; this cluster has {len(peers)}")
        self.checked_log_config(name, configs)
        return partitions, replication_factor

    async def delete_topic(self, name: str, timeout_s: float = 30.0) -> None:
        await self._await_caught_up_leader(timeout_s)
        topic = self.topic(name)
        await self.propose_command({"op": "delete_topic", "name": name, "topic_id": topic.topic_id}, timeout_s)

    async def ensure_offsets_topic(self, timeout_s: float) -> bool:
        """Create __consumer_offsets on first use; True once it exists. Only the controller leader creates it
        (False elsewhere: the caller forwards to the controller leader)."""
        if OFFSETS_TOPIC in self.broker.cluster.topics:
            return True
        if not self._controller().is_leader:
            return False
        config = self.broker.config
        partitions = config.offsets_topic_partitions
        replication_factor = min(3, len(self.broker.peers))
        assignment = place_replicas(list(self.broker.peers), partitions, replication_factor, salt=0)
        await self.await_disks_registered(assignment, OFFSETS_TOPIC, timeout_s)
        await self.propose_command({"op": "create_topic", "name": OFFSETS_TOPIC, "topic_id": new_topic_id(),
                                    "partitions": partitions, "replication_factor": replication_factor,
                                    "configs": {**OFFSETS_TOPIC_CONFIGS,
                                                "segment.bytes": str(config.offsets_segment_bytes)},
                                    "assignment": assignment}, timeout_s)
        await self.wait_for_leaders(OFFSETS_TOPIC, timeout_s)
        log.info("created %s: %d partition(s), replication factor %d", OFFSETS_TOPIC, partitions, replication_factor)
        return OFFSETS_TOPIC in self.broker.cluster.topics

    async def ensure_topic(self, name: str, partitions: int, timeout_s: float = 30.0) -> None:
        """Create a topic the broker itself needs (a dead-letter topic) unless it exists: on the controller
        leader directly, elsewhere through it."""
        if name in self.broker.cluster.topics:
            return
        if self._controller().is_leader:
            with contextlib.suppress(errors.TopicAlreadyExists):
                await self.create_topic(name, partitions, -1, {}, timeout_s=timeout_s)
            return
        address = await self.controller_leader_address(timeout_s)
        creator = self.broker.topic_creator
        if address is None or creator is None:
            raise errors.LeaderNotAvailable(f"no controller leader to create topic {name!r}; retrying")
        await creator(address, name, partitions)
        await self.wait_for_metadata(lambda: name in self.broker.cluster.topics, timeout_s)

    def topics(self) -> list[TopicMetadata]:
        return sorted(self.broker.cluster.topics.values(), key=lambda t: t.name)

    def topic(self, name: str) -> TopicMetadata:
        topic = self.broker.cluster.topics.get(name)
        if topic is None:
            if not self.metadata_loaded():
                # Just started and still replaying the controller's log (or no controller leader yet): "no such
                # topic" may mean "not yet", and a client told so would give up on a topic that exists.
                raise errors.LeaderNotAvailable(
                    f"broker {self.broker.node_id} is still loading the cluster metadata and does not know topic "
                    f"{name!r} yet; retry shortly (or ask another broker)")
            raise errors.UnknownTopicOrPartition(
                f"topic {name!r} does not exist; create it with `lb topic create {name} --partitions N`")
        return topic

    def topic_partition_counts(self) -> dict[str, int]:
        return {name: topic.partitions for name, topic in self.broker.cluster.topics.items()}

    def checked_log_config(self, name: str, configs: dict[str, str]) -> LogConfig:
        """The log config a topic's overrides make, or InvalidConfig naming the bad key or value (for create
        and alter alike)."""
        try:
            log_config = self.log_config(configs)
        except InvalidConfigError as exc:
            raise errors.InvalidConfig(f"topic {name!r}: {exc}") from None
        if log_config.compacted:
            # Compaction leaves offset gaps, and Raft ships a partition's log as contiguous entries; until the
            # replication path can carry compacted ranges, refuse rather than accept a setting that is not run.
            raise errors.InvalidConfig(
                f"topic {name!r}: cleanup.policy=compact is not supported for replicated topics yet; "
                "use cleanup.policy=delete with retention.ms / retention.bytes")
        return log_config

    def effective_configs(self, name: str) -> dict[str, str]:
        return self.log_config(self.topic(name).configs).to_mapping()

    def log_config(self, overrides: dict[str, str]) -> LogConfig:
        return LogConfig.from_mapping({**self._log_defaults.to_mapping(), **overrides})
