"""The Ready contract's split of messages (etcd's messages-after-append; Raft thesis 10.2.1): a leader's own
messages may leave before its persist, everything that promises durable state waits for it, and the leader
counts its own log toward the commit only once persisted() reports it durable."""

from __future__ import annotations

from logbroker.raft.types import HardState, Message, MessageType, Ready, Role
from tests.raft.harness import Harness
from tests.raft.nodes import append, drain, entries_with_terms, make_node, vote_request


def carry_out_without_persisted(harness: Harness, node_id: int) -> Ready:
    """Write, fsync and advance the node's next Ready, but do not report it durable (persisted())."""
    node = harness.node(node_id)
    ready = node.ready()
    assert ready is not None
    storage = harness.replicas[node_id].storage
    storage.write_ready(ready)
    storage.fsync()
    node.advance(ready)
    return ready


def test_a_leaders_appends_may_leave_before_its_persist() -> None:
    harness = Harness([1, 2, 3])
    leader = harness.elect(1)
    entry = leader.propose(b"x", 1)
    ready = leader.ready()
    assert ready is not None and ready.entries == (entry,)
    appends = [m for m in ready.messages if m.type is MessageType.APPEND]
    assert {m.to_node for m in appends} == {2, 3} and all(m.entries == (entry,) for m in appends)
    assert not ready.messages_after_persist


def test_a_followers_acknowledgement_waits_for_its_persist() -> None:
    follower = make_node(terms=[1], term=1)
    entries = entries_with_terms([1], start=1)
    follower.step(append(2, term=1, prev=0, prev_term=1, entries=entries))
    ready = follower.ready()
    assert ready is not None and ready.entries == entries
    assert not ready.messages
    (ack,) = ready.messages_after_persist
    assert ack.type is MessageType.APPEND_RESP and ack.match_offset == 1


def test_a_vote_grant_and_a_candidates_vote_requests_wait_for_the_persist_of_term_and_vote() -> None:
    voter = make_node(terms=[1], term=1)
    voter.step(vote_request(2, term=2, last_offset=0, last_term=1))
    ready = voter.ready()
    assert ready is not None and ready.hard_state == HardState(2, 2, -1)
    assert not ready.messages and [m.type for m in ready.messages_after_persist] == [MessageType.VOTE_RESP]

    candidate = make_node(terms=[1], term=1, pre_vote=False)
    candidate.step(Message(MessageType.TIMEOUT_NOW, 2, 1, 1))
    ready = candidate.ready()
    assert ready is not None and ready.hard_state is not None and ready.hard_state.vote == 1
    assert not ready.messages
    assert {m.type for m in ready.messages_after_persist} == {MessageType.VOTE}


def test_a_lone_voter_that_wins_alone_sends_nothing_before_its_new_term_is_durable() -> None:
    # With one voter the candidate leads in the very Ready that persists its term: its appends to a learner
    # must wait, or a crash could bring the term back with different entries under the same (offset, term).
    harness = Harness([1], learners=[2])
    node = harness.node(1)
    for _ in range(40):
        node.tick()
        if node.role is Role.LEADER:
            break
    assert node.role is Role.LEADER
    ready = node.ready()
    assert ready is not None and ready.hard_state is not None and ready.hard_state.term == node.term
    assert not ready.messages
    assert any(m.type is MessageType.APPEND and m.to_node == 2 for m in ready.messages_after_persist)


def test_a_leader_counts_its_own_entry_only_once_persisted_reports_it() -> None:
    harness = Harness([1, 2, 3])
    leader = harness.elect(1)
    entry = leader.propose(b"x", 1)
    carry_out_without_persisted(harness, 1)
    leader.step(Message(MessageType.APPEND_RESP, 2, 1, leader.term, match_offset=entry.last_offset))
    assert leader.commit_offset < entry.last_offset  # the leader's copy is not reported durable yet
    leader.persisted(entry.last_offset, entry.term)
    assert leader.commit_offset == entry.last_offset


def test_a_majority_of_followers_commits_an_entry_before_the_leaders_own_fsync() -> None:
    harness = Harness([1, 2, 3])
    leader = harness.elect(1)
    entry = leader.propose(b"x", 1)
    carry_out_without_persisted(harness, 1)
    for follower in (2, 3):
        leader.step(Message(MessageType.APPEND_RESP, follower, 1, leader.term, match_offset=entry.last_offset))
    assert leader.commit_offset == entry.last_offset  # two of three hold it durably: Raft thesis 10.2.1


