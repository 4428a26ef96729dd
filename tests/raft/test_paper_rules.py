"""One test per rule of the Raft paper's summary (Figure 2), phrased for offsets instead of indexes."""

from __future__ import annotations

import pytest

from logbroker.raft.errors import NotLeaderError
from logbroker.raft.node import RaftNode
from logbroker.raft.types import Entry, EntryKind, HardState, Message, MessageType, Role
from tests.raft.harness import Harness
from tests.raft.nodes import answer, append, drain, entries_with_terms, make_node, only, vote_request

# ---------------------------------------------------------------------------------------- RequestVote


def test_a_node_rejects_a_vote_request_from_an_older_term() -> None:
    node = make_node(terms=[1, 2], term=3)
    reply = only(answer(node, vote_request(2, term=2, last_offset=5, last_term=2)))
    assert reply.type is MessageType.VOTE_RESP and reply.reject
    assert reply.term == 3  # so the stale candidate learns the newer term
    assert node.vote is None


def test_a_follower_grants_a_vote_to_a_candidate_with_an_up_to_date_log_when_it_has_not_voted() -> None:
    node = make_node(terms=[1, 1], term=1)
    node.step(vote_request(2, term=2, last_offset=1, last_term=1))
    ready = drain(node)
    assert ready is not None
    reply = only(list(ready.all_messages))
    assert reply.type is MessageType.VOTE_RESP and not reply.reject and reply.term == 2
    # The vote must be persisted before the grant leaves: it is in the same Ready's hard state.
    assert ready.hard_state == HardState(term=2, vote=2, commit_offset=-1)


def test_a_follower_rejects_a_second_candidate_in_the_same_term() -> None:
    node = make_node(terms=[1], term=1)
    answer(node, vote_request(2, term=2, last_offset=0, last_term=1))
    reply = only(answer(node, vote_request(3, term=2, last_offset=0, last_term=1)))
    assert reply.reject
    assert node.vote == 2


def test_a_follower_grants_the_same_candidate_again_when_its_request_is_repeated() -> None:
    node = make_node(terms=[1], term=1)
    answer(node, vote_request(2, term=2, last_offset=0, last_term=1))
    reply = only(answer(node, vote_request(2, term=2, last_offset=0, last_term=1)))
    assert not reply.reject


def test_a_follower_rejects_a_vote_for_a_candidate_whose_log_is_behind() -> None:
    node = make_node(terms=[1, 2], term=2)
    reply = only(answer(node, vote_request(2, term=3, last_offset=5, last_term=1)))
    assert reply.reject
    assert node.term == 3 and node.vote is None  # the term is adopted even though the vote is refused


def test_a_follower_rejects_a_candidate_with_the_same_last_term_but_a_shorter_log() -> None:
    node = make_node(terms=[1, 1, 1], term=1)
    reply = only(answer(node, vote_request(2, term=2, last_offset=1, last_term=1)))
    assert reply.reject


def test_a_follower_grants_a_candidate_with_a_later_last_term_even_if_its_log_is_shorter() -> None:
    node = make_node(terms=[1, 1, 1], term=2)
    reply = only(answer(node, vote_request(2, term=3, last_offset=0, last_term=2)))
    assert not reply.reject


def test_a_pre_vote_is_granted_without_changing_term_or_vote() -> None:
    node = make_node(terms=[1], term=1)
    reply = only(answer(node, vote_request(2, term=2, last_offset=0, last_term=1, pre=True)))
    assert reply.type is MessageType.PRE_VOTE_RESP and not reply.reject
    assert node.term == 1 and node.vote is None


# ---------------------------------------------------------------------------------------- AppendEntries


def test_a_follower_rejects_an_append_from_an_older_term_and_reports_its_term() -> None:
    node = make_node(terms=[1], term=2)
    reply = only(answer(node, append(2, term=1, prev=0, prev_term=1)))
    assert reply.type is MessageType.APPEND_RESP and reply.term == 2
    assert reply.match_offset == -1  # an answer that can never move the stale leader's progress


