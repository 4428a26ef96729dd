"""The classic Raft traps, each played out step by step on a small cluster."""

from __future__ import annotations

import pytest

from logbroker.raft.errors import MembershipChangeError, ProposalDroppedError
from logbroker.raft.membership import ChangeKind, Membership, MembershipChange
from logbroker.raft.node import RaftNode
from logbroker.raft.progress import ProgressState
from logbroker.raft.types import HardState, Message, MessageType, Role
from tests.raft.harness import ELECTION_TICKS, Harness
from tests.raft.sim.mutants import CommitPreviousTermByCounting


def appends_from(node: int, offset: int):  # type: ignore[no-untyped-def]
    """A drop filter: appends from ``node`` that carry ``offset``."""
    return lambda m: (
        m.type is MessageType.APPEND
        and m.from_node == node
        and any(e.base_offset <= offset <= e.last_offset for e in m.entries)
    )


@pytest.mark.parametrize("node_class", [RaftNode, CommitPreviousTermByCounting], ids=["raft", "mutant"])
def test_figure_8_a_leader_never_commits_an_entry_of_an_earlier_term_by_counting_replicas(
    node_class: type[RaftNode],
) -> None:
    # The paper's Figure 8, on five nodes, without pre-vote and check-quorum as in the paper.
    h = Harness([1, 2, 3, 4, 5], node_class=node_class, pre_vote=False, check_quorum=False, max_msg_bytes=20)
    h.elect(1)
    # (a) Node 1 replicates X at offset 1 to node 2 only, then crashes.
    h.drop = lambda m: (
        {m.from_node, m.to_node} & {1} != set() and {m.from_node, m.to_node} & {3, 4, 5} != set()
    )
    x = h.propose(1, b"X")
    h.stabilize()
    assert h.node(2).log.term_at(1) == x.term
    h.crash(1)
    # (b) Node 5 wins with votes from 3 and 4, appends its NOOP at offset 1, and crashes before sending it.
    h.drop = lambda m: m.type is MessageType.APPEND and m.from_node == 5
    h.elect(5)
    h.crash(5)
    # (c) Node 1 restarts, wins again, and gets X (but not its new NOOP at offset 2) onto node 3.
    h.restart(1)
    probes_to_3: list[Message] = []

    def only_x_reaches_3(m: Message) -> bool:
        if 4 in (m.from_node, m.to_node) or 5 in (m.from_node, m.to_node):
            return True
        if appends_from(1, 2)(m) and m.to_node == 3:
            probes_to_3.append(m)
            return len(probes_to_3) > 1  # the first probe is rejected anyway: 3 lacks offset 1
        return False

    h.drop = only_x_reaches_3
    leader = h.elect(1, attempts=3)
    h.tick_all(2)
    assert [h.node(n).log.term_at(1) for n in (1, 2, 3)] == [x.term] * 3
    committed_x = leader.commit_offset >= 1
    if node_class is not RaftNode:
        # The mutant calls X committed, yet nodes 3, 4 and 5 would elect node 5, whose log lacks X.
        assert committed_x
        assert h.node(5).log.term_at(1) != x.term and h.node(5).log.last_term > h.node(3).log.last_term
        return
    # (d) Node 1 crashes; node 5 (whose last term is later) wins and overwrites offset 1 everywhere.
    h.crash(1)
    h.restart(5)
    h.drop = lambda m: False
    h.elect(5, attempts=3)
    h.tick_all(2)
    assert [h.node(n).log.term_at(1) for n in (2, 3, 4, 5)] == [h.node(5).log.term_at(1)] * 4
    assert h.node(5).log.term_at(1) != x.term  # X is gone...
    assert not committed_x  # ...but it had never been reported committed, so nothing committed was lost


