"""Plain data of the Raft core: entries, messages, persistent state, the Ready batch and the config.

Positions are Kafka offsets. An entry is one record batch covering offsets [base_offset, last_offset]; its
``term`` is the batch's leader epoch. Entries are contiguous, so an entry is named by its last offset, and
"the log holds offset o with term t" is how log matching is phrased everywhere in this package.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from logbroker.raft.errors import RaftInternalError, check
from logbroker.raft.membership import Membership

DEFAULT_ELECTION_TICKS = 10
DEFAULT_HEARTBEAT_TICKS = 1
DEFAULT_MAX_MSG_BYTES = 1 << 20
DEFAULT_MAX_INFLIGHT_BYTES = 8 << 20
DEFAULT_MAX_COMMITTED_BYTES_PER_READY = 8 << 20
# Charged per entry on top of its payload, so that byte budgets also bound floods of tiny entries.
ENTRY_OVERHEAD_BYTES = 16
# Term 0 belongs to no leader: it is the term "before" an empty log that starts at offset 0.
NO_TERM = 0


class EntryKind(enum.Enum):
    DATA = "data"
    NOOP = "noop"  # appended by every new leader, so it can commit entries of earlier terms
    CONFIG = "config"  # payload is an encoded Membership


@dataclass(frozen=True, slots=True)
class Entry:
    """A record batch in the Raft log. The payload is opaque to the core except for CONFIG entries."""

    base_offset: int
    last_offset: int
    term: int
    kind: EntryKind
    payload: bytes = b""

    def __post_init__(self) -> None:
        # Plain ifs, not check(): an f-string argument would be formatted for every entry on the hot path.
        if self.last_offset < self.base_offset:
            raise RaftInternalError(f"entry covers no offsets: {self}")
        if self.term <= NO_TERM:
            raise RaftInternalError(f"entry without a term: {self}")

    def __repr__(self) -> str:  # never the payload: it is a whole record batch
        return (f"Entry({self.base_offset}..{self.last_offset} t{self.term} {self.kind.value} "
                f"{len(self.payload)}B)")

    @property
    def record_count(self) -> int:
        return self.last_offset - self.base_offset + 1

    @property
    def size_bytes(self) -> int:
        return len(self.payload) + ENTRY_OVERHEAD_BYTES


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class MessageType(enum.Enum):
    PRE_VOTE = "pre_vote"
    PRE_VOTE_RESP = "pre_vote_resp"
    VOTE = "vote"
    VOTE_RESP = "vote_resp"
    APPEND = "append"
    APPEND_RESP = "append_resp"
    HEARTBEAT = "heartbeat"
    HEARTBEAT_RESP = "heartbeat_resp"
    TIMEOUT_NOW = "timeout_now"  # leadership transfer: "campaign now, skipping pre-vote and leases"
    RESET_LOG = "reset_log"  # "drop your log and restart it at log_start_offset" (catch-up after retention)


@dataclass(frozen=True, slots=True)
class Message:
    """One Raft message. A single flat type (like etcd's raftpb.Message) keeps the wire codec trivial.

    Field use by type:
      PRE_VOTE / VOTE: last_log_offset, last_log_term, leadership_transfer
      *_RESP of votes: reject
      APPEND: prev_last_offset, prev_term, entries, commit_offset
      APPEND_RESP: match_offset on success; on reject, prev_last_offset echoes the rejected position and
        reject_hint_term / reject_hint_offset say where to retry (see RaftNode for the exact rule)
      HEARTBEAT: commit_offset (already capped at what the receiver is known to hold); last_log_offset: the
        leader's own commit offset, uncapped, once its term's first entry is committed (-1 before), which a
        node that lost its log waits for before it votes again (RaftNode.wait_to_catch_up)
      RESET_LOG: log_start_offset, prev_term (term at log_start_offset - 1), membership, commit_offset
    """

    type: MessageType
    from_node: int
    to_node: int
    term: int
    prev_last_offset: int = -1
    prev_term: int = NO_TERM
    entries: tuple[Entry, ...] = ()
    commit_offset: int = -1
    match_offset: int = -1
    reject: bool = False
    reject_hint_offset: int = -1
    reject_hint_term: int = NO_TERM
    last_log_offset: int = -1
    last_log_term: int = NO_TERM
    leadership_transfer: bool = False
    log_start_offset: int = 0
    membership: Membership | None = None

    def __repr__(self) -> str:  # short form for traces
        return describe_message(self)


def describe_message(m: Message) -> str:
    """A one-line human summary of a message, used in simulator traces and test failures."""
    head = f"{m.type.value} {m.from_node}->{m.to_node} t{m.term}"
    if m.type in (MessageType.PRE_VOTE, MessageType.VOTE):
        extra = " transfer" if m.leadership_transfer else ""
        return f"{head} last={m.last_log_offset}/t{m.last_log_term}{extra}"
    if m.type in (MessageType.PRE_VOTE_RESP, MessageType.VOTE_RESP):
        return f"{head} {'reject' if m.reject else 'grant'}"
    if m.type is MessageType.APPEND:
        span = f" [{m.entries[0].base_offset}..{m.entries[-1].last_offset}]" if m.entries else ""
        prev = f"prev={m.prev_last_offset}/t{m.prev_term}"
        return f"{head} {prev} n={len(m.entries)}{span} commit={m.commit_offset}"
    if m.type is MessageType.APPEND_RESP:
        if m.reject:
            return (
                f"{head} reject prev={m.prev_last_offset} hint={m.reject_hint_offset}/t{m.reject_hint_term}"
            )
        return f"{head} match={m.match_offset}"
    if m.type is MessageType.HEARTBEAT:
        return f"{head} commit={m.commit_offset}"
    if m.type is MessageType.RESET_LOG:
        return f"{head} start={m.log_start_offset} prev_term={m.prev_term}"
    return head


@dataclass(frozen=True, slots=True)
class HardState:
    """What must survive a crash, besides the log: the current term, the vote in it, the commit offset, and
    whether the node still waits to catch up (RaftNode.wait_to_catch_up): a node that lost its log and restarts
    with part of it caught up must not take that part for all it once acknowledged."""

    term: int = NO_TERM
    vote: int | None = None
    commit_offset: int = -1
    catching_up: bool = False


@dataclass(frozen=True, slots=True)
class LeaderChange:
    """Reported in a Ready when the node's view of the leader or its own role changed."""

    leader_id: int | None
    role: Role
    term: int


@dataclass(frozen=True, slots=True)
class ResetLog:
    """Discard the whole log; it restarts at ``start_offset``, and offset start_offset - 1 had ``prev_term``.

    ``membership`` is the configuration in force at the new log start; the runtime keeps it and passes it
    back as the base membership when it restarts the node.
    """

    start_offset: int
    prev_term: int
    membership: Membership


@dataclass(frozen=True, slots=True)
class Ready:
    """Everything the node asks the runtime to do, in this order (see node.py for the full contract):

    1. send messages: they may leave at once, before or while step 2 runs (a leader's appends);
    2. persist: apply reset_log, then truncate_from, then append entries; persist hard_state; fsync;
    3. send messages_after_persist, only once step 2 is durable (acknowledgements, vote grants);
    4. apply committed_entries (for a broker: advance the high watermark);
    5. call RaftNode.advance(ready).
    """

    hard_state: HardState | None = None
    reset_log: ResetLog | None = None
    truncate_from: int | None = None
    entries: tuple[Entry, ...] = ()
    messages: tuple[Message, ...] = ()
    messages_after_persist: tuple[Message, ...] = ()
    committed_entries: tuple[Entry, ...] = ()
    leader_change: LeaderChange | None = None

    @property
    def must_persist(self) -> bool:
        """True when step 2 has any work, i.e. an fsync is needed before messages_after_persist may go out."""
        return (
            self.hard_state is not None
            or self.reset_log is not None
            or self.truncate_from is not None
            or bool(self.entries)
        )

    @property
    def all_messages(self) -> tuple[Message, ...]:
        """Both kinds of messages, for a runtime that sends everything after the persist (always correct)."""
        return self.messages + self.messages_after_persist


@dataclass(frozen=True, slots=True)
class RaftConfig:
    """Per-node tuning. Timeouts count ticks, sizes count bytes."""

    node_id: int
    election_timeout_ticks: int = DEFAULT_ELECTION_TICKS
    heartbeat_timeout_ticks: int = DEFAULT_HEARTBEAT_TICKS
    max_msg_bytes: int = DEFAULT_MAX_MSG_BYTES
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES
    max_committed_bytes_per_ready: int = DEFAULT_MAX_COMMITTED_BYTES_PER_READY
    pre_vote: bool = True
    check_quorum: bool = True

    def __post_init__(self) -> None:
        check(self.heartbeat_timeout_ticks >= 1, "heartbeat_timeout_ticks must be >= 1")
        check(
            self.election_timeout_ticks > self.heartbeat_timeout_ticks,
            "election_timeout_ticks must exceed heartbeat_timeout_ticks",
        )
        check(self.max_msg_bytes > 0 and self.max_inflight_bytes > 0, "byte limits must be positive")
