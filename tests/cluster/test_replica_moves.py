"""The pure parts of replica moves: the next membership step, target checks, drain plans, and the
controller commands that record topic changes."""

from __future__ import annotations

import pytest

from logbroker.cluster.metadata import ClusterState
from logbroker.cluster.replica_moves import (
    ADD_LEARNER,
    DONE,
    PROMOTE,
    REMOVE,
    TRANSFER,
    WAIT,
    MoveRefused,
    check_target,
    next_move_step,
    plan_drain,
)
from logbroker.raft.membership import ChangeKind, Membership, MembershipChange

KINDS = {ADD_LEARNER: ChangeKind.ADD_LEARNER, PROMOTE: ChangeKind.PROMOTE_LEARNER, REMOVE: ChangeKind.REMOVE_NODE}


def run_move(start: Membership, target: list[int], leader: int) -> list[tuple[str, int]]:
    """Apply each step as the core would, everyone caught up, until DONE; the voter count never drops
    below the target's nor the start's size."""
    membership, steps = start, []
    floor = min(len(start.voters), len(target))
    for _ in range(20):
        step = next_move_step(membership, target, leader, lambda node: True)
        steps.append((step.action, step.node))
        if step.action == DONE:
            return steps
        if step.action == TRANSFER:
            leader = step.node
        else:
            membership = membership.apply(MembershipChange(KINDS[step.action], step.node))
        assert len(membership.voters) >= floor, steps
    raise AssertionError(f"no end: {steps}")


def test_a_full_move_adds_and_promotes_before_it_removes_and_the_leader_leaves_last() -> None:
    steps = run_move(Membership.of([1, 2, 3]), [4, 5, 6], leader=1)
    assert steps == [(ADD_LEARNER, 4), (ADD_LEARNER, 5), (ADD_LEARNER, 6), (PROMOTE, 4), (PROMOTE, 5),
                     (PROMOTE, 6), (REMOVE, 2), (REMOVE, 3), (TRANSFER, 4), (REMOVE, 1), (DONE, -1)]


def test_a_learner_that_lags_is_waited_for_and_leftover_learners_go() -> None:
    lagging = next_move_step(Membership.of([1, 2, 3], [4]), [1, 2, 4], 1, lambda node: node != 4)
    assert lagging.action == WAIT and "4" in lagging.why
    leftover = next_move_step(Membership.of([1, 2, 3], [5]), [1, 2, 3], 1, lambda node: True)
    assert (leftover.action, leftover.node) == (REMOVE, 5)
    assert next_move_step(Membership.of([1, 2, 3]), [3, 2, 1], 2, lambda node: True).action == DONE


def test_targets_are_checked() -> None:
    assert check_target("t-0", [3, 1], [1, 2, 3]) == [3, 1]
    with pytest.raises(MoveRefused, match="replication factor 0"):
        check_target("t-0", [], [1, 2, 3])
    with pytest.raises(MoveRefused, match="broker 2 is named more than once"):
        check_target("t-0", [2, 1, 2], [1, 2, 3])
    with pytest.raises(MoveRefused, match=r"broker 7 is not in this cluster \(brokers 1, 2, 3\)"):
        check_target("t-0", [1, 7], [1, 2, 3])


def test_a_drain_spreads_replicas_over_the_least_loaded_live_brokers() -> None:
    assignments = {("a", 0): [1, 2, 3], ("a", 1): [2, 3, 4], ("b", 0): [3, 1, 2]}
    plan = plan_drain(3, assignments, [1, 2, 3, 4, 5], live=[1, 2, 3, 4])
    assert plan == {("a", 0): [1, 2, 4], ("a", 1): [2, 1, 4], ("b", 0): [1, 2, 4]}
    with pytest.raises(MoveRefused, match="cannot drain broker 3: a-0"):
        plan_drain(3, {("a", 0): [1, 2, 3]}, [1, 2, 3], live=[1, 2, 3])


def topic_state() -> ClusterState:
    state = ClusterState()
    state.apply({"op": "create_topic", "name": "t", "topic_id": "id1", "partitions": 1, "replication_factor": 2,
                 "configs": {"retention.ms": "5"}, "assignment": [[1, 2]]}, 0)
    return state


def test_topic_change_commands() -> None:
    state = topic_state()
    event = state.apply({"op": "alter_topic_configs", "name": "t", "topic_id": "id1", "configs": {}}, 1)
    assert event is not None and event.kind == "configs_altered" and state.topics["t"].configs == {}
    event = state.apply({"op": "add_partitions", "name": "t", "topic_id": "id1", "from": 1,
                         "assignment": [[2, 3], [3, 1]]}, 2)
    assert event is not None and event.partitions == (1, 2) and state.topics["t"].partitions == 3
    assert state.apply({"op": "add_partitions", "name": "t", "topic_id": "id1", "from": 1,
                        "assignment": [[2, 3]]}, 3) is None  # stale: a later count already won
    state.apply({"op": "move_replicas", "name": "t", "topic_id": "id1", "moves": [[0, [3, 2]]]}, 4)
    assert state.hosts(state.topics["t"], 0) == [1, 2, 3]
    state.apply({"op": "leaders", "leaders": [["t", 0, 3, 7, "id1"]]}, 5)  # a target broker may lead mid-move
    assert state.leaders[("t", 0)] == (3, 7)
    assert state.apply({"op": "move_done", "name": "t", "topic_id": "id1", "partition": 0,
                        "replicas": [2, 3]}, 6) is None  # not the recorded target
    event = state.apply({"op": "move_done", "name": "t", "topic_id": "id1", "partition": 0, "replicas": [3, 2]}, 7)
    assert event is not None and event.kind == "moved" and event.removed == (1,)
    assert state.topics["t"].assignment[0] == [3, 2] and not state.moves
    # Partition 0's voters changed; the added ones never did (a two-voter group's wait to catch up relies on it).
    assert state.topics["t"].reconfigured == {0}
    state.apply({"op": "move_replicas", "name": "t", "topic_id": "id1", "moves": [[1, [2, 3]]]}, 9)
    assert state.topics["t"].reconfigured == {0, 1} and not state.moves  # named, though already there
    assert state.apply({"op": "alter_topic_configs", "name": "t", "topic_id": "old", "configs": {}}, 8) is None
