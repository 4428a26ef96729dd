"""The controller's state machine: the cluster metadata, changed only by committed commands.

Commands are JSON documents carried as the value of a one-record batch in the controller's Raft log.
Every broker applies the same commands in the same order and so holds the same metadata. Applying is
pure (no I/O); the broker reacts to the returned events (start or stop replicas).

A topic is identified by its ID, not its name (Kafka's KIP-516): a create command carries a fresh UUID,
and deletes and leader reports name the ID they mean. A command about a topic that no longer exists under
that ID (an old delete replayed, a report from before a re-create) changes nothing.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from logbroker_client import records as rec

from logbroker.raft.quorum import has_quorum

CONTROLLER_GROUP = "__controller"
MAX_EPOCH = (1 << 31) - 1  # epochs travel as a batch's 32-bit partitionLeaderEpoch


@dataclass
class TopicMetadata:
    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str]
    assignment: list[list[int]]  # partition -> replica node ids; the first is the preferred leader
    topic_id: str = ""
    created_offset: int = -1  # offset of the create command in the controller log: orders topics by age
    # Partitions a replica move ever named: their Raft groups' voters may have changed since their first entry.
    reconfigured: set[int] = field(default_factory=set)

    def raft_group(self, partition: int) -> str:
        """The partition's Raft group on the wire: unique per topic ID, so two topics of one name never mix."""
        return f"{self.name}-{partition}@{self.topic_id}"


@dataclass(frozen=True)
class TopicEvent:
    # "created", "deleted", "configs_altered", "partitions_added" (partitions: the new ones), "moving" (a
    # replica move began or changed target; partitions: the moved ones) or "moved" (partitions: the one done,
    # removed: the brokers that no longer hold it)
    kind: str
    topic: TopicMetadata
    partitions: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()


@dataclass
class ClusterState:
    topics: dict[str, TopicMetadata] = field(default_factory=dict)
    # (topic, partition) -> (leader, epoch) as reported by leaders; the newest epoch wins
    leaders: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    # group id -> configs set on it (share-group settings), validated before they are proposed
    group_configs: dict[str, dict[str, str]] = field(default_factory=dict)
    # (topic, partition) -> the replica set a move is taking the partition to, until the move is done
    moves: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    # (broker, disk ID) -> the metadata offset of the disk's first registration: a replica that holds nothing of a
    # partition created before its broker's disk registered lost its state (disk_identity.py). Kept for every
    # disk ever registered, so a later registration for the same node id (a second broker started with it, or a
    # forged report) never makes an earlier disk's partitions look older than it.
    disk_registrations: dict[tuple[int, str], int] = field(default_factory=dict)

    def hosts(self, topic: TopicMetadata, partition: int) -> list[int]:
        """Brokers that hold a replica of the partition: its assignment, plus a move's new brokers."""
        target = self.moves.get((topic.name, partition), [])
        assigned = topic.assignment[partition]
        return assigned + [node for node in target if node not in assigned]

    def has_disk_of(self, node: int) -> bool:
        """Whether any disk of broker ``node`` is registered (disk_identity.py)."""
        return any(registered == node for registered, _ in self.disk_registrations)

    def replaced_a_disk(self, node: int, disk_id: str, registered_at: int) -> bool:
        """Whether another disk of broker ``node`` was registered before this one (at ``registered_at``): then
        this disk replaced it, and a partition created before ``registered_at`` may have lived on that one."""
        return any(other_node == node and other_disk != disk_id and offset < registered_at
                   for (other_node, other_disk), offset in self.disk_registrations.items())

    def apply(self, command: dict[str, Any], offset: int) -> TopicEvent | None:
        """Apply one command found at ``offset`` of the controller log; return what the broker must act on."""
        op = command.get("op")
        if op == "create_topic":
            return self._create(command, offset)
        if op == "delete_topic":
            return self._delete(command)
        if op == "leaders":
            self._record_leaders(command["leaders"])
            return None
        if op in _TOPIC_CHANGES:
            return _TOPIC_CHANGES[op](self, command)
        if op == "broker_disk":
            node, disk_id = command["node"], command["disk_id"]
            self.disk_registrations.setdefault((node, disk_id), offset)  # a retried registration keeps the first
            return None
        if op == "group_configs":
            merged = {**self.group_configs.get(command["group"], {}), **command["configs"]}
            merged = {k: v for k, v in merged.items() if v != ""}
            if merged:
                self.group_configs[command["group"]] = merged
            else:
                self.group_configs.pop(command["group"], None)
            return None
        raise ValueError(f"unknown controller command {op!r}")

    def _create(self, command: dict[str, Any], offset: int) -> TopicEvent | None:
        if command["name"] in self.topics:
            return None  # a concurrent or retried create: the first one committed won
        # Commands written before topic IDs existed get one derived from their place in the log, the same on
        # every broker.
        topic_id = command.get("topic_id") or uuid.uuid5(uuid.NAMESPACE_OID, f"{command['name']}@{offset}").hex
        topic = TopicMetadata(command["name"], command["partitions"], command["replication_factor"],
                              dict(command["configs"]), [list(r) for r in command["assignment"]],
                              topic_id, offset)
        self.topics[topic.name] = topic
        return TopicEvent("created", topic)

    def _delete(self, command: dict[str, Any]) -> TopicEvent | None:
        topic = self.topics.get(command["name"])
        if topic is None:
            return None
        wanted = command.get("topic_id")
        if wanted is not None and wanted != topic.topic_id:
            return None  # it named an older topic of this name, already gone
        del self.topics[topic.name]
        self.leaders = {tp: v for tp, v in self.leaders.items() if tp[0] != topic.name}
        self.moves = {tp: v for tp, v in self.moves.items() if tp[0] != topic.name}
        return TopicEvent("deleted", topic)

    def _named_topic(self, command: dict[str, Any]) -> TopicMetadata | None:
        """The topic a change names, if it still exists under the ID the change was made for."""
        topic = self.topics.get(command["name"])
        if topic is None or topic.topic_id != command["topic_id"]:
            return None
        return topic

    def _alter_configs(self, command: dict[str, Any]) -> TopicEvent | None:
        topic = self._named_topic(command)
        if topic is None:
            return None
        # The command carries the whole new set of overrides (validated before it was proposed), so applying
        # it twice, or after a concurrent alter, leaves exactly what the last committed one said.
        topic.configs = dict(command["configs"])
        return TopicEvent("configs_altered", topic)

    def _add_partitions(self, command: dict[str, Any]) -> TopicEvent | None:
        topic = self._named_topic(command)
        if topic is None or command["from"] != topic.partitions:
            return None  # a concurrent add committed first: its count won, this one is stale
        added = [list(replicas) for replicas in command["assignment"]]
        topic.assignment.extend(added)
        topic.partitions += len(added)
        return TopicEvent("partitions_added", topic, tuple(range(command["from"], topic.partitions)))

    def _start_moves(self, command: dict[str, Any]) -> TopicEvent | None:
        topic = self._named_topic(command)
        if topic is None:
            return None
        moved = []
        for partition, target in command["moves"]:
            if 0 <= partition < topic.partitions:
                topic.reconfigured.add(partition)
                if list(target) == topic.assignment[partition]:
                    self.moves.pop((topic.name, partition), None)  # already there: nothing to move
                else:
                    self.moves[(topic.name, partition)] = list(target)
                moved.append(partition)
        return TopicEvent("moving", topic, tuple(moved))

    def _finish_move(self, command: dict[str, Any]) -> TopicEvent | None:
        topic = self._named_topic(command)
        partition = command["partition"]
        if topic is None or self.moves.get((topic.name, partition)) != command["replicas"]:
            return None  # retargeted meanwhile (the new target is still to be reached) or already finished
        before = self.hosts(topic, partition)
        topic.assignment[partition] = list(command["replicas"])
        del self.moves[(topic.name, partition)]
        removed = tuple(node for node in before if node not in topic.assignment[partition])
        return TopicEvent("moved", topic, (partition,), removed)

    def _record_leaders(self, reports: list[list[Any]]) -> None:
        for report in reports:
            topic_name, partition, leader, epoch = report[:4]
            topic_id = report[4] if len(report) > 4 else None
            topic = self.topics.get(topic_name)
            if topic is None or (topic_id is not None and topic_id != topic.topic_id):
                continue  # about a topic that is gone, or an older one of this name
            if not (0 <= partition < topic.partitions and leader in self.hosts(topic, partition)
                    and 0 <= epoch <= MAX_EPOCH):
                continue  # contradicts the topic's own placement: never let it misdirect clients
            known = self.leaders.get((topic_name, partition))
            if known is None or epoch >= known[1]:
                self.leaders[(topic_name, partition)] = (leader, epoch)


