"""Cluster membership: who votes, who only learns, and how it changes over the log.

Membership changes one node at a time (Raft thesis, section 4.1), through CONFIG entries. A configuration
takes effect on a node as soon as its CONFIG entry is appended to that node's log, committed or not, and is
undone if that entry is truncated; ``ConfigHistory`` keeps enough history to undo.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from logbroker.raft.errors import MembershipChangeError, check


class ChangeKind(enum.Enum):
    ADD_LEARNER = "add_learner"
    PROMOTE_LEARNER = "promote_learner"
    REMOVE_NODE = "remove_node"


@dataclass(frozen=True, slots=True)
class MembershipChange:
    kind: ChangeKind
    node_id: int


@dataclass(frozen=True, slots=True)
class Membership:
    """Voters elect leaders and count toward the commit quorum; learners only receive entries."""

    voters: frozenset[int]
    learners: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        check(bool(self.voters), "a membership needs at least one voter")
        check(not (self.voters & self.learners), "a node cannot be both voter and learner")

    @classmethod
    def of(cls, voters: Iterable[int], learners: Iterable[int] = ()) -> Membership:
        return cls(frozenset(voters), frozenset(learners))

    @property
    def members(self) -> frozenset[int]:
        return self.voters | self.learners

    def apply(self, change: MembershipChange) -> Membership:
        """The membership after ``change``; raises MembershipChangeError when it makes no sense."""
        node = change.node_id
        if change.kind is ChangeKind.ADD_LEARNER:
            if node in self.members:
                raise MembershipChangeError(f"node {node} is already a member")
            return Membership(self.voters, self.learners | {node})
        if change.kind is ChangeKind.PROMOTE_LEARNER:
            if node not in self.learners:
                raise MembershipChangeError(f"node {node} is not a learner")
            return Membership(self.voters | {node}, self.learners - {node})
        if node not in self.members:
            raise MembershipChangeError(f"node {node} is not a member")
        if self.voters == {node}:
            raise MembershipChangeError("cannot remove the last voter")
        return Membership(self.voters - {node}, self.learners - {node})

    def encode(self) -> bytes:
        """The payload of a CONFIG entry: ``v=1,2,3;l=4``. Small, stable and readable in a hex dump."""
        voters = ",".join(str(n) for n in sorted(self.voters))
        learners = ",".join(str(n) for n in sorted(self.learners))
        return f"v={voters};l={learners}".encode("ascii")

    @classmethod
    def decode(cls, payload: bytes) -> Membership:
        parts = dict(part.split("=", 1) for part in payload.decode("ascii").split(";"))
        voters = [int(n) for n in parts["v"].split(",") if n]
        learners = [int(n) for n in parts["l"].split(",") if n]
        return cls(frozenset(voters), frozenset(learners))


class ConfigHistory:
    """The membership in force at the log start, plus every CONFIG entry after it, in offset order."""

    def __init__(self, base: Membership) -> None:
        self._base = base
        self._changes: list[tuple[int, Membership]] = []

    @property
    def current(self) -> Membership:
        return self._changes[-1][1] if self._changes else self._base

    @property
    def last_change_offset(self) -> int | None:
        """Offset of the newest CONFIG entry in the log, or None if the log holds none."""
        return self._changes[-1][0] if self._changes else None

    def at(self, offset: int) -> Membership:
        """The membership in force once the log holds everything up to ``offset``."""
        found = self._base
        for change_offset, membership in self._changes:
            if change_offset > offset:
                break
            found = membership
        return found

    def append(self, offset: int, membership: Membership) -> None:
        check(self._changes == [] or offset > self._changes[-1][0], "CONFIG entries out of order")
        self._changes.append((offset, membership))

    def truncate(self, from_offset: int) -> bool:
        """Forget CONFIG entries at or after ``from_offset``; True if the current membership changed."""
        before = self.current
        while self._changes and self._changes[-1][0] >= from_offset:
            self._changes.pop()
        return self.current != before

    def reset(self, base: Membership) -> None:
        """The log was discarded and restarted; ``base`` is the membership at its new start."""
        self._base = base
        self._changes = []
