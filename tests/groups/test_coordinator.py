"""The group coordinator shard: KIP-848's rules played out step by step, and a model-checked invariant."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logbroker.groups import records as r
from logbroker.groups.coordinator import (
    GroupConfig,
    GroupCoordinatorShard,
    HeartbeatRequest,
    HeartbeatResult,
)
from logbroker.groups.errors import (
    FencedMemberEpoch,
    GroupIdNotFound,
    InvalidGroupId,
    InvalidGroupRequest,
    NonEmptyGroup,
    PartitionNotOwned,
    StaleMemberEpoch,
    UnknownMemberId,
    UnreleasedInstanceId,
)

TP = tuple[str, int]
TOPICS = {"orders": 6}
SESSION_MS = 10_000


class Clock:
    def __init__(self) -> None:
        self.now_ms = 1_000_000

    def __call__(self) -> int:
        return self.now_ms


class Client:
    """A member as a correct client behaves: it adopts assignments, releasing revoked partitions at once."""

    def __init__(self, shard: GroupCoordinatorShard, member_id: str, topics: tuple[str, ...] = ("orders",),
                 instance_id: str = "") -> None:
        self.shard, self.member_id, self.topics, self.instance_id = shard, member_id, topics, instance_id
        self.epoch = 0
        self.owned: frozenset[TP] = frozenset()

    def heartbeat(self, full: bool = False) -> HeartbeatResult:
        request = HeartbeatRequest("g", self.member_id, self.epoch, self.instance_id,
                                   subscribed_topic_names=self.topics, owned_partitions=self.owned,
                                   full_request=full or self.epoch == 0)
        result, _ = self.shard.heartbeat(request)
        self.epoch = result.member_epoch
        if result.assignment is not None:
            self.owned = result.assignment
        return result

    def leave(self, epoch: int = -1) -> None:
        self.shard.heartbeat(HeartbeatRequest("g", self.member_id, epoch, self.instance_id))
        self.owned = frozenset()


def make_shard(clock: Clock | None = None, topics: dict[str, int] | None = None) -> GroupCoordinatorShard:
    catalog = dict(TOPICS if topics is None else topics)
    return GroupCoordinatorShard(lambda: catalog, GroupConfig(session_timeout_ms=SESSION_MS), clock or Clock())


def settle(*clients: Client, rounds: int = 10) -> None:
    for _ in range(rounds):
        for client in clients:
            client.heartbeat()


def assert_no_double_owners(*clients: Client) -> None:
    seen: dict[TP, str] = {}
    for client in clients:
        for tp in client.owned:
            assert tp not in seen, f"{tp} owned by {seen[tp]} and {client.member_id}"
            seen[tp] = client.member_id


def test_a_lone_member_gets_every_partition() -> None:
    a = Client(make_shard(), "a")
    a.heartbeat()
    assert a.owned == {("orders", p) for p in range(6)}


def test_a_second_member_gets_partitions_only_after_the_first_released_them() -> None:
    shard = make_shard()
    a, b = Client(shard, "a"), Client(shard, "b")
    a.heartbeat()
    b.heartbeat()
    assert b.owned == frozenset()  # all six are still a's
    a.heartbeat()  # a is told to keep three: it releases the others...
    assert len(a.owned) == 3
    b.heartbeat()
    assert b.owned == frozenset()  # ...but until a says it has, they are still a's
    a.heartbeat()
    b.heartbeat()
    assert len(b.owned) == 3 and not a.owned & b.owned
    assert a.epoch == b.epoch == shard.groups["g"].assignment_epoch


def test_members_whose_partitions_do_not_move_keep_them_throughout() -> None:
    shard = make_shard()
    a, b = Client(shard, "a"), Client(shard, "b")
    settle(a, b)
    kept = a.owned
    c = Client(shard, "c")
    for _ in range(5):
        for client in (c, a, b):
            client.heartbeat()
            assert_no_double_owners(a, b, c)
    assert a.owned <= kept and len(a.owned) == 2  # a only gave up; it never lost what it keeps
    assert sorted(len(x.owned) for x in (a, b, c)) == [2, 2, 2]


def test_a_member_that_leaves_frees_its_partitions_at_once() -> None:
    shard = make_shard()
    a, b = Client(shard, "a"), Client(shard, "b")
    settle(a, b)
    b.leave()
    a.heartbeat()
    assert len(a.owned) == 6


def test_a_silent_member_is_removed_after_the_session_timeout() -> None:
    clock = Clock()
    shard = make_shard(clock)
    a, b = Client(shard, "a"), Client(shard, "b")
    settle(a, b)
    clock.now_ms += SESSION_MS // 2
    a.heartbeat()
    assert shard.expire() == []
    clock.now_ms += SESSION_MS // 2 + 1
    assert shard.expire()  # b has been silent too long
    assert "b" not in shard.groups["g"].members
    a.heartbeat()
    assert len(a.owned) == 6
    with pytest.raises(UnknownMemberId):
        b.heartbeat()


def test_a_member_that_does_not_release_in_time_is_fenced() -> None:
    clock = Clock()
    shard = make_shard(clock)
    a = Client(shard, "a")
    a.heartbeat()
    b = Client(shard, "b")
    b.heartbeat()
    stubborn_owned = a.owned
    shard.heartbeat(HeartbeatRequest("g", "a", a.epoch, owned_partitions=stubborn_owned, rebalance_timeout_ms=500,
                                     subscribed_topic_names=("orders",), full_request=True))
    clock.now_ms += 400
    b.heartbeat()
    shard.heartbeat(HeartbeatRequest("g", "a", a.epoch, owned_partitions=stubborn_owned))
    assert not b.owned, "b got partitions a still owns"
    clock.now_ms += 2_000
    shard.expire()
    b.heartbeat()
    assert len(b.owned) == 6


def test_a_member_behind_by_more_than_one_epoch_is_fenced() -> None:
    shard = make_shard()
    a, b = Client(shard, "a"), Client(shard, "b")
    settle(a, b)
    with pytest.raises(FencedMemberEpoch, match="release every partition and rejoin"):
        shard.heartbeat(HeartbeatRequest("g", "a", a.epoch + 7, owned_partitions=a.owned))


def test_a_lost_answer_leaves_the_member_one_epoch_behind_harmlessly() -> None:
    shard = make_shard()
    a = Client(shard, "a")
    a.heartbeat()
    before = a.epoch
    b = Client(shard, "b")
    b.heartbeat()
    shard.heartbeat(HeartbeatRequest("g", "a", a.epoch, owned_partitions=a.owned))  # answer lost: a keeps all
    a.owned = frozenset(list(sorted(a.owned))[:3])  # it had released what it was told before; resends old epoch
    result = a.heartbeat()
    assert result.member_epoch >= before


def test_commits_are_fenced_by_epoch_and_ownership() -> None:
    shard = make_shard()
    a, b = Client(shard, "a"), Client(shard, "b")
    settle(a, b)
    mine = sorted(a.owned)[0]
    theirs = sorted(b.owned)[0]
    shard.commit("g", "a", a.epoch, [(mine[0], mine[1], 42, "meta")])
    assert shard.fetch_offsets("g")[mine].offset == 42
    with pytest.raises(PartitionNotOwned, match="does not own"):
        shard.commit("g", "a", a.epoch, [(mine[0], mine[1], 43, ""), (theirs[0], theirs[1], 1, "")])
    assert shard.fetch_offsets("g")[mine].offset == 42  # all or nothing
    with pytest.raises(StaleMemberEpoch):
        shard.commit("g", "a", a.epoch - 1, [(mine[0], mine[1], 44, "")])
    with pytest.raises(UnknownMemberId):
        shard.commit("g", "zz", 1, [(mine[0], mine[1], 44, "")])
    with pytest.raises(InvalidGroupRequest, match="negative"):
        shard.commit("g", "a", a.epoch, [(mine[0], mine[1], -5, "")])
    with pytest.raises(NonEmptyGroup):
        shard.commit("g", "", -1, [(mine[0], mine[1], 0, "")])


def test_a_simple_group_commits_without_membership() -> None:
    shard = make_shard()
    shard.commit("simple", "", -1, [("orders", 0, 10, "")])
    assert shard.fetch_offsets("simple")[("orders", 0)].offset == 10


def test_bad_group_ids_are_refused() -> None:
    shard = make_shard()
    for bad in ("", "x" * 256, "tab\there"):
        with pytest.raises(InvalidGroupId):
            shard.heartbeat(HeartbeatRequest(bad, "m", 0, subscribed_topic_names=("orders",), full_request=True))


def test_delete_needs_an_empty_group_and_an_existing_one() -> None:
    shard = make_shard()
    a = Client(shard, "a")
    a.heartbeat()
    shard.commit("g", "a", a.epoch, [("orders", 0, 5, "")])
    with pytest.raises(NonEmptyGroup):
        shard.delete_group("g")
    a.leave()
    shard.delete_group("g")
    assert "g" not in shard.groups
    with pytest.raises(GroupIdNotFound):
        shard.delete_group("g")


def test_a_static_member_restarting_within_its_session_keeps_its_partitions() -> None:
    shard = make_shard()
    a, b = Client(shard, "a1", instance_id="host-a"), Client(shard, "b", instance_id="host-b")
    settle(a, b)
    kept = a.owned
    a.leave(epoch=-2)
    restarted = Client(shard, "a2", instance_id="host-a")
    restarted.heartbeat()
    assert restarted.owned == kept
    b.heartbeat()
    assert len(b.owned) == 3
    with pytest.raises(UnreleasedInstanceId):
        Client(shard, "a3", instance_id="host-a").heartbeat()


def test_an_unsubscribed_topic_moves_nothing_and_a_new_topic_is_assigned() -> None:
    catalog = {"orders": 2}
    shard = GroupCoordinatorShard(lambda: catalog, GroupConfig(), Clock())
    a = Client(shard, "a", topics=("orders", "later"))
    a.heartbeat()
    assert a.owned == {("orders", 0), ("orders", 1)}
    catalog["later"] = 2
    a.heartbeat()
    assert a.owned == {("orders", 0), ("orders", 1), ("later", 0), ("later", 1)}


def test_the_log_replayed_on_another_replica_gives_the_same_state() -> None:
    clock = Clock()
    leader = make_shard(clock)
    written: list[r.StateRecord] = []
    original = leader._emit

    def capture(out: list[r.StateRecord], key: r.Key, value: dict | None) -> None:  # type: ignore[type-arg]
        original(out, key, value)
        written.append(out[-1])

    leader._emit = capture  # type: ignore[method-assign]
    a, b = Client(leader, "a"), Client(leader, "b")
    settle(a, b)
    leader.commit("g", "a", a.epoch, [(*sorted(a.owned)[0], 7, "m")])
    follower = make_shard(clock)
    for record in written:
        follower.replay(record)
    assert _state(follower) == _state(leader)
    from_snapshot = make_shard(clock)
    for record in leader.snapshot():
        from_snapshot.replay(record)
    assert _state(from_snapshot) == _state(leader)


def _state(shard: GroupCoordinatorShard) -> object:
    return {gid: (g.epoch, g.assignment_epoch, {m: (x.epoch, x.assigned, x.revoking) for m, x in g.members.items()},
                  g.targets, g.offsets) for gid, g in shard.groups.items()}


def test_records_travel_in_batches_and_back() -> None:
    records = [r.StateRecord((r.OFFSET, "g", "t", i), {"offset": i, "metadata": "", "ts": 1}) for i in range(1200)]
    batches = r.to_batches(records, 1)
    assert len(batches) == 3 and sum(count for _, count in batches) == 1200
    assert [x for batch, _ in batches for x in r.from_batch(batch)] == records


# --------------------------------------------------------------------------- model-checked invariant

ACTIONS = st.lists(st.tuples(st.sampled_from(["heartbeat", "join", "leave", "crash", "tick", "stall"]),
                             st.integers(min_value=0, max_value=4)), min_size=1, max_size=80)


@settings(max_examples=150, deadline=None)
@given(actions=ACTIONS)
def test_no_partition_ever_has_two_owners(actions: list[tuple[str, int]]) -> None:
    """Whatever members join, leave, crash, stall or heartbeat in whatever order, the partitions the members
    believe they own never overlap (a stalled member keeps owning what it had until it is removed)."""
    clock = Clock()
    shard = make_shard(clock)
    clients = {i: Client(shard, f"m{i}") for i in range(5)}
    alive: set[int] = set()
    for action, i in actions:
        client = clients[i]
        try:
            if action == "join" and i not in alive:
                client.epoch, client.owned = 0, frozenset()
                client.heartbeat()
                alive.add(i)
            elif action == "heartbeat" and i in alive:
                client.heartbeat()
            elif action == "leave" and i in alive:
                client.leave()
                alive.discard(i)
            elif action == "crash" and i in alive:
                alive.discard(i)  # it stops heartbeating; it owns nothing once its process is gone
                client.owned = frozenset()
            elif action == "stall":
                clock.now_ms += SESSION_MS // 3  # a stalled member still owns what it had
            elif action == "tick":
                clock.now_ms += 1_000
                for record in shard.expire():
                    if record.key[0] == r.MEMBER and record.value is None:
                        removed = int(str(record.key[2])[1:])
                        clients[removed].owned = frozenset()  # a removed member is fenced at its next call
                        alive.discard(removed)
        except (UnknownMemberId, FencedMemberEpoch):
            client.owned = frozenset()
            alive.discard(i)
        assert_no_double_owners(*clients.values())


def test_deleting_a_topic_drops_the_groups_committed_offsets_for_it() -> None:
    shard = make_shard(topics={"orders": 2, "other": 1})
    shard.commit("g", "", -1, [("orders", 0, 5, ""), ("other", 0, 7, "")])
    shard.drop_topic("orders")
    assert shard.fetch_offsets("g") == {("other", 0): shard.fetch_offsets("g")[("other", 0)]}


def test_an_empty_groups_offsets_expire_after_the_retention() -> None:
    clock = Clock()
    catalog = dict(TOPICS)
    shard = GroupCoordinatorShard(lambda: catalog, GroupConfig(offsets_retention_ms=60_000), clock)
    a = Client(shard, "a")
    a.heartbeat()
    shard.commit("g", "a", a.epoch, [("orders", sorted(a.owned)[0][1], 3, "")])
    a.leave()
    clock.now_ms += 59_000
    shard.expire()
    assert shard.fetch_offsets("g")
    clock.now_ms += 2_000
    shard.expire()
    assert shard.fetch_offsets("g") == {} and "g" not in shard.groups