def test_has_ready_changes_no_state() -> None:
    harness = Harness([1, 2, 3])
    leader = harness.elect(1)
    leader.propose(b"x", 1)
    progress = leader.progress(2)
    assert progress is not None
    before = (progress.next_offset, progress.state, tuple(progress.inflight), leader._outbox[:], set(leader._dirty))
    for _ in range(3):
        assert leader.has_ready()
    assert (progress.next_offset, progress.state, tuple(progress.inflight), leader._outbox[:],
            set(leader._dirty)) == before
    drain(leader)
    assert not leader.has_ready() and leader.ready() is None


def test_has_ready_is_false_when_dirty_followers_have_nothing_to_take() -> None:
    harness = Harness([1, 2, 3], max_msg_bytes=50, max_inflight_bytes=50)
    leader = harness.elect(1)
    harness.isolated = {2, 3}
    leader.propose(b"x" * 40, 1)
    drain(leader)  # the window of both followers is now full
    leader.propose(b"y" * 40, 1)
    drain(leader)
    leader._dirty.update((2, 3))
    assert not leader.has_ready()
    assert leader.ready() is None


def test_has_ready_agrees_with_ready_over_a_whole_run() -> None:
    harness = Harness([1, 2, 3], seed=5)
    harness.elect(1)
    for round_number in range(30):
        harness.propose(1, f"p{round_number}".encode())
        harness.tick_all(1)
        for node_id in (1, 2, 3):
            node = harness.node(node_id)
            expected = node.has_ready()
            ready = node.ready()
            assert expected == (ready is not None)
            if ready is not None:
                storage = harness.replicas[node_id].storage
                storage.write_ready(ready)
                storage.fsync()
                if ready.entries:
                    node.persisted(ready.entries[-1].last_offset, ready.entries[-1].term)
                harness.mailbox.extend(ready.all_messages)
                node.advance(ready)
    harness.stabilize()
    assert harness.log_of(1) == harness.log_of(2) == harness.log_of(3)


def test_a_followers_heartbeat_answer_leaves_before_its_persist() -> None:
    follower = make_node(terms=[1], term=1)
    entries = entries_with_terms([1], start=1)
    follower.step(append(2, term=1, prev=0, prev_term=1, entries=entries))
    follower.step(Message(MessageType.HEARTBEAT, 2, 1, 1, commit_offset=0))
    ready = follower.ready()
    assert ready is not None and ready.entries == entries
    assert [m.type for m in ready.messages] == [MessageType.HEARTBEAT_RESP]  # promises nothing: goes at once
    assert [m.type for m in ready.messages_after_persist] == [MessageType.APPEND_RESP]  # waits for the fsync


def test_a_follower_answers_a_heartbeat_while_its_ready_is_being_persisted() -> None:
    follower = make_node(terms=[1], term=1)
    follower.step(append(2, term=1, prev=0, prev_term=1, entries=entries_with_terms([1], start=1)))
    outstanding = follower.ready()  # its write and fsync are still running
    assert outstanding is not None and outstanding.entries
    follower.step(Message(MessageType.HEARTBEAT, 2, 1, 1, commit_offset=0))
    (answer,) = follower.take_messages_before_persist()
    assert answer.type is MessageType.HEARTBEAT_RESP and answer.to_node == 2
    assert follower.take_messages_before_persist() == ()  # taken once


def test_nothing_leaves_early_while_a_new_term_is_not_yet_durable() -> None:
    follower = make_node(terms=[1], term=1)
    follower.step(append(2, term=2, prev=0, prev_term=1, entries=entries_with_terms([2], start=1)))
    outstanding = follower.ready()  # persists term 2
    assert outstanding is not None and outstanding.hard_state is not None and outstanding.hard_state.term == 2
    follower.step(Message(MessageType.HEARTBEAT, 2, 1, 2, commit_offset=0))
    assert follower.take_messages_before_persist() == ()
    storage = follower.log._storage
    storage.write_ready(outstanding)  # type: ignore[attr-defined]
    storage.fsync()  # type: ignore[attr-defined]
    follower.advance(outstanding)  # term 2 is durable now
    assert [m.type for m in follower.take_messages_before_persist()] == [MessageType.HEARTBEAT_RESP]


def test_a_new_leader_is_caught_up_only_once_its_first_entry_is_committed_and_applied() -> None:
    harness = Harness([1, 2, 3])
    leader = harness.node(1)
    for _ in range(40):  # node 1 times out; pre-vote and vote rounds, one delivery at a time
        if leader.role is Role.LEADER:
            break
        leader.tick()
        harness.process(1)
        harness.deliver_once()
    assert leader.role is Role.LEADER
    assert not leader.leader_caught_up  # its NOOP is appended, not yet acknowledged by anyone
    harness.stabilize()  # the NOOP commits on the followers' acknowledgements and is applied
    assert leader.leader_caught_up
    assert not harness.node(2).leader_caught_up  # a follower never is
