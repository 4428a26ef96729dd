"""RaftNode: one replica of one Raft group, as a pure deterministic state machine.

Inputs are method calls: step(message), tick(), propose(...), propose_membership_change(...),
transfer_leadership(...), persisted(...). The node never does I/O; everything it wants done comes out
of ready() as a Ready, which the runtime carries out and acknowledges with advance().

THE READY CONTRACT (etcd's, with messages-after-append; Raft thesis 10.2.1). For each Ready, the runtime
must, in this order:
  1. Send ``messages``. They may leave at once, before the persist of step 2 starts or while it runs: they
     are a leader's own messages (APPEND, HEARTBEAT, RESET_LOG, TIMEOUT_NOW) and a follower's heartbeat
     answers (HEARTBEAT_RESP, which acknowledge nothing), in a term that is already durable, so a leader
     replicates its new entries while it writes them itself.
  2. Persist. Apply ``reset_log`` (discard the whole log, restart it empty at reset_log.start_offset and
     remember reset_log.prev_term and reset_log.membership), then cut the log at ``truncate_from``, then
     append ``entries``, and store ``hard_state`` (term, vote, commit, catching_up). fsync all of it.
  3. Send ``messages_after_persist``, only once step 2 is durable: acknowledgements, vote grants and every
     message of a Ready that changes the term or vote rely on it. Term and vote are always in the
     hard_state of the Ready whose messages depend on them, or of an earlier one.
  4. Apply ``committed_entries`` (for the broker: advance the high watermark). They are always already
     in the log, in this Ready or an earlier one.
  5. Call advance(ready). Call ready() again only after that; step(), tick() and propose() may be called at
     any time, also while steps 1-3 run, and so may take_messages_before_persist(), whose messages (those of
     step 1's kind, in a term and vote already durable) may leave at once.
Call persisted(last_offset, term) once the log is durable up to last_offset (after step 2 is the simplest).
The leader counts its own log toward the commit quorum only up to what persisted() has reported, so an
entry it has sent but not yet fsynced commits only on a majority of others; followers acknowledge entries
only in messages_after_persist. has_ready() only looks: it changes no state.

On restart, build a new RaftNode over the durable storage with the durable hard state and the base
membership (the bootstrap membership, or the last reset_log.membership the runtime stored).

Positions are offsets: entries cover [base_offset, last_offset], and a position in the log is named by
an entry's last_offset. Commit and match offsets always fall on entry ends.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from logbroker.raft.errors import (
    LeadershipTransferError,
    MembershipChangeError,
    NotLeaderError,
    ProposalDroppedError,
    RaftInternalError,
    check,
)
from logbroker.raft.log import RaftLog
from logbroker.raft.membership import ChangeKind, ConfigHistory, Membership, MembershipChange
from logbroker.raft.progress import Progress, ProgressState
from logbroker.raft.quorum import VoteResult, committed_offset, has_quorum, vote_result
from logbroker.raft.storage import LogStorage
from logbroker.raft.types import (
    NO_TERM,
    Entry,
    EntryKind,
    HardState,
    LeaderChange,
    Message,
    MessageType,
    RaftConfig,
    Ready,
    Role,
)

# Messages through which a leader of their term speaks; receiving one means "this node is the leader".
_LEADER_MESSAGES = (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.RESET_LOG)
# Messages that may leave before the Ready that holds them is persisted (see ready()): a leader's own, and a
# follower's heartbeat answers, which promise nothing (etcd sends them at once too). Held behind a follower's
# fsyncs, the answers of a busy follower (thousands of groups electing after a broker died) reached their
# leaders after the election timeout, and check-quorum made the new leaders step down again.
_SEND_BEFORE_PERSIST = frozenset(
    (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.RESET_LOG, MessageType.TIMEOUT_NOW,
     MessageType.HEARTBEAT_RESP)
)
# Chunk size for scanning the log for CONFIG entries on restart.
_SCAN_CHUNK_BYTES = 1 << 20


class RaftNode:
    def __init__(
        self,
        config: RaftConfig,
        storage: LogStorage,
        rng: random.Random,
        membership: Membership,
        hard_state: HardState | None = None,
        applied_offset: int | None = None,
    ) -> None:
        """``membership`` is the configuration in force at the start of ``storage``'s log; CONFIG
        entries found in the log override it."""
        state = hard_state if hard_state is not None else HardState()
        self.id = config.node_id
        self.config = config
        self._rng = rng
        self.log = RaftLog(storage)
        self.term = state.term
        self.vote = state.vote
        check(
            state.commit_offset <= self.log.last_offset,
            f"hard state commits {state.commit_offset} but the log ends at {self.log.last_offset}",
        )
        self.commit_offset = max(state.commit_offset, self.log.first_offset - 1)
        self.applied_offset = self.commit_offset if applied_offset is None else applied_offset
        self._configs = ConfigHistory(membership)
        self._load_config_entries()

        self.role = Role.FOLLOWER
        self.leader_id: int | None = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = 0
        self._votes: dict[int, bool] = {}
        self._progress: dict[int, Progress] = {}
        self._lead_transferee: int | None = None
        self._term_start_offset = -1  # offset of this leader's NOOP entry
        self._outbox: list[Message] = []
        self._dirty: set[int] = set()  # followers that may have entries to send
        self._catching_up = state.catching_up  # see wait_to_catch_up; kept across restarts until caught up
        self.vote_while_catching_up_for: int | None = None  # see wait_to_catch_up: set by the runtime, never saved
        self._last_hard_state = HardState(self.term, self.vote, self.commit_offset, self._catching_up)
        self._durable_term_vote = (self.term, self.vote)  # as of the last Ready carried out (advance())
        self._last_leader_change: tuple[int | None, Role] = (None, Role.FOLLOWER)
        self._ready_outstanding = False
        # (Pre-)vote requests ignored within the leader's lease, by sender: stepped again by leader_lost.
        self._ignored_in_lease: dict[int, Message] = {}
        self._reset_randomized_timeout()

    def _load_config_entries(self) -> None:
        first, last = self.log.first_offset, self.log.last_offset
        if first > last:
            return
        for entry in self.log.iter_entries(first, last, _SCAN_CHUNK_BYTES):
            if entry.kind is EntryKind.CONFIG:
                self._configs.append(entry.last_offset, Membership.decode(entry.payload))

    # ================================================================================ public queries
    @property
    def membership(self) -> Membership:
        return self._configs.current

    def membership_at(self, offset: int) -> Membership:
        """Membership in force once the log holds up to ``offset``; e.g. to store at a retention cut."""
        return self._configs.at(offset)

    @property
    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.commit_offset, self._catching_up)

    @property
    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    @property
    def lead_transferee(self) -> int | None:
        return self._lead_transferee

    def progress(self, node_id: int) -> Progress | None:
        """The leader's replication progress of ``node_id`` (None on non-leaders); for tests and metrics."""
        return self._progress.get(node_id)

    def _promotable(self) -> bool:
        return self.id in self.membership.voters and not self._catching_up

    def wait_to_catch_up(self) -> None:
        """This node once held the group's log and Raft state and lost them (a wiped or replaced disk): until
        its log holds a leader's commit offset, it neither votes nor campaigns. Raft assumes a voter keeps
        what it acknowledged; one that forgot could vote in a leader that lacks committed entries, which
        would then cut them from the replicas that kept them. Appends it still acknowledges (it holds them).
        Part of the hard state: saved with (or before) the first append it acknowledges, so a restart half-way
        through its catch-up still waits.

        One vote stays safe meanwhile, and the runtime names it in vote_while_catching_up_for: in a group that has
        had the same two voters since its first entry, every entry ever committed was acknowledged by both, so
        the other voter holds all of them and may be elected with this node's vote. Without it such a group, one
        of whose two replicas lost its disk, could elect nobody: the other needs this vote."""
        self._catching_up = True

    def stop_waiting_to_catch_up(self) -> None:
        """The runtime knows this node never acknowledged anything in its group (a cluster's very first start, told
        apart by the runtime): its empty log may vote again."""
        self._catching_up = False

    @property
    def catching_up(self) -> bool:
        return self._catching_up

    def _note_leader_commit(self, leader_commit: int) -> None:
        """A catching-up node that holds the leader's commit offset holds every committed entry: the leader
        only reports it once its own term's first entry is committed, which commits everything before."""
        if self._catching_up and 0 <= leader_commit <= self.log.last_offset:
            self._catching_up = False

    # ================================================================================ inputs
    def tick(self) -> None:
        """Advance the logical clock by one tick."""
        if self.role is Role.LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def propose(self, payload: bytes, record_count: int) -> Entry:
        """Append a DATA entry of ``record_count`` records; returns it with its offsets and term."""
        check(record_count >= 1, "an entry holds at least one record")
        self._require_leader_accepting()
        entry = self._new_entry(EntryKind.DATA, payload, record_count)
        self._append_as_leader(entry)
        return entry

    def propose_membership_change(self, change: MembershipChange) -> Entry:
        """Append a CONFIG entry adding a learner, promoting a learner, or removing one node.

        Refused while an earlier change is uncommitted, before this leader has committed an entry of its
        own term (the fix to single-server changes from the Raft mailing list), when promoting a learner
        that is not caught up, and when removing the leader itself (transfer leadership first).
        """
        self._require_leader_accepting()
        pending = self._configs.last_change_offset
        if pending is not None and pending > self.commit_offset:
            raise MembershipChangeError("an earlier membership change is not committed yet")
        if self.commit_offset < self._term_start_offset:
            raise MembershipChangeError("the leader has not committed an entry of its term yet")
        if change.kind is ChangeKind.REMOVE_NODE and change.node_id == self.id:
            raise MembershipChangeError("transfer leadership away before removing the leader")
        new_membership = self.membership.apply(change)
        if change.kind is ChangeKind.PROMOTE_LEARNER:
            learner = self._progress[change.node_id]
            if learner.match_offset < self.commit_offset:
                raise MembershipChangeError(f"learner {change.node_id} has not caught up yet")
        entry = self._new_entry(EntryKind.CONFIG, new_membership.encode(), 1)
        self._append_as_leader(entry)
        return entry

    @property
    def leader_caught_up(self) -> bool:
        """A leader that has committed and applied its own term's first entry, and so everything committed in
        earlier terms: until then its state machine may lack commands an earlier leader had committed."""
        return (self.role is Role.LEADER and self.commit_offset >= self._term_start_offset
                and self.applied_offset >= self._term_start_offset)

    def campaign(self, pre_vote: bool = True) -> None:
        """Start an election now instead of after the election timeout, if this node follows no known leader:
        the runtime knows the group needs one (a new group's picked first leader). pre_vote=False skips the
        pre-vote round where the runtime knows there is no leader to disrupt (a group that never had one);
        otherwise as configured."""
        if self.role is not Role.FOLLOWER or self.leader_id is not None or not self._promotable():
            return  # already electing, or a leader is known: nothing to start
        self._campaign(pre_vote=pre_vote and self.config.pre_vote, transfer=False)

    def leader_lost(self, leader_id: int, campaign: bool, pre_vote: bool = True) -> None:
        """The runtime learned out of band that ``leader_id`` is gone (its broker stopped answering everything).

        A follower of it forgets it, so its lease no longer holds and it grants another candidate's vote at once,
        and then either campaigns now (``campaign``: the runtime picked this node as the group's successor, the
        same pick on every survivor) or waits two to three election timeouts first, so that the picked
        successor's campaign meets no rival and no split vote, while a successor that cannot win is still
        replaced. Thousands of groups losing their leader at once elect in one round this way instead of
        colliding for many. Only soft state changes (no term, vote or log), except through the vote requests the
        lease made this node ignore, which are stepped again now that it no longer holds.

        pre_vote=False (the runtime sees a majority of the voters' brokers alive) lets the successor ask for
        votes at once: pre-vote keeps a node cut off from the others from raising its term, and such a node
        sees no live majority. A survivor that has not heard the news yet ignores the request in its lease
        and answers it when the news arrives (above), as it would a pre-vote."""
        if self.role is not Role.FOLLOWER or self.leader_id != leader_id:
            return  # already electing, or following someone else: this news is not about us
        self.leader_id = None
        ignored, self._ignored_in_lease = self._ignored_in_lease, {}
        if campaign and self._promotable():
            self._campaign(pre_vote=pre_vote and self.config.pre_vote, transfer=False)
        else:
            timeout = self.config.election_timeout_ticks
            self._election_elapsed = 0
            self._randomized_timeout = 2 * timeout + self._rng.randrange(timeout)
        # The successor's request, if it came before this news (its broker noticed the death a moment sooner),
        # was ignored in the lease that no longer holds: answer it now. A stale one is answered as stale.
        for request in ignored.values():
            self.step(request)

    def transfer_leadership(self, to_node: int) -> None:
        """Hand leadership to ``to_node`` once it has caught up; proposals are refused meanwhile."""
        if self.role is not Role.LEADER:
            raise NotLeaderError(self.leader_id)
        if to_node == self.id:
            return
        if to_node not in self.membership.voters:
            raise LeadershipTransferError(f"node {to_node} is not a voter")
        self._lead_transferee = to_node
        self._election_elapsed = 0  # the transfer is abandoned after one election timeout
        if self._progress[to_node].match_offset == self.log.last_offset:
            self._send(MessageType.TIMEOUT_NOW, to_node)
        else:
            self._dirty.add(to_node)

    def persisted(self, last_offset: int, term: int) -> None:
        """The runtime made the log durable up to ``last_offset``, whose entry has ``term``."""
        if self.log.mark_durable(last_offset, term) and self.role is Role.LEADER:
            self._maybe_commit()

    def step(self, m: Message) -> None:
        """Handle one message addressed to this node."""
        if m.to_node != self.id:
            raise RaftInternalError(f"message for node {m.to_node} stepped into node {self.id}")
        if m.term > self.term:
            if not self._accept_higher_term(m):
                return
        elif m.term < self.term:
            self._answer_stale(m)
            return
        if m.type in (MessageType.PRE_VOTE, MessageType.VOTE):
            self._handle_vote_request(m)
        elif self.role is Role.LEADER:
            self._step_leader(m)
        elif self.role is Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    # ================================================================================ output
    def has_ready(self) -> bool:
        """Whether ready() would return a Ready. Changes no state (appends are prepared only by ready()).

        Asked after every message a broker's thousands of groups receive, so it builds nothing: the hard state
        is compared field by field, and the log's start is read only when something is committed but not
        applied (otherwise the next entry to apply, past applied_offset, is past the commit offset)."""
        saved = self._last_hard_state
        return (
            bool(self._outbox)
            or self._has_appends_to_send()
            or self.log.has_unstable()
            or self.term != saved.term or self.vote != saved.vote or self.commit_offset != saved.commit_offset
            or self._catching_up is not saved.catching_up
            or (self.leader_id, self.role) != self._last_leader_change
            or (self.commit_offset > self.applied_offset and self._next_committed_offset() <= self.commit_offset)
        )

    def ready(self) -> Ready | None:
        """The next batch of work for the runtime, or None if there is none. See the module docstring."""
        check(not self._ready_outstanding, "ready() called again before advance() of the previous Ready")
        self._flush_appends()
        if not self.has_ready():
            return None
        hard_state = self.hard_state
        reset, truncate_from, entries = self.log.take_unstable()
        soft = (self.leader_id, self.role)
        now, after = self._split_outbox(hard_state)
        ready = Ready(
            hard_state=hard_state if hard_state != self._last_hard_state else None,
            reset_log=reset,
            truncate_from=truncate_from,
            entries=entries,
            messages=now,
            messages_after_persist=after,
            committed_entries=self._committed_to_apply(),
            leader_change=LeaderChange(soft[0], soft[1], self.term)
            if soft != self._last_leader_change
            else None,
        )
        self._outbox = []
        self._last_hard_state = hard_state
        self._last_leader_change = soft
        self._ready_outstanding = True
        return ready

    def take_messages_before_persist(self) -> tuple[Message, ...]:
        """The messages that may leave before any persist (_SEND_BEFORE_PERSIST), taken out of the next Ready:
        for a runtime whose Ready is still being persisted, so that a follower answers heartbeats while its
        fsyncs queue (a leader that hears nothing for an election timeout steps down). None while the term or
        vote differs from what the last carried-out Ready made durable: then everything waits, as in ready()."""
        if (self.term, self.vote) != self._durable_term_vote or not self._outbox:
            return ()
        early = tuple(m for m in self._outbox if m.type in _SEND_BEFORE_PERSIST)
        if early:
            self._outbox = [m for m in self._outbox if m.type not in _SEND_BEFORE_PERSIST]
        return early

    def _split_outbox(self, hard_state: HardState) -> tuple[tuple[Message, ...], tuple[Message, ...]]:
        """(messages that may go before the persist, messages that must wait for it).

        Every earlier Ready is durable by now (ready() follows advance()). A leader's own messages depend on
        nothing this Ready persists, unless it changes the term or vote: a leader's term is durable before
        anyone votes for it (vote requests wait for the persist), except for a group of one voter, whose
        candidate wins alone in the Ready that persists its term. Everything else (acknowledgements, votes,
        vote requests, answers to stale nodes) waits for the persist; a heartbeat answer does not.
        """
        last = self._last_hard_state
        if (hard_state.term, hard_state.vote) != (last.term, last.vote):
            return (), tuple(self._outbox)
        now = tuple(m for m in self._outbox if m.type in _SEND_BEFORE_PERSIST)
        if len(now) == len(self._outbox):
            return now, ()
        return now, tuple(m for m in self._outbox if m.type not in _SEND_BEFORE_PERSIST)

    def advance(self, ready: Ready) -> None:
        """The runtime has carried out ``ready`` (persisted, sent, applied)."""
        check(self._ready_outstanding, "advance() without an outstanding Ready")
        self._ready_outstanding = False
        self._durable_term_vote = (self._last_hard_state.term, self._last_hard_state.vote)
        self.log.advance(ready.reset_log)
        if ready.committed_entries:
            self.applied_offset = max(self.applied_offset, ready.committed_entries[-1].last_offset)

    def _next_committed_offset(self) -> int:
        return max(self.applied_offset + 1, self.log.first_offset)

    def _committed_to_apply(self) -> tuple[Entry, ...]:
        start = self._next_committed_offset()
        if start > self.commit_offset:
            return ()
        found: list[Entry] = []
        budget = self.config.max_committed_bytes_per_ready
        for entry in self.log.entries(start, budget):
            if entry.last_offset > self.commit_offset:
                break
            found.append(entry)
        return tuple(found)

    # ================================================================================ terms and roles
    def _accept_higher_term(self, m: Message) -> bool:
        """React to a message from a later term; False means ignore the message entirely."""
        if (
            m.type in (MessageType.PRE_VOTE, MessageType.VOTE)
            and self._in_leader_lease()
            and not (m.leadership_transfer)
        ):
            # We heard from a live leader within the election timeout: a node that has lost touch with it
            # must not depose it (check-quorum's lease). Ignoring, not rejecting, keeps our term unchanged.
            # Kept, though: if the runtime then learns the leader is gone (leader_lost), the request is answered
            # at once, not only at the candidate's next campaign an election timeout later.
            self._ignored_in_lease[m.from_node] = m
            return False
        if m.type is MessageType.PRE_VOTE:
            return True  # a pre-vote never changes our term
        if m.type is MessageType.PRE_VOTE_RESP and not m.reject:
            return True  # a granted pre-vote carries the term we would campaign in; we adopt it on winning
        leader = m.from_node if m.type in _LEADER_MESSAGES else None
        self._become_follower(m.term, leader)
        return True

    def _in_leader_lease(self) -> bool:
        return (
            self.config.check_quorum
            and self.leader_id is not None
            and self._election_elapsed < self.config.election_timeout_ticks
        )

    def _answer_stale(self, m: Message) -> None:
        """A message from an older term. Tell stale leaders and pre-candidates our term; drop the rest."""
        if m.type in (MessageType.APPEND, MessageType.HEARTBEAT):
            # Without this, a leader partitioned away could never learn it was replaced, since with
            # pre-vote we never start a real election to tell it.
            # The answer carries no position (match -1), so it can never move the leader's progress.
            self._send(MessageType.APPEND_RESP, m.from_node)
        elif m.type in (MessageType.PRE_VOTE, MessageType.VOTE):
            response = MessageType.VOTE_RESP if m.type is MessageType.VOTE else MessageType.PRE_VOTE_RESP
            self._send(response, m.from_node, reject=True)

    def _reset(self, term: int) -> None:
        if term != self.term:
            if term < self.term:
                raise RaftInternalError(f"term going back from {self.term} to {term}")
            self.term = term
            self.vote = None
        self.leader_id = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._reset_randomized_timeout()
        self._votes = {}
        self._progress = {}
        self._dirty = set()
        self._lead_transferee = None

    def _reset_randomized_timeout(self) -> None:
        timeout = self.config.election_timeout_ticks
        self._randomized_timeout = timeout + self._rng.randrange(timeout)

    def _become_follower(self, term: int, leader_id: int | None) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader_id = leader_id

    def _become_pre_candidate(self) -> None:
        # Unlike a candidate, a pre-candidate changes neither term nor vote: losing costs nothing.
        self._reset(self.term)
        self.role = Role.PRE_CANDIDATE

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE

    def _become_leader(self) -> None:
        check(self.role is Role.CANDIDATE, "only a candidate becomes leader")
        self._reset(self.term)
        self.role = Role.LEADER
        self.leader_id = self.id
        for node in self.membership.members | {self.id}:
            self._add_progress(node)
        noop = self._new_entry(EntryKind.NOOP, b"", 1)
        self._term_start_offset = noop.last_offset
        self._append_as_leader(noop)

    def _add_progress(self, node: int) -> None:
        last = self.log.last_offset
        learner = node in self.membership.learners
        progress = Progress(match_offset=-1, next_offset=last + 1, is_learner=learner)
        if node == self.id:
            progress.match_offset = self.log.durable_offset
            progress.recent_active = True
            progress.become_replicate()
        self._progress[node] = progress

    # ================================================================================ elections
    def _tick_election(self) -> None:
        self._election_elapsed += 1
        # The timeout first: it is cheap and almost always false, and every awake follower ticks 20 times a second.
        if self._election_elapsed >= self._randomized_timeout and self._promotable():
            self._campaign(pre_vote=self.config.pre_vote, transfer=False)

    def _campaign(self, pre_vote: bool, transfer: bool) -> None:
        if pre_vote:
            self._become_pre_candidate()
            kind, term = MessageType.PRE_VOTE, self.term + 1
        else:
            self._become_candidate()
            kind, term = MessageType.VOTE, self.term
        self._votes[self.id] = True
        if self._tally_votes():
            return
        for node in sorted(self.membership.voters - {self.id}):
            self._outbox.append(
                Message(
                    kind,
                    self.id,
                    node,
                    term,
                    last_log_offset=self.log.last_offset,
                    last_log_term=self.log.last_term,
                    leadership_transfer=transfer,
                )
            )

    def _tally_votes(self) -> bool:
        """Act on the election result so far; True once the election is decided."""
        result = vote_result(self.membership.voters, self._votes)
        if result is VoteResult.WON:
            if self.role is Role.PRE_CANDIDATE:
                self._campaign(pre_vote=False, transfer=False)
            else:
                self._become_leader()
            return True
        if result is VoteResult.LOST:
            self._become_follower(self.term, None)
            return True
        return False

    def _log_is_up_to_date(self, last_offset: int, last_term: int) -> bool:
        """Raft §5.4.1: the later last term wins; with equal last terms, the longer log."""
        my_term = self.log.last_term
        return last_term > my_term or (last_term == my_term and last_offset >= self.log.last_offset)

    def _handle_vote_request(self, m: Message) -> None:
        if self._catching_up and m.from_node != self.vote_while_catching_up_for:
            can_vote = False  # our log may lack what we once acknowledged (wait_to_catch_up)
        elif m.type is MessageType.VOTE:
            # One vote per term, and none while we know a leader of this term.
            can_vote = self.vote == m.from_node or (self.vote is None and self.leader_id is None)
        else:
            # A pre-vote for a later term commits us to nothing, so only the log matters.
            can_vote = m.term > self.term
        response = MessageType.VOTE_RESP if m.type is MessageType.VOTE else MessageType.PRE_VOTE_RESP
        if can_vote and self._log_is_up_to_date(m.last_log_offset, m.last_log_term):
            # Answer in the candidate's term, so the grant counts in the election it was asked for.
            self._outbox.append(Message(response, self.id, m.from_node, m.term))
            if m.type is MessageType.VOTE:
                self.vote = m.from_node
                self._election_elapsed = 0
        else:
            self._outbox.append(Message(response, self.id, m.from_node, self.term, reject=True))

    def _step_candidate(self, m: Message) -> None:
        if m.type in _LEADER_MESSAGES:
            # Someone won this term (for a pre-candidate: our current term); follow it.
            self._become_follower(self.term, m.from_node)
            self._step_follower(m)
            return
        expected = MessageType.PRE_VOTE_RESP if self.role is Role.PRE_CANDIDATE else MessageType.VOTE_RESP
        if m.type is not expected:
            return
        # A granted pre-vote is answered in the term we asked for, i.e. ours + 1; refusals in ours.
        if self.role is Role.PRE_CANDIDATE and not m.reject and m.term != self.term + 1:
            return
        self._votes[m.from_node] = not m.reject
        self._tally_votes()

    # ================================================================================ follower
    def _step_follower(self, m: Message) -> None:
        if m.type in _LEADER_MESSAGES:
            self.leader_id = m.from_node
            self._election_elapsed = 0
        if m.type is MessageType.APPEND:
            self._handle_append(m)
        elif m.type is MessageType.HEARTBEAT:
            self._handle_heartbeat(m)
        elif m.type is MessageType.RESET_LOG:
            self._handle_reset_log(m)
        elif m.type is MessageType.TIMEOUT_NOW and self._promotable():
            # The leader picked us: campaign at once, skipping pre-vote and the other nodes' leases.
            self._campaign(pre_vote=False, transfer=True)

    def _handle_append(self, m: Message) -> None:
        prev, prev_term, entries = m.prev_last_offset, m.prev_term, m.entries
        if prev < self.commit_offset:
            # Everything up to our commit offset is committed, hence identical to the leader's log.
            entries = tuple(e for e in entries if e.last_offset > self.commit_offset)
            if entries and entries[0].base_offset != self.commit_offset + 1:
                raise RaftInternalError(f"leader sent an entry straddling our commit offset {self.commit_offset}")
            prev = self.commit_offset
            commit_term = self.log.term_at(prev)
            assert commit_term is not None
            prev_term = commit_term
        if not self.log.matches(prev, prev_term):
            self._reject_append(prev)
            return
        self._append_from_leader(entries)
        last_new = entries[-1].last_offset if entries else prev
        self._commit_to(min(m.commit_offset, last_new))
        self._send(MessageType.APPEND_RESP, m.from_node, match_offset=last_new)

    def _reject_append(self, prev: int) -> None:
        """Refuse an append that does not match at ``prev`` and tell the leader where to retry.

        If our log ends before ``prev``: hint_term NO_TERM, hint_offset = our last offset.
        Otherwise: hint_term = our (conflicting) term at prev, hint_offset = our first offset of that term,
        so the leader can skip the whole term in one round trip (Raft §5.3, the optimisation at its end).
        """
        last = self.log.last_offset
        if prev > last:
            hint_term, hint_offset = NO_TERM, last
        else:
            conflict_term = self.log.term_at(prev)
            assert conflict_term is not None
            hint_term = conflict_term
            hint_offset = self.log.first_offset_with_term_at_least(conflict_term, prev)
        assert self.leader_id is not None
        self._send(
            MessageType.APPEND_RESP,
            self.leader_id,
            reject=True,
            prev_last_offset=prev,
            reject_hint_term=hint_term,
            reject_hint_offset=hint_offset,
        )

    def _append_from_leader(self, entries: tuple[Entry, ...]) -> None:
        """Append entries that follow a matching position, skipping those we already hold and cutting our
        log at the first conflict (Raft: "delete the existing entry and all that follow it")."""
        for index, entry in enumerate(entries):
            if self.log.matches(entry.last_offset, entry.term):
                continue
            if entry.base_offset <= self.commit_offset:
                raise RaftInternalError(
                    f"leader's entry {entry} conflicts with our committed log (commit {self.commit_offset})")
            self._write_entries(entries[index:])
            return

    def _handle_heartbeat(self, m: Message) -> None:
        # The leader caps commit_offset at what it knows we hold, so this never commits unknown entries.
        self._commit_to(min(m.commit_offset, self.log.last_offset))
        self._note_leader_commit(m.last_log_offset)
        # Our log end lets the leader notice that we lost entries we once acknowledged (a wiped disk); reject says
        # we still wait to catch up, so the leader keeps its heartbeats coming (Progress.reported_caught_up).
        self._send(MessageType.HEARTBEAT_RESP, m.from_node, last_log_offset=self.log.last_offset,
                   last_log_term=self.log.last_term, reject=self._catching_up)

    def _handle_reset_log(self, m: Message) -> None:
        start = m.log_start_offset
        if start - 1 <= self.commit_offset:
            # Our committed log already reaches the leader's log start, and committed entries match.
            self._send(MessageType.APPEND_RESP, m.from_node, match_offset=self.commit_offset)
            return
        if self.log.matches(start - 1, m.prev_term):
            # We hold the leader's log up to its start: no need to throw anything away.
            self._commit_to(min(m.commit_offset, start - 1))
            self._send(MessageType.APPEND_RESP, m.from_node, match_offset=start - 1)
            return
        assert m.membership is not None
        check(start - 1 > self.commit_offset, "a log reset would discard committed entries")
        reset = self.log.reset(start, m.prev_term, m.membership)
        self._configs.reset(reset.membership)
        self.commit_offset = start - 1
        self.applied_offset = max(self.applied_offset, start - 1)
        self._send(MessageType.APPEND_RESP, m.from_node, match_offset=start - 1)

    def _commit_to(self, offset: int) -> None:
        if offset > self.commit_offset:
            if offset > self.log.last_offset:
                raise RaftInternalError(f"committing {offset} beyond the log end")
            if not (offset == self.log.last_offset or self.log.entry_start(offset + 1) == offset + 1):
                raise RaftInternalError(f"commit offset {offset} falls inside an entry")
            self.commit_offset = offset

    # ================================================================================ log writes
    def _new_entry(self, kind: EntryKind, payload: bytes, record_count: int) -> Entry:
        base = self.log.last_offset + 1
        return Entry(base, base + record_count - 1, self.term, kind, payload)

    def _write_entries(self, entries: Iterable[Entry]) -> None:
        """Append entries to the log (cutting it first if they start inside it), tracking CONFIG entries."""
        batch = list(entries)
        start = batch[0].base_offset
        before = self.membership
        if start <= self.log.last_offset:
            self._configs.truncate(start)
            self.log.truncate(start)
        self.log.append(batch)
        for entry in batch:
            if entry.kind is EntryKind.CONFIG:
                self._configs.append(entry.last_offset, Membership.decode(entry.payload))
        if self.membership != before:
            self._membership_changed()

    def _membership_changed(self) -> None:
        if self.role is not Role.LEADER:
            return
        members = self.membership.members
        for node in list(self._progress):
            if node not in members:
                del self._progress[node]
                self._dirty.discard(node)
        for node in members:
            if node not in self._progress:
                self._add_progress(node)
                self._dirty.add(node)
            else:
                self._progress[node].is_learner = node in self.membership.learners
        if self._lead_transferee is not None and self._lead_transferee not in self.membership.voters:
            self._lead_transferee = None
        self._maybe_commit()  # a smaller quorum may already hold more

    # ================================================================================ leader
    def _require_leader_accepting(self) -> None:
        if self.role is not Role.LEADER:
            raise NotLeaderError(self.leader_id)
        if self._lead_transferee is not None:
            raise ProposalDroppedError(f"leadership is being transferred to {self._lead_transferee}")

    def _append_as_leader(self, entry: Entry) -> None:
        self._write_entries([entry])
        self._progress[self.id].next_offset = entry.last_offset + 1
        self._dirty.update(node for node in self._progress if node != self.id)
        self._maybe_commit()  # a single-voter group commits as soon as it is durable

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self.config.election_timeout_ticks:
            self._election_elapsed = 0
            if self.config.check_quorum and not self._quorum_recently_active():
                # Cut off from a majority: stop accepting writes that could never commit.
                self._become_follower(self.term, None)
                return
            self._lead_transferee = None  # a transfer that took a whole election timeout has failed
        if self._heartbeat_elapsed >= self.config.heartbeat_timeout_ticks:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat()

    def _quorum_recently_active(self) -> bool:
        active = has_quorum(
            self.membership.voters,
            lambda node: node == self.id or (node in self._progress and self._progress[node].recent_active),
        )
        for node, progress in self._progress.items():
            progress.recent_active = node == self.id
        return active

    def _broadcast_heartbeat(self) -> None:
        for node in sorted(self._progress):
            if node != self.id:
                match = self._progress[node].match_offset
                self._send(MessageType.HEARTBEAT, node, commit_offset=min(match, self.commit_offset),
                           last_log_offset=self._settled_commit_offset())

    def _settled_commit_offset(self) -> int:
        """The commit offset, uncapped, once this term's first entry is committed (so it covers every entry
        committed in earlier terms too); -1 before. Heartbeats carry it for nodes catching up."""
        return self.commit_offset if self.commit_offset >= self._term_start_offset >= 0 else -1

    def _step_leader(self, m: Message) -> None:
        progress = self._progress.get(m.from_node)
        if progress is None:
            return  # not a member (any more)
        if m.type is MessageType.APPEND_RESP:
            progress.recent_active = True
            if m.reject:
                self._handle_append_reject(m, progress)
            else:
                self._handle_append_ack(m, progress)
        elif m.type is MessageType.HEARTBEAT_RESP:
            progress.recent_active = True
            progress.reported_caught_up = not m.reject
            if m.last_log_offset < progress.match_offset:
                self._follower_lost_entries(m.from_node, progress, m.last_log_offset)
            self._handle_heartbeat_resp(m.from_node, progress)

    def _handle_append_ack(self, m: Message, progress: Progress) -> None:
        if progress.acknowledge(m.match_offset):
            if progress.state is ProgressState.PROBE:
                progress.become_replicate()
            self._maybe_commit()
            if m.from_node == self._lead_transferee and progress.match_offset == self.log.last_offset:
                self._send(MessageType.TIMEOUT_NOW, m.from_node)
        self._dirty.add(m.from_node)

    def _follower_lost_entries(self, node: int, progress: Progress, follower_last_offset: int) -> None:
        """A follower's log ends below its match offset: it lost acknowledged entries (its disk was wiped or
        its tail cut by recovery). Raft assumes acknowledged entries stay; rather than wait forever for a
        follower that can never catch up from there, count it from where its log really ends and resend."""
        progress.forget_beyond(self._known_match_at_or_below(follower_last_offset))
        self._dirty.add(node)

    def _known_match_at_or_below(self, follower_last_offset: int) -> int:
        """The end of our last entry at or below a follower's reported log end. The report may be older than
        the acknowledgement it undercuts, from before the follower replaced a divergent tail with our
        entries: then its end can lie inside one of ours, and our entry covering it is not known to match.
        Every entry end of ours below it is: either the report is late, and the follower since acknowledged
        more, or its log really shrank, to a prefix of what it had acknowledged."""
        if self.log.first_offset <= follower_last_offset < self.log.last_offset:
            return self.log.entry_start(follower_last_offset + 1) - 1
        return follower_last_offset

    def _handle_append_reject(self, m: Message, progress: Progress) -> None:
        if m.reject_hint_term == NO_TERM and m.reject_hint_offset < progress.match_offset:
            self._follower_lost_entries(m.from_node, progress, m.reject_hint_offset)
            return
        retry_from = self._retry_offset(m)
        if progress.reject(m.prev_last_offset, retry_from):
            progress.next_offset = self._align_to_entry_start(progress.next_offset)
            self._dirty.add(m.from_node)

    def _retry_offset(self, m: Message) -> int:
        """Where to resume after a rejection, from the follower's hint (see _reject_append)."""
        if m.reject_hint_term == NO_TERM:
            return m.reject_hint_offset + 1  # the follower's log is short: continue from its end
        # If we hold entries of the follower's conflicting term, our logs agree up to our last of them.
        ours = self.log.last_offset_with_term_at_most(m.reject_hint_term, m.prev_last_offset)
        if ours is not None and self.log.term_at(ours) == m.reject_hint_term:
            return ours + 1
        return m.reject_hint_offset  # otherwise skip the follower's whole conflicting term

    def _align_to_entry_start(self, offset: int) -> int:
        if self.log.first_offset <= offset <= self.log.last_offset:
            return self.log.entry_start(offset)
        return offset

    def _handle_heartbeat_resp(self, node: int, progress: Progress) -> None:
        if progress.match_offset >= self.log.last_offset:
            return
        if progress.state is ProgressState.PROBE:
            progress.probe_sent = False  # the follower is reachable again; probe once more
            self._dirty.add(node)
        elif self.log.term_at(progress.next_offset - 1) is None:
            # Retention deleted what the appends in flight followed, so no empty append can confirm them:
            # probe from the follower's match, which sends it a log reset.
            progress.become_probe()
            self._dirty.add(node)
        else:
            self._send_empty_append(node, progress)

    def _maybe_commit(self) -> None:
        if self.role is not Role.LEADER:
            return
        self._progress[self.id].match_offset = self.log.durable_offset
        candidate = committed_offset(self.membership.voters, self._match_of)
        # Raft §5.4.2: only an entry of the leader's own term is committed by counting replicas; earlier
        # entries commit with it. The NOOP each leader appends makes that happen promptly.
        if candidate > self.commit_offset and self.log.term_at(candidate) == self.term:
            self.commit_offset = candidate

    def _match_of(self, node: int) -> int:
        progress = self._progress.get(node)
        return progress.match_offset if progress is not None else -1

    def _flush_appends(self) -> None:
        """Send what each dirty follower can take now. Done lazily at ready() so proposals batch up."""
        if self.role is not Role.LEADER:
            self._dirty.clear()
            return
        for node in sorted(self._dirty):
            progress = self._progress.get(node)
            if progress is None or node == self.id:
                continue
            while self._send_append(node, progress):
                if progress.state is not ProgressState.REPLICATE:
                    break
        self._dirty.clear()

    def _has_appends_to_send(self) -> bool:
        """Whether _flush_appends would send anything now; changes nothing."""
        if self.role is not Role.LEADER:
            return False
        for node in self._dirty:
            progress = self._progress.get(node)
            if progress is not None and node != self.id and self._append_due(progress):
                return True
        return False

    def _append_due(self, progress: Progress) -> bool:
        """Whether _send_append(progress) would send something (an append, an empty probe or a reset)."""
        if progress.is_paused(self.config.max_inflight_bytes):
            return False
        prev = progress.next_offset - 1
        next_offset = progress.next_offset
        if self.log.term_at(prev) is None:
            if prev < self.log.first_offset - 1:
                return True  # a log reset
            prev, next_offset = self.log.last_offset, self.log.last_offset + 1
        if next_offset > self.log.last_offset:
            return progress.state is ProgressState.PROBE and progress.match_offset < prev
        return True

    def _send_append(self, node: int, progress: Progress) -> bool:
        """Send the next append (or a log reset) to ``node``; False if nothing could be sent.
        _append_due is the same decision without the sending: keep the two in step."""
        if progress.is_paused(self.config.max_inflight_bytes):
            return False
        prev = progress.next_offset - 1
        prev_term = self.log.term_at(prev)
        if prev_term is None and prev < self.log.first_offset - 1:
            self._send_reset_log(node, progress)
            return True
        if prev_term is None:
            # next_offset is past our log end (we were probed beyond it); restart from our end.
            progress.next_offset = self.log.last_offset + 1
            prev, prev_term = self.log.last_offset, self.log.last_term
        if progress.next_offset > self.log.last_offset:
            if progress.state is ProgressState.PROBE and progress.match_offset < prev:
                # Nothing new to send, but we do not know where the follower is: probe with an empty append.
                self._send_empty_append(node, progress)
                progress.probe_sent = True
                return True
            return False
        entries = self.log.entries(progress.next_offset, self.config.max_msg_bytes)
        self._send(
            MessageType.APPEND,
            node,
            prev_last_offset=prev,
            prev_term=prev_term,
            entries=tuple(entries),
            commit_offset=self.commit_offset,
        )
        progress.sent(entries[-1].last_offset, sum(e.size_bytes for e in entries))
        return True

    def _send_empty_append(self, node: int, progress: Progress) -> None:
        """Appends may have been lost in flight. An empty append just before next_offset either confirms
        the follower holds everything sent so far, or is rejected and sends us back to probing. It carries
        no entries, so it does not count against the in-flight window."""
        prev = progress.next_offset - 1
        prev_term = self.log.term_at(prev)
        if prev_term is None:
            return
        self._send(
            MessageType.APPEND,
            node,
            prev_last_offset=prev,
            prev_term=prev_term,
            commit_offset=self.commit_offset,
        )

    def _send_reset_log(self, node: int, progress: Progress) -> None:
        """The follower needs entries retention already deleted: tell it to restart at our log start."""
        start = self.log.first_offset
        prev_term = self.log.term_at(start - 1)
        assert prev_term is not None
        if progress.state is not ProgressState.PROBE:
            progress.become_probe()
        progress.probe_sent = True
        self._send(
            MessageType.RESET_LOG,
            node,
            log_start_offset=start,
            prev_term=prev_term,
            membership=self.membership_at(start - 1),
            commit_offset=self.commit_offset,
        )

    # ================================================================================ sending
    def _send(self, kind: MessageType, to_node: int, **fields: object) -> None:
        self._outbox.append(Message(kind, self.id, to_node, self.term, **fields))  # type: ignore[arg-type]
