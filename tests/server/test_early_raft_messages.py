"""Raft messages for a group whose replica is not open here yet (a new topic's replicas open a chunk at a time on
each broker) are kept, within bounds, and stepped when the replica opens, so a preferred leader's first vote
request is not lost and its group does not wait out an election timeout."""

from __future__ import annotations

from logbroker_client import Admin

from logbroker.cluster.liveness import LIVENESS_GROUP
from logbroker.raft.types import Entry, EntryKind, Message, MessageType
from logbroker.server.replica_manager import (
    EARLY_MESSAGE_GROUPS_MAX,
    EARLY_MESSAGE_MAX_BYTES,
    EARLY_MESSAGE_TTL_TICKS,
    EARLY_MESSAGES_PER_GROUP_MAX,
    EPOCH_SAVE_INTERVAL_TICKS,
    ReplicaManager,
)
from tests.support.brokers import InProcessBroker

GHOST = "ghost-0@0123456789abcdef"


def manager(broker: InProcessBroker) -> ReplicaManager:
    assert broker.server is not None
    return broker.server.broker.replicas


def vote(from_node: int = 2) -> Message:
    return Message(MessageType.VOTE, from_node, 1, 1, last_log_offset=-1, last_log_term=0)


def kept(broker: InProcessBroker, group: str) -> list[Message]:
    found = broker.call(lambda: manager(broker)._early_messages.get(group))
    return [] if found is None else list(found[1])  # type: ignore[index]


def test_messages_for_a_group_not_open_are_kept_within_bounds(broker: InProcessBroker) -> None:
    replicas = manager(broker)
    big = Message(MessageType.APPEND, 2, 1, 1, entries=(
        Entry(0, 0, 1, EntryKind.DATA, b"x" * (EARLY_MESSAGE_MAX_BYTES + 1)),))
    broker.call(lambda: replicas.on_raft_messages(
        [(GHOST, vote()) for _ in range(EARLY_MESSAGES_PER_GROUP_MAX + 3)]
        + [("big-0@0123456789abcdef", big), (LIVENESS_GROUP, Message(MessageType.HEARTBEAT, 2, 1, 0))]))
    assert len(kept(broker, GHOST)) == EARLY_MESSAGES_PER_GROUP_MAX
    assert kept(broker, "big-0@0123456789abcdef") == [] and kept(broker, LIVENESS_GROUP) == []

    others = [(f"other-{i}@0123456789abcdef", vote()) for i in range(EARLY_MESSAGE_GROUPS_MAX + 10)]
    broker.call(lambda: replicas.on_raft_messages(others))
    assert broker.call(lambda: len(replicas._early_messages)) == EARLY_MESSAGE_GROUPS_MAX


def test_kept_messages_are_forgotten_after_their_time(broker: InProcessBroker) -> None:
    replicas = manager(broker)
    broker.call(lambda: replicas.on_raft_messages([(GHOST, vote())]))
    assert kept(broker, GHOST)
    ticks = EARLY_MESSAGE_TTL_TICKS + 2 * EPOCH_SAVE_INTERVAL_TICKS

    def tick_many() -> None:
        for _ in range(ticks):
            replicas.tick_once()

    broker.call(tick_many)
    assert kept(broker, GHOST) == []


def test_a_replica_that_opens_steps_what_was_kept_for_it(broker: InProcessBroker) -> None:
    """The replica is closed and opened again through the broker's own open path, with a message kept for its
    group meanwhile: a heartbeat of a later term, which the opened node adopts (the one-voter group then elects
    itself again, in a term later still)."""
    Admin(broker.address).create_topic("first", partitions=1)
    replicas = manager(broker)
    assert broker.server is not None
    spec = broker.server.broker.cluster.topics["first"]
    replica = broker.call(lambda: replicas.replica("first", 0))
    group = replica.group  # type: ignore[attr-defined]
    term_before = int(broker.call(lambda: replica.term))  # type: ignore[attr-defined, call-overload]
    broker.call(lambda: replicas.close_partition(spec, 0))
    later = Message(MessageType.HEARTBEAT, 2, 1, term_before + 5)
    broker.call(lambda: replicas.on_raft_messages([(group, later)]))
    assert kept(broker, group) == [later]
    reopened = broker.call(lambda: replicas.open_partition(spec, 0))
    assert reopened is not None and reopened is not replica
    assert int(broker.call(lambda: reopened.term)) >= term_before + 5  # type: ignore[attr-defined, call-overload]
    assert kept(broker, group) == []
