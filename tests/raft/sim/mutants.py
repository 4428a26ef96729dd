"""Deliberately broken Raft nodes. The simulator must catch each of them; tests prove it does.

Each mutant removes one safety rule from RaftNode by overriding the single method that enforces it.
"""

from __future__ import annotations

from logbroker.raft.node import RaftNode
from logbroker.raft.quorum import committed_offset
from logbroker.raft.types import HardState, Message, MessageType, Role


class VoteWithoutLogCheck(RaftNode):
    """Grants (pre-)votes without Raft §5.4.1's check that the candidate's log is at least as up to date,
    so a node missing committed entries can win and overwrite them."""

    def _log_is_up_to_date(self, last_offset: int, last_term: int) -> bool:
        return True


class CommitPreviousTermByCounting(RaftNode):
    """Commits any entry a majority holds, even one from an earlier term: the bug of the paper's Figure 8."""

    def _maybe_commit(self) -> None:
        if self.role is not Role.LEADER:
            return
        self._progress[self.id].match_offset = self.log.durable_offset
        candidate = committed_offset(self.membership.voters, self._match_of)
        if candidate > self.commit_offset:
            self.commit_offset = candidate


class UncappedHeartbeatCommit(RaftNode):
    """Heartbeats carry the leader's full commit offset instead of capping it at what the follower is known
    to hold, so a follower with a stale divergent tail marks entries committed that are not."""

    def _broadcast_heartbeat(self) -> None:
        for node in sorted(self._progress):
            if node != self.id:
                self._send(MessageType.HEARTBEAT, node, commit_offset=self.commit_offset)


class AnswerBeforePersist(RaftNode):
    """Every message may leave before the persist: a follower acknowledges entries, and a voter grants its
    vote, before they are durable, so a crash in the middle of its fsync takes back what it promised.

    (A leader counting its own entries before persisted() reports them is no mutant here: a commit reaches
    a Ready only after the Ready that wrote those entries is persisted, so no runtime that handles one Ready
    at a time can tell the difference. tests/raft/test_paper_rules.py checks the rule directly.)"""

    def _split_outbox(self, hard_state: HardState) -> tuple[tuple[Message, ...], tuple[Message, ...]]:
        return tuple(self._outbox), ()


MUTANTS: dict[str, type[RaftNode]] = {
    "vote-without-log-check": VoteWithoutLogCheck,
    "commit-previous-term": CommitPreviousTermByCounting,
    "uncapped-heartbeat-commit": UncappedHeartbeatCommit,
    "answer-before-persist": AnswerBeforePersist,
}