_TOPIC_CHANGES = {
    "alter_topic_configs": ClusterState._alter_configs,
    "add_partitions": ClusterState._add_partitions,
    "move_replicas": ClusterState._start_moves,
    "move_done": ClusterState._finish_move,
}


def new_topic_id() -> str:
    return uuid.uuid4().hex


def encode_command(command: dict[str, Any], timestamp_ms: int) -> tuple[bytes, int]:
    """A command as (batch bytes, record count), ready to propose."""
    builder = rec.BatchBuilder()
    builder.append(timestamp_ms, None, json.dumps(command, sort_keys=True).encode())
    return builder.build(), 1


def decode_command(batch: bytes) -> dict[str, Any]:
    header = rec.validate_batch(batch)
    record = rec.decode_records(batch, 0, header)[0]
    return dict(json.loads(record.value or b"{}"))


def place_new_topic(peers: list[int], live: list[int], partitions: int, replication_factor: int,
                    salt: int) -> tuple[list[list[int]], list[int]]:
    """A new topic's placement and its stranded partitions (no majority of replicas on live brokers: they could
    elect no leader). Over the live brokers when they are enough, as Kafka places over unfenced brokers: a
    replica on a broker that is down leaves its partition a vote short, and at RF2 without a leader until that
    broker returns. Over every broker otherwise."""
    if len(live) >= replication_factor:
        return place_replicas(live, partitions, replication_factor, salt), []
    assignment = place_replicas(peers, partitions, replication_factor, salt)
    alive = set(live)
    stranded = [index for index, replicas in enumerate(assignment) if not has_quorum(replicas, alive.__contains__)]
    return assignment, stranded


def place_replicas(brokers: list[int], partitions: int, replication_factor: int, salt: int) -> list[list[int]]:
    """Spread replicas and preferred leaders evenly: partition p starts at broker (salt + p) mod n."""
    ordered = sorted(brokers)
    n = len(ordered)
    return [[ordered[(salt + p + i) % n] for i in range(replication_factor)] for p in range(partitions)]
