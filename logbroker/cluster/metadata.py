"""The controller's state machine: the cluster metadata, changed only by committed commands.

Commands are JSON documents carried as the value of a one-record batch in the controller's Raft log.
Every broker applies the same commands in the same order and so holds the same metadata. Applying is
pure (no I/O); the broker reacts to the returned events (start or stop replicas).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from logbroker_client import records as rec

CONTROLLER_GROUP = "__controller"


@dataclass
class TopicMetadata:
    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str]
    assignment: list[list[int]]  # partition -> replica node ids; the first is the preferred leader


@dataclass
class ClusterState:
    topics: dict[str, TopicMetadata] = field(default_factory=dict)
    # (topic, partition) -> (leader, epoch) as reported by leaders; the newest epoch wins
    leaders: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)

    def apply(self, command: dict[str, Any]) -> tuple[str, str] | None:
        """Apply one command; return (event, topic) for the broker to act on, or None."""
        op = command.get("op")
        if op == "create_topic":
            if command["name"] in self.topics:
                return None  # a retried proposal: the first one won
            topic = TopicMetadata(command["name"], command["partitions"], command["replication_factor"],
                                  dict(command["configs"]), [list(r) for r in command["assignment"]])
            self.topics[topic.name] = topic
            return ("created", topic.name)
        if op == "delete_topic":
            if self.topics.pop(command["name"], None) is None:
                return None
            self.leaders = {tp: v for tp, v in self.leaders.items() if tp[0] != command["name"]}
            return ("deleted", command["name"])
        if op == "leaders":
            for topic, partition, leader, epoch in command["leaders"]:
                known = self.leaders.get((topic, partition))
                if topic in self.topics and (known is None or epoch >= known[1]):
                    self.leaders[(topic, partition)] = (leader, epoch)
            return None
        raise ValueError(f"unknown controller command {op!r}")


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