def test_a_stale_leader_coming_back_steps_down_and_its_uncommitted_entries_are_replaced() -> None:
    h = Harness([1, 2, 3])
    old = h.elect(1)
    h.isolated = {1}
    stale = [old.propose(f"stale{i}".encode(), 1) for i in range(3)]
    h.tick_all(3 * ELECTION_TICKS)
    assert old.role is Role.FOLLOWER  # check-quorum: it stepped down on its own
    (new_id,) = h.leaders()
    fresh = h.propose(new_id, b"fresh")
    h.isolated = set()
    h.tick_all(3)
    assert h.log_of(1) == h.log_of(new_id)
    assert all(h.node(1).log.term_at(e.last_offset) != e.term for e in stale)
    assert h.node(1).commit_offset >= fresh.last_offset


def test_a_stale_leader_that_still_believes_it_leads_learns_the_new_term_from_any_follower() -> None:
    h = Harness([1, 2, 3], check_quorum=False)
    old = h.elect(1)
    h.isolated = {1}
    h.tick_all(3 * ELECTION_TICKS)
    assert old.role is Role.LEADER  # without check-quorum it never noticed
    (new_id,) = [n for n in h.leaders() if n != 1]
    h.isolated = set()
    h.tick(1)  # its next heartbeat is answered in the new term
    h.stabilize()
    assert old.role is Role.FOLLOWER and old.term == h.node(new_id).term
    assert h.leaders() == [new_id]


def test_a_follower_with_a_longer_divergent_log_is_brought_back_in_line() -> None:
    h = Harness([1, 2, 3, 4, 5])
    h.elect(1)
    h.drop = lambda m: m.type is MessageType.APPEND and m.to_node != 2  # only 2 sees the next entries
    for i in range(6):
        h.propose(1, f"only-on-1-and-2-{i}".encode())  # 2 of 5 replicas: never committed
    h.stabilize()
    h.crash(1)
    h.drop = lambda m: 2 in (m.from_node, m.to_node)  # 2 is away while 3, 4 and 5 elect a leader
    h.tick_all(3 * ELECTION_TICKS)
    (leader_id,) = h.leaders()
    h.propose(leader_id, b"new-term")
    h.stabilize()
    assert h.node(2).log.last_offset > h.node(leader_id).log.last_offset  # longer, but of an older term
    h.drop = lambda m: False
    h.restart(1)
    h.tick_all(3)
    assert h.log_of(2) == h.log_of(leader_id) == h.log_of(1)
    assert all(payload != b"only-on-1-and-2-0" for _, _, payload in h.log_of(2))


def test_pre_vote_stops_a_rejoining_partitioned_node_from_disrupting_the_leader() -> None:
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    term = leader.term
    h.isolated = {3}
    h.tick_all(10 * ELECTION_TICKS)
    assert h.node(3).term == term  # pre-votes that nobody answers never raise the term
    h.isolated = set()
    h.tick_all(2 * ELECTION_TICKS)
    assert leader.role is Role.LEADER and leader.term == term
    assert h.node(3).leader_id == 1


def test_without_pre_vote_the_same_rejoining_node_does_depose_the_leader() -> None:
    h = Harness([1, 2, 3], pre_vote=False, check_quorum=False)
    leader = h.elect(1)
    term = leader.term
    h.isolated = {3}
    h.tick_all(10 * ELECTION_TICKS)
    assert h.node(3).term > term + 3
    h.isolated = set()
    h.tick_all(1)
    assert leader.term > term  # the contrast that motivates pre-vote


def test_a_node_in_a_leaders_lease_ignores_a_vote_request_from_a_higher_term() -> None:
    h = Harness([1, 2, 3])
    h.elect(1)
    follower = h.node(2)
    follower.step(Message(MessageType.VOTE, 3, 2, follower.term + 1, last_log_offset=99, last_log_term=99))
    assert follower.term == h.node(1).term and follower.vote != 3
    ready = follower.ready()
    assert ready is None or not [m for m in ready.all_messages if m.type is MessageType.VOTE_RESP]


def test_check_quorum_steps_down_a_leader_that_cannot_hear_a_majority() -> None:
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    h.isolated = {1}
    for _ in range(2 * ELECTION_TICKS):
        h.tick(1)
    assert leader.role is Role.FOLLOWER
    with pytest.raises(Exception, match="not the leader"):
        leader.propose(b"x", 1)


