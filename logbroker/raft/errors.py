"""Errors raised by the Raft core.

Caller errors (asking a follower to propose, an invalid membership change) get their own exception types so
a runtime can map them to wire error codes. Broken invariants raise ``RaftInternalError``: they mean a bug
in the core or a runtime that broke the Ready contract, and must never be swallowed.
"""

from __future__ import annotations


class RaftError(Exception):
    """Base class of every error the Raft core raises on purpose."""


class NotLeaderError(RaftError):
    """The node is not the leader; ``leader_id`` is the leader it knows of, or None."""

    def __init__(self, leader_id: int | None) -> None:
        super().__init__(f"not the leader (leader is {leader_id})")
        self.leader_id = leader_id


class ProposalDroppedError(RaftError):
    """The leader refused a proposal, e.g. while it is handing leadership over."""


class MembershipChangeError(RaftError):
    """A membership change was refused: another is pending, or the change is invalid right now."""


class LeadershipTransferError(RaftError):
    """A leadership transfer was refused, e.g. to a node that is not a voter."""


class RaftInternalError(AssertionError):
    """An invariant of the Raft core was broken. This is a bug, never an expected condition."""


def check(condition: bool, message: str) -> None:
    """Raise RaftInternalError unless ``condition`` holds; cheaper to read than ``if not ...: raise``.

    The message is built before the call: on paths taken per message or per entry, an f-string message costs
    its formatting every time (an Entry's repr on every follower append), so those raise directly instead."""
    if not condition:
        raise RaftInternalError(message)