def test_a_follower_rejects_an_append_whose_previous_offset_it_does_not_hold() -> None:
    node = make_node(terms=[1, 1], term=1)
    reply = only(answer(node, append(2, term=1, prev=4, prev_term=1)))
    assert reply.reject
    assert reply.prev_last_offset == 4
    assert (reply.reject_hint_term, reply.reject_hint_offset) == (0, 1)  # "my log ends at offset 1"


def test_a_follower_rejects_an_append_whose_previous_term_does_not_match_and_hints_the_conflicting_term() -> (
    None
):
    node = make_node(terms=[1, 2, 2, 2], term=3)
    reply = only(answer(node, append(2, term=3, prev=3, prev_term=3)))
    assert reply.reject
    # Our term at offset 3 is 2 and our first offset of term 2 is 1: the leader can skip the whole term.
    assert (reply.reject_hint_term, reply.reject_hint_offset) == (2, 1)


def test_a_follower_deletes_a_conflicting_entry_and_all_that_follow_it() -> None:
    node = make_node(terms=[1, 1, 1, 1], term=1)
    new = Entry(2, 2, 2, EntryKind.DATA, b"new")
    node.step(append(2, term=2, prev=1, prev_term=1, entries=[new]))
    ready = drain(node)
    assert ready is not None
    assert ready.truncate_from == 2
    assert ready.entries == (new,)
    assert node.log.last_offset == 2 and node.log.term_at(2) == 2
    assert only(list(ready.all_messages)).match_offset == 2


def test_a_follower_appends_only_entries_it_does_not_already_hold() -> None:
    node = make_node(terms=[1, 1], term=1)
    held = entries_with_terms([1, 1])
    extra = Entry(2, 4, 1, EntryKind.DATA, b"three records")
    node.step(append(2, term=1, prev=-1, prev_term=0, entries=[*held, extra]))
    ready = drain(node)
    assert ready is not None
    assert ready.truncate_from is None and ready.entries == (extra,)
    # A duplicate of the same message changes nothing but is acknowledged again.
    reply = only(answer(node, append(2, term=1, prev=-1, prev_term=0, entries=[*held, extra])))
    assert reply.match_offset == 4 and node.log.last_offset == 4


def test_a_follower_sets_its_commit_offset_to_the_smaller_of_the_leaders_and_its_last_new_entry() -> None:
    node = make_node(terms=[1, 1, 1, 1], term=1)
    # The leader has committed up to 10, but this message only establishes our log up to offset 1.
    answer(node, append(2, term=1, prev=0, prev_term=1, entries=entries_with_terms([1], start=1), commit=10))
    assert node.commit_offset == 1
    answer(node, append(2, term=1, prev=3, prev_term=1, commit=2))
    assert node.commit_offset == 2


def test_a_follower_hands_out_newly_committed_entries_to_apply_after_they_are_persisted() -> None:
    node = make_node(terms=[1, 1, 1], term=1)
    ready = None
    node.step(append(2, term=1, prev=2, prev_term=1, commit=1))
    ready = node.ready()
    assert ready is not None
    assert [e.last_offset for e in ready.committed_entries] == [0, 1]
    assert ready.hard_state is not None and ready.hard_state.commit_offset == 1
    node.advance(ready)
    assert node.applied_offset == 1


# ---------------------------------------------------------------------------------------- all servers


def test_a_node_that_sees_a_higher_term_in_a_response_becomes_a_follower() -> None:
    harness = Harness([1, 2, 3])
    leader = harness.elect(1)
    term = leader.term
    leader.step(Message(MessageType.HEARTBEAT_RESP, 2, 1, term + 5))
    assert leader.role is Role.FOLLOWER and leader.term == term + 5 and leader.leader_id is None


def test_a_leader_that_receives_a_higher_term_append_steps_down_and_follows_the_sender() -> None:
    harness = Harness([1, 2, 3])
    leader = harness.elect(1)
    term = leader.term
    leader.step(append(3, term=term + 1, prev=-1, prev_term=0))
    assert leader.role is Role.FOLLOWER and leader.term == term + 1 and leader.leader_id == 3


# ------------------------------------------------------------------------------ followers, candidates