def test_leadership_transfer_waits_for_the_target_to_catch_up_then_hands_over() -> None:
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    h.isolated = {3}
    for i in range(5):
        h.propose(1, f"e{i}".encode())
    h.stabilize()
    leader.transfer_leadership(3)
    h.process(1)
    assert not h.sent(MessageType.TIMEOUT_NOW)  # 3 is behind: catch it up first
    with pytest.raises(ProposalDroppedError):
        leader.propose(b"during transfer", 1)
    h.isolated = set()
    h.tick_all(2)
    assert h.leaders() == [3]
    assert h.node(3).term == leader.term and leader.role is Role.FOLLOWER
    assert h.log_of(3)[: len(h.log_of(1))] == h.log_of(1)


def test_a_transfer_that_cannot_complete_is_abandoned_after_an_election_timeout() -> None:
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    h.isolated = {3}
    leader.transfer_leadership(3)
    h.tick_all(ELECTION_TICKS + 1)
    assert leader.is_leader and leader.lead_transferee is None
    h.propose(1, b"accepted again")


def test_a_learner_receives_entries_but_does_not_vote_and_is_promoted_once_caught_up() -> None:
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    h.propose(1, b"before")
    h.stabilize()
    h.add_node(4, Membership.of([1, 2, 3]))
    h.isolated = {4}
    change = leader.propose_membership_change(MembershipChange(ChangeKind.ADD_LEARNER, 4))
    h.stabilize()
    assert leader.membership.learners == {4}
    with pytest.raises(MembershipChangeError, match="not caught up"):
        leader.propose_membership_change(MembershipChange(ChangeKind.PROMOTE_LEARNER, 4))
    h.isolated = set()
    h.tick_all(2)
    learner = h.node(4)
    assert h.log_of(4) == h.log_of(1) and learner.membership.learners == {4}
    for _ in range(3 * ELECTION_TICKS):
        learner.tick()
    assert learner.role is Role.FOLLOWER  # learners never campaign
    # With two voters away, the learner's copy does not make a quorum.
    h.isolated = {2, 3}
    entry = h.propose(1, b"needs a voter")
    h.deliver_once()
    assert learner.log.term_at(entry.last_offset) == entry.term and leader.commit_offset < entry.last_offset
    h.isolated = set()
    h.tick_all(1)
    promotion = leader.propose_membership_change(MembershipChange(ChangeKind.PROMOTE_LEARNER, 4))
    h.tick_all(2)
    assert promotion.last_offset > change.last_offset
    assert all(h.node(n).membership.voters == {1, 2, 3, 4} for n in (1, 2, 3, 4))


def test_membership_changes_go_one_at_a_time_and_never_remove_the_leader() -> None:
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    h.isolated = {2, 3}
    leader.propose_membership_change(MembershipChange(ChangeKind.ADD_LEARNER, 4))
    with pytest.raises(MembershipChangeError, match="not committed"):
        leader.propose_membership_change(MembershipChange(ChangeKind.REMOVE_NODE, 3))
    h.isolated = set()
    h.tick_all(1)
    with pytest.raises(MembershipChangeError, match="transfer leadership"):
        leader.propose_membership_change(MembershipChange(ChangeKind.REMOVE_NODE, 1))
    leader.propose_membership_change(MembershipChange(ChangeKind.REMOVE_NODE, 3))
    assert leader.membership.voters == {1, 2}  # in force as soon as it is appended
    h.tick_all(1)
    assert h.node(2).membership.voters == {1, 2}


def test_a_truncated_config_entry_rolls_the_membership_back() -> None:
    h = Harness([1, 2, 3])
    h.elect(1)
    h.isolated = {1}
    h.node(1).propose_membership_change(MembershipChange(ChangeKind.ADD_LEARNER, 4))
    h.process(1)
    assert h.node(1).membership.learners == {4}
    h.tick_all(3 * ELECTION_TICKS)
    h.isolated = set()
    h.tick_all(3)
    assert h.node(1).membership == Membership.of([1, 2, 3])


