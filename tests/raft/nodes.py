"""Helpers to put one node in a precise state and watch what it answers, for the paper-rule tests."""

from __future__ import annotations

import random
from collections.abc import Sequence

from logbroker.raft.membership import Membership
from logbroker.raft.node import RaftNode
from logbroker.raft.types import Entry, EntryKind, HardState, Message, MessageType, RaftConfig, Ready
from tests.raft.sim.storage import MemoryLogStorage

VOTERS = (1, 2, 3)


def entries_with_terms(terms: Sequence[int], start: int = 0, records: int = 1) -> tuple[Entry, ...]:
    """One entry per term in ``terms``, each of ``records`` records, starting at offset ``start``."""
    found = []
    offset = start
    for index, term in enumerate(terms):
        found.append(Entry(offset, offset + records - 1, term, EntryKind.DATA, f"e{index}t{term}".encode()))
        offset += records
    return tuple(found)


def make_node(
    node_id: int = 1,
    terms: Sequence[int] = (),
    term: int = 0,
    vote: int | None = None,
    commit: int = -1,
    voters: Sequence[int] = VOTERS,
    records: int = 1,
    **config: object,
) -> RaftNode:
    """A node whose durable log holds one entry per element of ``terms``, with the given hard state."""
    membership = Membership.of(voters)
    storage = MemoryLogStorage(membership)
    storage.write_ready(
        Ready(entries=entries_with_terms(terms, records=records), hard_state=HardState(term, vote, commit))
    )
    storage.fsync()
    cfg = RaftConfig(node_id=node_id, **config)  # type: ignore[arg-type]
    return RaftNode(cfg, storage, random.Random(node_id), membership, storage.durable_hard_state)


def drain(node: RaftNode) -> Ready | None:
    """Take the node's Ready and carry it out against its MemoryLogStorage, as a runtime would."""
    ready = node.ready()
    if ready is None:
        return None
    storage = node.log._storage
    assert isinstance(storage, MemoryLogStorage)
    storage.write_ready(ready)
    storage.fsync()
    if ready.entries:
        node.persisted(ready.entries[-1].last_offset, ready.entries[-1].term)
    node.advance(ready)
    return ready


def answer(node: RaftNode, m: Message) -> list[Message]:
    """Step ``m`` into the node and return the messages it sends in reply."""
    node.step(m)
    ready = drain(node)
    return list(ready.all_messages) if ready is not None else []


def only(messages: list[Message]) -> Message:
    assert len(messages) == 1, messages
    return messages[0]


def vote_request(
    from_node: int, term: int, last_offset: int, last_term: int, to_node: int = 1, pre: bool = False
) -> Message:
    kind = MessageType.PRE_VOTE if pre else MessageType.VOTE
    return Message(kind, from_node, to_node, term, last_log_offset=last_offset, last_log_term=last_term)


def append(
    from_node: int,
    term: int,
    prev: int,
    prev_term: int,
    entries: Sequence[Entry] = (),
    commit: int = -1,
    to_node: int = 1,
) -> Message:
    return Message(
        MessageType.APPEND,
        from_node,
        to_node,
        term,
        prev_last_offset=prev,
        prev_term=prev_term,
        entries=tuple(entries),
        commit_offset=commit,
    )