def test_a_follower_that_hears_nothing_for_an_election_timeout_starts_a_pre_vote() -> None:
    node = make_node(terms=[1], term=1)
    for _ in range(20):
        node.tick()
    ready = drain(node)
    assert node.role is Role.PRE_CANDIDATE and node.term == 1  # pre-vote: the term is not bumped yet
    assert ready is not None
    kinds = {(m.type, m.term, m.to_node) for m in ready.all_messages}
    assert kinds == {(MessageType.PRE_VOTE, 2, 2), (MessageType.PRE_VOTE, 2, 3)}


def test_a_candidate_increments_its_term_votes_for_itself_and_asks_for_votes() -> None:
    node = make_node(terms=[1], term=1, pre_vote=False)
    for _ in range(20):
        node.tick()
    ready = drain(node)
    assert node.role is Role.CANDIDATE and node.term == 2 and node.vote == 1
    assert ready is not None and ready.hard_state == HardState(2, 1, -1)
    assert {m.to_node for m in ready.all_messages if m.type is MessageType.VOTE} == {2, 3}
    assert all(m.last_log_offset == 0 and m.last_log_term == 1 for m in ready.all_messages)


def test_a_candidate_with_votes_from_a_majority_becomes_leader() -> None:
    node = make_node(terms=[1], term=1, pre_vote=False)
    for _ in range(20):
        node.tick()
    drain(node)
    node.step(Message(MessageType.VOTE_RESP, 2, 1, 2))
    assert node.role is Role.LEADER and node.leader_id == 1


def test_a_candidate_that_receives_an_append_from_a_leader_of_its_term_becomes_a_follower() -> None:
    node = make_node(terms=[1], term=1, pre_vote=False)
    for _ in range(20):
        node.tick()
    node.step(append(3, term=2, prev=0, prev_term=1))
    assert node.role is Role.FOLLOWER and node.leader_id == 3


def test_a_candidate_whose_election_times_out_starts_a_new_one_in_a_later_term() -> None:
    node = make_node(terms=[1], term=1, pre_vote=False)
    for _ in range(20):
        node.tick()
    assert node.term == 2
    for _ in range(20):
        node.tick()
    assert node.role is Role.CANDIDATE and node.term == 3


def test_a_candidate_rejected_by_a_majority_returns_to_follower() -> None:
    node = make_node(terms=[1], term=1, pre_vote=False)
    for _ in range(20):
        node.tick()
    node.step(Message(MessageType.VOTE_RESP, 2, 1, 2, reject=True))
    node.step(Message(MessageType.VOTE_RESP, 3, 1, 2, reject=True))
    assert node.role is Role.FOLLOWER and node.term == 2


# ---------------------------------------------------------------------------------------- leaders


def test_a_new_leader_appends_a_noop_entry_of_its_term_and_replicates_it() -> None:
    harness = Harness([1, 2, 3])
    leader = harness.elect(1)
    last = leader.log.last_offset
    assert leader.log.term_at(last) == leader.term
    noop = leader.log.entries(last, 1)[0]
    assert noop.kind is EntryKind.NOOP and noop.record_count == 1
    for follower in (2, 3):
        assert harness.node(follower).log.term_at(last) == leader.term
    assert leader.commit_offset == last


def test_a_follower_refuses_proposals_and_names_the_leader() -> None:
    harness = Harness([1, 2, 3])
    harness.elect(1)
    with pytest.raises(NotLeaderError) as raised:
        harness.node(2).propose(b"x", 1)
    assert raised.value.leader_id == 1


def test_a_leader_commits_a_proposal_once_a_majority_holds_it_and_followers_learn_the_commit() -> None:
    harness = Harness([1, 2, 3])
    leader = harness.elect(1)
    entry = harness.propose(1, b"records", record_count=5)
    assert entry.last_offset == entry.base_offset + 4
    harness.stabilize()
    assert leader.commit_offset == entry.last_offset
    harness.tick_all(1)  # the next heartbeat carries the commit offset
    for node_id in (2, 3):
        assert harness.node(node_id).commit_offset == entry.last_offset
        assert harness.replicas[node_id].applied[-1] == entry


def exchange(nodes: dict[int, RaftNode], max_rounds: int = 50) -> list[Message]:
    """Run nodes against each other over a perfect network until they fall silent; every message sent."""
    sent: list[Message] = []
    for _ in range(max_rounds):
        batch = [m for node in nodes.values() if (ready := drain(node)) is not None for m in ready.all_messages]
        if not batch:
            return sent
        sent.extend(batch)
        for m in batch:
            nodes[m.to_node].step(m)
    raise AssertionError("the nodes did not fall silent")