def test_a_restarted_node_recovers_its_membership_from_config_entries_in_its_log() -> None:
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    leader.propose_membership_change(MembershipChange(ChangeKind.ADD_LEARNER, 5))
    h.tick_all(1)
    h.crash(2)
    assert h.restart(2).membership.learners == {5}


def test_a_follower_behind_the_leaders_log_start_is_reset_to_it_after_retention() -> None:
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    h.isolated = {3}
    for i in range(8):
        h.propose(1, f"r{i}".encode(), record_count=3)
    h.stabilize()
    # Retention deletes everything below offset 13 on the leader.
    storage = h.replicas[1].storage
    storage.delete_before(13, leader.membership_at(12))
    assert leader.log.first_offset == 13
    resets = []

    def record_resets(m: Message) -> bool:
        if m.type is MessageType.RESET_LOG:
            resets.append(m)
        return False

    h.drop = record_resets
    h.isolated = set()
    h.tick_all(3)
    assert [(m.log_start_offset, m.prev_term) for m in resets] == [(13, leader.term)]
    follower = h.node(3)
    assert follower.log.first_offset == 13 and h.replicas[3].storage.first_offset == 13
    assert h.log_of(3) == h.log_of(1)
    assert follower.commit_offset == leader.commit_offset
    # It survives a restart from its reset log.
    h.crash(3)
    assert h.restart(3).log.first_offset == 13


def test_a_single_voter_commits_as_soon_as_its_write_is_durable() -> None:
    h = Harness([1])
    leader = h.elect(1)
    entry = h.propose(1, b"alone", record_count=10)
    assert leader.commit_offset == entry.last_offset == 10
    assert h.replicas[1].applied[-1] == entry


def test_a_follower_that_lost_its_whole_log_is_sent_everything_again() -> None:
    # Raft assumes an acknowledged entry stays on its follower's disk. When a disk is wiped anyway (the
    # operator deleted a damaged replica, as the broker's own error advises), the leader must notice that
    # the follower's log ends below what it acknowledged, resend it all, and stop counting it meanwhile.
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    for i in range(5):
        h.propose(1, f"x{i}".encode())
    h.stabilize()
    last = leader.log.last_offset
    assert leader.progress(3) is not None and leader.progress(3).match_offset == last  # type: ignore[union-attr]
    h.crash(3)
    h.add_node(3)  # restarts with an empty log and no term or vote: a wiped disk
    h.tick_all(ELECTION_TICKS)  # heartbeats tell the leader where node 3's log really ends
    h.stabilize()
    assert h.log_of(3) == h.log_of(1)
    assert leader.progress(3).match_offset == last  # type: ignore[union-attr]


def test_a_voter_that_lost_its_log_does_not_elect_a_leader_lacking_what_it_had_acknowledged() -> None:
    # Entries committed by the leader and node 3 alone (node 2 cut off); node 3's disk is then replaced and
    # the leader crashes. Nodes 2 and 3 are a majority, but node 3 no longer holds what it acknowledged: it
    # must not vote, or node 2 would win without the committed entries and cut them from node 1 later.
    h = Harness([1, 2, 3])
    h.elect(1)
    h.propose(1, b"before")
    h.stabilize()
    h.isolated.add(2)
    for i in range(3):
        h.propose(1, f"acked-by-1-and-3-{i}".encode())
    h.stabilize()
    committed = h.node(1).commit_offset
    assert h.node(3).log.last_offset == committed > h.node(2).log.last_offset
    h.crash(3)
    h.add_node(3).wait_to_catch_up()  # a wiped disk: empty log, no term, no vote
    h.crash(1)
    h.isolated.clear()
    h.tick_all(6 * ELECTION_TICKS)
    assert h.leaders() == []  # node 2 asked node 3 for votes, in vain
    assert h.node(3).catching_up and h.node(3).vote is None
    h.restart(1)  # the leader comes back: it wins with node 2's vote and repairs node 3
    h.elect(1, attempts=5)
    h.tick_all(2 * ELECTION_TICKS)
    assert h.log_of(3) == h.log_of(1) and h.node(3).log.last_offset >= committed
    assert not h.node(3).catching_up  # it holds the leader's commit offset: it may vote again
    h.crash(1)
    for _ in range(10 * ELECTION_TICKS):  # node 3 votes (or campaigns) again: nodes 2 and 3 elect a leader
        if h.leaders():
            break
        h.tick_all()
    assert h.leaders() and h.node(h.leaders()[0]).log.last_offset >= committed


