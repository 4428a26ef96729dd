"""Majority arithmetic over a set of voters: commit positions, election results, liveness checks."""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping


class VoteResult(enum.Enum):
    PENDING = "pending"
    WON = "won"
    LOST = "lost"


def majority(voter_count: int) -> int:
    return voter_count // 2 + 1


def committed_offset(voters: Collection[int], match_of: Callable[[int], int]) -> int:
    """The highest offset that a majority of voters hold: the majority-th largest match offset."""
    matches = sorted((match_of(voter) for voter in voters), reverse=True)
    return matches[majority(len(matches)) - 1]


def vote_result(voters: Collection[int], votes: Mapping[int, bool]) -> VoteResult:
    granted = sum(1 for voter in voters if votes.get(voter) is True)
    rejected = sum(1 for voter in voters if votes.get(voter) is False)
    needed = majority(len(voters))
    if granted >= needed:
        return VoteResult.WON
    if rejected > len(voters) - needed:
        return VoteResult.LOST
    return VoteResult.PENDING


def has_quorum(voters: Collection[int], is_active: Callable[[int], bool]) -> bool:
    return sum(1 for voter in voters if is_active(voter)) >= majority(len(voters))
