"""When the runtime learns out of band that a group's leader is gone (its broker went silent), the survivors
agree on one successor: it campaigns at once, the others forget the leader (so they grant its votes without
waiting out their lease) and hold back for two to three election timeouts, and the group elects in one round.
A successor that cannot win is still replaced once the others' longer timeout runs out."""

from __future__ import annotations

from logbroker.raft.types import MessageType, Role
from tests.raft.harness import ELECTION_TICKS, Harness


def three_with_leader_1() -> Harness:
    harness = Harness([1, 2, 3])
    harness.elect(1)
    harness.propose(1, b"before the crash")
    harness.stabilize()
    return harness


def test_the_successor_wins_at_once_and_the_other_survivor_does_not_campaign() -> None:
    harness = three_with_leader_1()
    harness.crash(1)
    successor, other = harness.node(2), harness.node(3)
    term_before = successor.term
    other.leader_lost(1, campaign=False)
    successor.leader_lost(1, campaign=True)
    harness.stabilize()
    assert successor.role is Role.LEADER and successor.term == term_before + 1  # one round, no split
    assert other.role is Role.FOLLOWER and other.leader_id == 2
    assert not [m for m in harness.sent(MessageType.PRE_VOTE) if m.from_node == 3]


def test_the_other_survivor_grants_the_vote_although_its_lease_has_not_run_out() -> None:
    harness = three_with_leader_1()
    harness.crash(1)
    other = harness.node(3)
    other.leader_lost(1, campaign=False)
    assert other.leader_id is None  # no lease left: a pre-vote is answered, not ignored
    harness.node(2).leader_lost(1, campaign=True)
    harness.stabilize()
    assert harness.leaders() == [2]


def test_without_the_news_a_survivor_in_its_lease_ignores_the_successor() -> None:
    harness = three_with_leader_1()
    harness.crash(1)
    harness.node(2).leader_lost(1, campaign=True)  # node 3 has not noticed: it still trusts leader 1
    harness.stabilize()
    assert harness.leaders() == []


def test_a_request_ignored_in_the_lease_is_answered_once_the_news_arrives() -> None:
    """The successor's broker noticed the death a moment sooner: its pre-vote reached the other survivor while
    that one still trusted the dead leader and was ignored. The news ends the lease and answers it at once,
    so the successor wins without waiting out an election timeout."""
    harness = three_with_leader_1()
    harness.crash(1)
    successor, other = harness.node(2), harness.node(3)
    successor.leader_lost(1, campaign=True)
    harness.stabilize()
    assert harness.leaders() == [] and successor.role is Role.PRE_CANDIDATE  # ignored in the lease
    other.leader_lost(1, campaign=False)
    harness.stabilize()  # no tick: only the answer to the kept request
    assert harness.leaders() == [2] and other.leader_id == 2


def test_a_successor_that_cannot_win_is_replaced_after_the_longer_timeout() -> None:
    harness = three_with_leader_1()
    harness.crash(1)
    harness.crash(2)  # the picked successor dies too before it campaigns
    other = harness.node(3)
    other.leader_lost(1, campaign=False)
    for _ in range(2 * ELECTION_TICKS - 1):
        harness.tick(3)
    assert other.role is Role.FOLLOWER  # still holding back for the successor
    harness.restart(1)
    for _ in range(ELECTION_TICKS + 1):
        harness.tick_all()
    assert other.role is Role.LEADER or harness.node(1).role is Role.LEADER


def test_news_about_another_leader_or_for_a_candidate_changes_nothing() -> None:
    harness = three_with_leader_1()
    follower = harness.node(2)
    follower.leader_lost(3, campaign=True)  # not its leader
    assert follower.role is Role.FOLLOWER and follower.leader_id == 1
    leader = harness.node(1)
    leader.leader_lost(1, campaign=True)  # a leader is no follower of itself
    assert leader.role is Role.LEADER


def test_every_survivor_picks_the_same_successor_and_the_picks_spread() -> None:
    from logbroker.server.replica_manager import pick_successor

    groups = [f"orders-{i}@3f2a" for i in range(1000)]
    alive_on_2 = {1: False, 2: True, 3: True}.__getitem__  # as broker 2's liveness sees it
    alive_on_3 = {1: False, 2: True, 3: True}.__getitem__
    picks_2 = [pick_successor(g, [1, 2, 3], 1, alive_on_2) for g in groups]
    picks_3 = [pick_successor(g, (3, 1, 2), 1, alive_on_3) for g in groups]  # voter order does not matter
    assert picks_2 == picks_3
    assert set(picks_2) == {2, 3} and 400 < picks_2.count(2) < 600
    assert pick_successor("g", [1, 2, 3], 1, lambda n: n == 3) == 3  # the only live voter left
    assert pick_successor("g", [1, 2], 1, lambda n: False) is None


def test_with_a_live_majority_the_successor_asks_for_votes_without_a_pre_vote_round() -> None:
    harness = three_with_leader_1()
    harness.crash(1)
    successor, other = harness.node(2), harness.node(3)
    term_before = successor.term
    other.leader_lost(1, campaign=False)
    successor.leader_lost(1, campaign=True, pre_vote=False)
    harness.process(2)
    assert successor.role is Role.CANDIDATE and successor.term == term_before + 1
    assert [m.to_node for m in harness.sent(MessageType.VOTE)] == [1, 3] and not harness.sent(MessageType.PRE_VOTE)
    harness.stabilize()
    assert harness.leaders() == [2] and successor.term == term_before + 1


def test_a_vote_request_ignored_in_the_lease_is_granted_once_the_news_arrives() -> None:
    harness = three_with_leader_1()
    harness.crash(1)
    successor, other = harness.node(2), harness.node(3)
    term_before = other.term
    successor.leader_lost(1, campaign=True, pre_vote=False)
    harness.stabilize()
    assert harness.leaders() == [] and other.term == term_before  # ignored: node 3 still trusts leader 1
    other.leader_lost(1, campaign=False)
    harness.stabilize()
    assert harness.leaders() == [2] and (other.term, other.vote) == (term_before + 1, 2)