def test_a_voter_that_lost_its_log_still_waits_after_a_restart_half_way_through_catching_up() -> None:
    # As above, but node 3 restarts when it holds only the entries node 2 holds too. Its log is then no
    # longer empty, and nothing in it says it is incomplete: only its saved hard state does. Were the wait
    # forgotten, node 3 would vote for node 2 (whose log is as long), and the entries node 3 once
    # acknowledged would be lost.
    h = Harness([1, 2, 3], max_msg_bytes=1)  # one entry per append, so node 3 can be stopped half-way
    h.elect(1)
    for i in range(3):
        h.propose(1, f"on-all-{i}".encode())
    h.stabilize()
    h.isolated.add(2)
    for i in range(4):
        h.propose(1, f"acked-by-1-and-3-{i}".encode())
    h.stabilize()
    committed = h.node(1).commit_offset
    node_2_ends = h.node(2).log.last_offset
    assert h.node(3).log.last_offset == committed > node_2_ends
    h.crash(3)
    h.add_node(3).wait_to_catch_up()
    h.drop = lambda m: m.to_node == 3 and m.type is MessageType.APPEND and h.node(3).log.last_offset >= node_2_ends
    h.tick_all(3 * ELECTION_TICKS)  # the leader's heartbeats find node 3 empty and resend the log, up to a point
    assert h.node(3).log.last_offset == node_2_ends and h.node(3).catching_up
    h.crash(3)
    assert h.restart(3).catching_up  # the wait was saved with the appends it acknowledged
    h.crash(1)
    h.isolated.clear()
    h.drop = lambda m: False
    h.tick_all(6 * ELECTION_TICKS)
    assert h.leaders() == []  # node 2 asked node 3 for votes, in vain
    h.restart(1)
    h.elect(1, attempts=5)
    h.tick_all(2 * ELECTION_TICKS)
    assert h.node(3).log.last_offset >= committed and not h.node(3).catching_up
    h.crash(3)
    assert not h.restart(3).catching_up  # once caught up, that was saved too: it votes after a restart


def test_in_a_group_of_two_voters_a_node_that_lost_its_log_votes_for_the_other_and_only_for_it() -> None:
    # Every entry committed in a group that has always had these two voters was acknowledged by both, so the
    # other one holds them all: the runtime names it (vote_while_catching_up_for), and node 2, back on a new
    # disk, lets it win. Without that vote the group elects nobody: node 1 needs both votes.
    h = Harness([1, 2])
    h.elect(1)
    for i in range(3):
        h.propose(1, f"x{i}".encode())
    h.stabilize()
    committed = h.node(1).commit_offset
    h.crash(2)
    h.add_node(2).wait_to_catch_up()
    h.crash(1)
    h.restart(1)
    h.tick_all(6 * ELECTION_TICKS)
    assert h.leaders() == []  # not named: node 2 refuses node 1, as any voter that lost its log does

    h.node(2).vote_while_catching_up_for = 1
    h.elect(1, attempts=5)
    h.tick_all(2 * ELECTION_TICKS)
    assert h.log_of(2) == h.log_of(1) and h.node(2).log.last_offset >= committed
    assert not h.node(2).catching_up