def test_a_leader_backs_up_past_a_followers_conflicting_term_in_one_round_trip() -> None:
    # Figure 7, case (f): the follower holds many entries of terms 2 and 3 that the leader never had.
    leader = make_node(1, terms=[1, 1, 1, 4, 4, 4], term=4, voters=(1, 2), pre_vote=False)
    follower = make_node(2, terms=[1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3], term=4, voters=(1, 2), pre_vote=False)
    leader.step(Message(MessageType.TIMEOUT_NOW, 2, 1, 4))
    sent = exchange({1: leader, 2: follower})
    assert leader.is_leader
    rejections = [m for m in sent if m.type is MessageType.APPEND_RESP and m.reject]
    assert [(m.reject_hint_term, m.reject_hint_offset) for m in rejections] == [(2, 3)]
    assert follower.log.last_offset == leader.log.last_offset == 6
    assert [follower.log.term_at(o) for o in range(7)] == [1, 1, 1, 4, 4, 4, 5]


def test_a_leader_does_not_count_its_own_entries_until_they_are_persisted() -> None:
    harness = Harness([1])
    leader = harness.elect(1)
    entry = leader.propose(b"x", 1)
    assert leader.commit_offset < entry.last_offset
    ready = leader.ready()
    assert ready is not None and ready.entries == (entry,)
    harness.replicas[1].storage.write_ready(ready)
    harness.replicas[1].storage.fsync()
    leader.advance(ready)
    assert leader.commit_offset < entry.last_offset  # written and fsynced, but not yet reported
    leader.persisted(entry.last_offset, entry.term)
    assert leader.commit_offset == entry.last_offset


def test_a_leader_only_commits_by_counting_replicas_an_entry_of_its_own_term() -> None:
    # Node 1 holds an old-term entry at offset 1 that a majority also holds, but it is not of its term.
    node = make_node(terms=[1, 2], term=3, commit=0, pre_vote=False)
    node.step(Message(MessageType.TIMEOUT_NOW, 2, 1, 3))  # campaign now, in term 4
    node.step(Message(MessageType.VOTE_RESP, 2, 1, 4))
    assert node.is_leader
    drain(node)
    node.step(Message(MessageType.APPEND_RESP, 2, 1, 4, match_offset=1))
    assert node.commit_offset == 0  # offset 1 has term 2: replicas alone cannot commit it
    node.step(Message(MessageType.APPEND_RESP, 2, 1, 4, match_offset=2))
    assert node.commit_offset == 2  # the NOOP of term 4 commits, and offset 1 with it


def test_a_leader_batches_appends_up_to_the_message_size_limit() -> None:
    harness = Harness([1, 2], max_msg_bytes=100)
    harness.elect(1)
    harness.isolated = {2}
    for _ in range(10):
        harness.propose(1, b"x" * 30)  # 46 bytes each with overhead
    harness.isolated = set()
    harness.tick(1)
    harness.process(1)
    harness.deliver_once()
    appends = [m for m in harness.mailbox if m.type is MessageType.APPEND and m.entries]
    harness.stabilize()
    assert harness.log_of(2) == harness.log_of(1)
    assert all(sum(e.size_bytes for e in m.entries) <= 100 for m in appends)


def test_a_leader_stops_sending_to_a_follower_whose_in_flight_window_is_full() -> None:
    harness = Harness([1, 2], max_msg_bytes=50, max_inflight_bytes=100)
    leader = harness.elect(1)
    harness.isolated = {2}  # messages to 2 are lost, so nothing gets acknowledged
    for _ in range(10):
        leader.propose(b"x" * 30, 1)
    ready = leader.ready()
    assert ready is not None
    appends = [m for m in ready.all_messages if m.type is MessageType.APPEND]
    in_flight = sum(e.size_bytes for m in appends for e in m.entries)
    assert 100 <= in_flight < 100 + 50  # stopped at the first message that filled the window
    progress = leader.progress(2)
    assert progress is not None and progress.inflight_bytes == in_flight
