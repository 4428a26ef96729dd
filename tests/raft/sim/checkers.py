"""Safety invariants of Raft, checked by the simulator after every step and every persisted Ready.

Most checks are incremental (they look at what a Ready changes) so that they can run all the time:
  - election safety: at most one leader per term
  - log matching: an entry named by (last offset, term) has the same content and the same predecessor
    term on every node, which by induction makes logs identical up to any shared (offset, term)
  - leader completeness: a leader of term T holds every entry committed in a term before T
  - state machine safety: a committed offset never holds two different entries across nodes or time,
    and no node ever cuts (truncate or reset) an entry it holds that is committed
  - durable state: a node's term never decreases, its vote never changes within a term, its commit
    offset never decreases, across crashes and restarts
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from logbroker.raft.node import RaftNode
from logbroker.raft.types import Entry, EntryKind, Ready, Role
from tests.raft.sim.storage import MemoryLogStorage


class InvariantViolation(Exception):
    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail


@dataclass(frozen=True)
class _Committed:
    base_offset: int
    term: int
    payload: bytes
    kind: EntryKind


class Checkers:
    def __init__(self) -> None:
        self.leader_of_term: dict[int, int] = {}
        self.committed: dict[int, _Committed] = {}  # keyed by last_offset
        self.max_committed_offset = -1
        # For leader completeness: per term in which commits were observed, the highest such offset.
        self.committed_high_by_term: dict[int, int] = {}
        self.entry_identity: dict[tuple[int, int], tuple[int, EntryKind, bytes, int | None]] = {}
        self.durable_term: dict[int, tuple[int, int | None]] = {}
        self.durable_commit: dict[int, int] = {}
        self._prev_term_at_write: dict[int, int | None] = {}

    # ---------------------------------------------------------------------------- per Ready
    def before_write(self, node_id: int, storage: MemoryLogStorage, ready: Ready) -> None:
        """Before the runtime applies a reset or truncation: it must not cut a committed entry."""
        cut_from = None
        if ready.reset_log is not None:
            # Entries below the new start were deleted by retention on the leader: committed, and gone.
            cut_from = ready.reset_log.start_offset
        if ready.truncate_from is not None:
            cut_from = ready.truncate_from if cut_from is None else min(cut_from, ready.truncate_from)
        if cut_from is None or cut_from > self.max_committed_offset or cut_from > storage.last_offset:
            return
        for entry in storage.entries(cut_from, 1 << 62):
            if entry.last_offset > self.max_committed_offset:
                break
            known = self.committed.get(entry.last_offset)
            if known is not None and known.term == entry.term and entry.base_offset >= cut_from:
                raise InvariantViolation(
                    "committed entry lost",
                    f"node {node_id} cuts its log at {cut_from}, dropping committed entry "
                    f"[{entry.base_offset}..{entry.last_offset}] of term {entry.term}",
                )

    def on_write(self, node_id: int, node: RaftNode, ready: Ready) -> None:
        """The runtime writes the Ready now; its fsync may end later, when the node's log may have moved on
        (a reset stepped in meanwhile), so the term before its first entry is taken now."""
        if ready.entries:
            self._prev_term_at_write[node_id] = node.log.term_at(ready.entries[0].base_offset - 1)

    def after_persist(self, node_id: int, node: RaftNode, ready: Ready) -> None:
        self._check_hard_state(node_id, ready)
        prev_term = self._prev_term_at_write.pop(node_id, None)
        for entry in ready.entries:
            self._check_log_matching(node_id, entry, prev_term)
            prev_term = entry.term

    def _check_hard_state(self, node_id: int, ready: Ready) -> None:
        state = ready.hard_state
        if state is None:
            return
        term, vote = self.durable_term.get(node_id, (0, None))
        if state.term < term:
            raise InvariantViolation(
                "term decreased", f"node {node_id} persisted term {state.term} after {term}"
            )
        if state.term == term and vote is not None and state.vote != vote:
            raise InvariantViolation(
                "vote changed", f"node {node_id} voted for {vote} and then {state.vote} in term {term}"
            )
        self.durable_term[node_id] = (state.term, state.vote)
        previous_commit = self.durable_commit.get(node_id, -1)
        if state.commit_offset < previous_commit:
            raise InvariantViolation(
                "commit decreased",
                f"node {node_id} persisted commit {state.commit_offset} after {previous_commit}",
            )
        self.durable_commit[node_id] = state.commit_offset

    def _check_log_matching(self, node_id: int, entry: Entry, prev_term: int | None) -> None:
        key = (entry.last_offset, entry.term)
        identity = (entry.base_offset, entry.kind, entry.payload, prev_term)
        known = self.entry_identity.setdefault(key, identity)
        if known != identity:
            raise InvariantViolation(
                "log matching",
                f"node {node_id} holds entry ending at {entry.last_offset} of term {entry.term} as "
                f"{identity[:2]}+prev term {identity[3]}, another node as {known[:2]}+prev term {known[3]}",
            )

    def on_committed(self, node_id: int, node: RaftNode, entries: Iterable[Entry]) -> None:
        for entry in entries:
            record = _Committed(entry.base_offset, entry.term, entry.payload, entry.kind)
            known = self.committed.setdefault(entry.last_offset, record)
            if known != record:
                raise InvariantViolation(
                    "committed entry changed",
                    f"node {node_id} committed {record} at offset {entry.last_offset}, "
                    f"but {known} was committed there before",
                )
            if known is record:
                self.max_committed_offset = max(self.max_committed_offset, entry.last_offset)
                high = self.committed_high_by_term.get(node.term, -1)
                self.committed_high_by_term[node.term] = max(high, entry.last_offset)

    # ---------------------------------------------------------------------------- per step
    def after_step(self, nodes: dict[int, RaftNode]) -> None:
        for node_id, node in nodes.items():
            if node.role is Role.LEADER:
                self._check_election_safety(node_id, node)
                self._check_leader_completeness(node_id, node)

    def _check_election_safety(self, node_id: int, node: RaftNode) -> None:
        leader = self.leader_of_term.setdefault(node.term, node_id)
        if leader != node_id:
            raise InvariantViolation(
                "election safety", f"nodes {leader} and {node_id} both lead term {node.term}"
            )

    def _check_leader_completeness(self, node_id: int, node: RaftNode) -> None:
        for term, offset in self.committed_high_by_term.items():
            if term >= node.term or offset < node.log.first_offset - 1:
                continue
            expected = self.committed[offset].term
            if node.log.term_at(offset) != expected:
                raise InvariantViolation(
                    "leader completeness",
                    f"leader {node_id} of term {node.term} lacks entry at {offset} (term {expected}) "
                    f"committed in term {term}; it has term {node.log.term_at(offset)} there",
                )

    def on_log_cut(self, node_id: int, last_offset: int) -> None:
        """Recovery cut the node's log after last_offset. Its commit offset, volatile in Raft, comes back no
        higher than that, so it may persist a lower one than before; everything else still holds."""
        self.durable_commit[node_id] = min(self.durable_commit.get(node_id, -1), last_offset)

    def on_restart(self, node_id: int, node: RaftNode) -> None:
        """A restarted node's durable log must still hold what it had committed."""
        commit = node.commit_offset
        known = self.committed.get(commit)
        if known is not None and commit >= node.log.first_offset and node.log.term_at(commit) != known.term:
            raise InvariantViolation(
                "committed entry lost",
                f"node {node_id} restarted with commit {commit} but without the committed entry there",
            )