def node_3_back_on_a_new_disk() -> tuple[Harness, RaftNode]:
    """Three nodes, node 1 leading one committed entry; node 3's disk replaced: empty, waiting to catch up."""
    h = Harness([1, 2, 3])
    h.elect(1)
    h.propose(1, b"x")
    h.stabilize()
    h.crash(3)
    node = h.add_node(3)
    node.wait_to_catch_up()
    return h, node


def test_a_node_catching_up_says_so_in_its_heartbeat_answers_until_a_heartbeat_ends_its_wait() -> None:
    """Only a leader heartbeat ends the wait, so the leader must learn when it has ended (the runtime keeps a
    leader awake, heartbeating, until every follower has said so: Replica._leader_settled)."""
    h, node = node_3_back_on_a_new_disk()
    leader = h.node(1)
    heartbeat_ticks = leader.config.heartbeat_timeout_ticks
    h.tick(1, heartbeat_ticks)  # node 3 lacks the commit offset this heartbeat carries: it answers that it waits
    h.deliver_once()
    answer = next(m for m in h.mailbox if m.from_node == 3 and m.type is MessageType.HEARTBEAT_RESP)
    assert answer.reject and node.catching_up
    h.stabilize()  # the leader reads the answer and repairs node 3's log
    assert not leader.progress(3).reported_caught_up  # type: ignore[union-attr]
    assert node.log.last_offset == leader.log.last_offset and node.catching_up
    h.tick(1, heartbeat_ticks)  # the next heartbeat ends the wait, and its answer says so
    h.stabilize()
    assert not node.catching_up
    assert leader.progress(3).reported_caught_up  # type: ignore[union-attr]


def test_a_node_that_lost_its_log_refuses_every_candidate_but_the_one_it_was_allowed() -> None:
    h, node = node_3_back_on_a_new_disk()
    node.vote_while_catching_up_for = 1
    for candidate in (2, 1):
        node.step(Message(MessageType.VOTE, candidate, 3, h.node(1).term + 1, last_log_offset=0, last_log_term=1))
    h.process(3)
    answers = [(m.to_node, m.reject) for m in h.mailbox if m.from_node == 3 and m.type is MessageType.VOTE_RESP]
    assert answers == [(2, True), (1, False)]


def test_a_node_catching_up_neither_campaigns_nor_takes_a_leadership_transfer() -> None:
    h, _ = node_3_back_on_a_new_disk()
    h.isolated.add(3)
    h.tick(3, 10 * ELECTION_TICKS)
    assert h.node(3).role is Role.FOLLOWER and h.node(3).term == 0  # it never campaigned
    h.node(3).step(Message(MessageType.TIMEOUT_NOW, 1, 3, h.node(1).term))
    h.process(3)
    assert h.node(3).role is Role.FOLLOWER


def test_a_follower_whose_tail_was_cut_by_recovery_is_repaired_even_while_the_leader_is_idle() -> None:
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    for i in range(6):
        h.propose(1, f"x{i}".encode())
    h.stabilize()
    last = leader.log.last_offset
    h.crash(3)
    storage = h.replicas[3].storage
    storage._durable.truncate(3)  # recovery cut a damaged tail at offset 3
    hard = storage._durable.hard_state
    storage._durable.hard_state = HardState(hard.term, hard.vote, 2)  # the runtime lowers a commit beyond the log end
    storage.crash()
    h.restart(3)
    assert h.node(3).log.last_offset == 2
    # No new proposals: only heartbeat answers can reveal the loss.
    h.tick_all(ELECTION_TICKS)
    h.stabilize()
    assert h.node(3).log.last_offset == last
    assert h.log_of(3) == h.log_of(1)
    assert leader.progress(3).match_offset == last  # type: ignore[union-attr]


