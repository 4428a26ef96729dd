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

    def raft_group(self, partition: int) -> str:
        """The partition's Raft group on the wire: unique per topic ID, so two topics of one name never mix."""
        return f"{self.name}-{partition}@{self.topic_id}"


@dataclass(frozen=True)
class TopicEvent:
    kind: str  # "created" or "deleted"
    topic: TopicMetadata


@dataclass
class ClusterState:
    topics: dict[str, TopicMetadata] = field(default_factory=dict)
    # (topic, partition) -> (leader, epoch) as reported by leaders; the newest epoch wins
    leaders: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    # group id -> configs set on it (share-group settings), validated before they are proposed
    group_configs: dict[str, dict[str, str]] = field(default_factory=dict)

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
        return TopicEvent("deleted", topic)

    def _record_leaders(self, reports: list[list[Any]]) -> None:
        for report in reports:
            topic_name, partition, leader, epoch = report[:4]
            topic_id = report[4] if len(report) > 4 else None
            topic = self.topics.get(topic_name)
            if topic is None or (topic_id is not None and topic_id != topic.topic_id):
                continue  # about a topic that is gone, or an older one of this name
            if not (0 <= partition < topic.partitions and leader in topic.assignment[partition]
                    and 0 <= epoch <= MAX_EPOCH):
                continue  # contradicts the topic's own placement: never let it misdirect clients
            known = self.leaders.get((topic_name, partition))
            if known is None or epoch >= known[1]:
                self.leaders[(topic_name, partition)] = (leader, epoch)


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


def place_replicas(brokers: list[int], partitions: int, replication_factor: int, salt: int) -> list[list[int]]:
    """Spread replicas and preferred leaders evenly: partition p starts at broker (salt + p) mod n."""
    ordered = sorted(brokers)
    n = len(ordered)
    return [[ordered[(salt + p + i) % n] for i in range(replication_factor)] for p in range(partitions)]