def test_a_late_answer_from_before_a_follower_replaced_its_tail_never_moves_its_match_inside_an_entry() -> None:
    # Raft's leader keeps, per follower, the highest entry known to be replicated there (matchIndex). A
    # follower's heartbeat answer names its log end, so the leader notices when a follower lost entries it
    # had acknowledged; but an answer may be overtaken in flight by the follower's later acknowledgement, and
    # the log end it names may end entries the follower has since replaced with the leader's. Only an entry
    # end of the leader's own log at or below that end is known to be replicated there.
    h = Harness([1, 2, 3], pre_vote=False, check_quorum=False)  # so node 1 can win while node 2 still leads
    old = h.elect(2)
    h.isolated = {2}
    old.propose(b"never replicated", record_count=3)  # node 2's log ends at 3, in a term no one else has
    leader = h.elect(1)
    entry = h.propose(1, b"the leader's", record_count=5)  # covers offsets 2..6: node 2's end lies inside it
    h.stabilize()
    h.isolated = set()
    h.tick(1)
    h.deliver_once()  # node 2 answers the heartbeat naming its old log end, 3; that answer is delayed
    [late] = [m for m in h.sent(MessageType.HEARTBEAT_RESP) if m.from_node == 2]
    h.mailbox.remove(late)
    assert late.last_log_offset == 3
    h.tick(1)
    h.stabilize()  # the next answer brings the leader's entries to node 2, which acknowledges them
    assert h.log_of(2) == h.log_of(1)
    assert leader.progress(2).match_offset == entry.last_offset  # type: ignore[union-attr]
    h.mailbox.append(late)
    h.deliver_once()
    match = leader.progress(2).match_offset  # type: ignore[union-attr]
    assert match < entry.base_offset  # not 3: that is inside the leader's entry 2..6
    h.tick_all(2)  # heartbeats carry a commit offset capped at the match; node 2 can take it
    assert h.log_of(2) == h.log_of(1) and h.node(2).commit_offset == leader.commit_offset == entry.last_offset


def test_a_follower_whose_next_entries_retention_deleted_while_they_were_in_flight_is_reset() -> None:
    # Raft §7: the leader sends its snapshot (here: a log reset) "to followers that lag behind", which
    # happens "when the leader has already discarded the next log entry that it needs to send". That holds
    # too when the discarded entries were already sent, lost on the way, while the leader was pipelining.
    h = Harness([1, 2, 3], max_msg_bytes=40, max_inflight_bytes=64)  # one entry an append, two in flight
    leader = h.elect(1)
    h.propose(1, b"r0")
    h.stabilize()
    assert leader.progress(3).state is ProgressState.REPLICATE  # type: ignore[union-attr]
    h.drop = lambda m: m.type is MessageType.APPEND and m.to_node == 3
    for i in range(1, 9):
        h.propose(1, f"r{i}".encode())
    h.tick_all(3)  # node 2 acknowledges everything; to node 3 the window fills with appends that are lost
    progress = leader.progress(3)
    assert progress is not None and progress.is_paused(64)
    start = progress.next_offset + 2  # past everything sent: not even an empty append can follow it now
    h.replicas[1].storage.delete_before(start, leader.membership_at(start - 1))
    h.drop = lambda m: False
    h.tick_all(3)
    assert h.node(3).log.first_offset == start and h.log_of(3) == h.log_of(1)


def test_a_new_groups_first_leader_asks_for_votes_at_once_and_wins_term_1() -> None:
    """campaign(pre_vote=False): a group that never had a leader has none to disrupt, so its picked first leader
    skips the pre-vote round (one round trip less for each of a thousand new partitions)."""
    h = Harness([1, 2, 3])
    h.node(1).campaign(pre_vote=False)
    h.process(1)
    assert {m.type for m in h.mailbox} == {MessageType.VOTE}
    h.stabilize()
    assert h.leaders() == [1] and h.node(1).term == 1


def test_campaign_leaves_a_node_that_follows_a_known_leader_alone() -> None:
    h = Harness([1, 2, 3])
    h.elect(1)
    term = h.node(2).term
    h.node(2).campaign(pre_vote=False)
    h.process(2)
    assert h.node(2).role is Role.FOLLOWER and h.node(2).term == term and not h.mailbox
