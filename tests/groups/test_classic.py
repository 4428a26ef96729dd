"""Kafka's classic group protocol in the coordinator shard: rounds, generations, sync, leave, sessions,
replay and snapshot equivalence, and one protocol per group."""

from __future__ import annotations

import pytest

from logbroker.groups.classic import (
    COMPLETING,
    EMPTY,
    PREPARING,
    STABLE,
    IllegalGeneration,
    InconsistentGroupProtocol,
    MemberIdRequired,
    RebalanceInProgress,
)
from logbroker.groups.coordinator import GroupCoordinatorShard, HeartbeatRequest
from logbroker.groups.errors import UnknownMemberId


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


def shard(clock: Clock) -> GroupCoordinatorShard:
    return GroupCoordinatorShard(lambda: {"t": 4}, clock_ms=clock)


def join(s: GroupCoordinatorShard, member: str = "", protocols: list[tuple[str, bytes]] | None = None,
         group: str = "g", v4: bool = False) -> tuple[object, str]:
    return s.classic.join(group, member, "", "consumer", protocols or [("range", b"meta-" + member.encode())],
                          10_000, 30_000, "client", "host", require_known_member_id=v4, other_protocol_members=0)


def test_two_members_join_sync_and_the_leader_assigns() -> None:
    clock = Clock()
    s = shard(clock)
    first, a = join(s)
    assert first is not None and first.generation == 1 and first.leader == a  # alone: the round completes
    assert s.classic.groups["g"].state == COMPLETING
    waiting, b = join(s)  # a new member: a rebalance every member must rejoin
    assert waiting is None and s.classic.groups["g"].state == PREPARING
    with pytest.raises(RebalanceInProgress):
        s.classic.heartbeat("g", a, 1)
    again, _ = join(s, a)
    assert again is not None and again.generation == 2 and again.leader == a
    assert [m[0] for m in again.members] == sorted([a, b])
    follower = s.classic.pending_join("g", b)
    assert follower is not None and follower.members == () and follower.generation == 2
    assert s.classic.sync("g", b, 2, {})[0] is None  # the follower waits for the leader
    assignment, records = s.classic.sync("g", a, 2, {a: b"A", b: b"B"})
    assert assignment is None and len(records) == 1
    assert s.classic.pending_sync("g", b, 2) is None  # not answered before the record is committed
    s.classic.sync_committed("g", 2)
    assert (s.classic.pending_sync("g", a, 2), s.classic.pending_sync("g", b, 2)) == (b"A", b"B")
    assert s.classic.groups["g"].state == STABLE
    with pytest.raises(IllegalGeneration):
        s.classic.heartbeat("g", b, 1)


def test_a_member_leaving_starts_a_round_and_the_last_leaving_empties_the_group() -> None:
    clock = Clock()
    s = shard(clock)
    _, a = join(s)
    _, b = join(s)
    join(s, a)
    s.classic.sync("g", a, 2, {a: b"A", b: b"B"})
    unknown, records = s.classic.leave("g", [(b, "")])
    assert unknown == [] and s.classic.groups["g"].state == PREPARING
    result, _ = join(s, a)
    assert result is not None and result.generation == 3 and [m[0] for m in result.members] == [a]
    _, records = s.classic.leave("g", [(a, "")])
    assert s.classic.groups["g"].state == EMPTY and records


def test_a_silent_member_is_dropped_after_its_session_and_a_round_ends_at_its_deadline() -> None:
    clock = Clock()
    s = shard(clock)
    _, a = join(s)
    _, b = join(s)
    join(s, a)
    s.classic.sync("g", a, 2, {a: b"A", b: b"B"})
    clock.now += 5_000
    s.classic.heartbeat("g", a, 2)
    clock.now += 6_000  # b silent for 11 s > its 10 s session
    s.expire()
    assert set(s.classic.groups["g"].members) == {a}
    assert s.classic.groups["g"].state == PREPARING
    clock.now += 31_000  # a never rejoins: at the rebalance deadline the round ends without it
    s.expire()
    assert s.classic.groups["g"].state == EMPTY


def test_new_members_are_told_their_id_first_from_v4_and_strangers_are_refused() -> None:
    s = shard(Clock())
    with pytest.raises(MemberIdRequired) as given:
        join(s, v4=True)
    result, member = join(s, given.value.member_id, v4=True)
    assert result is not None and member == given.value.member_id
    with pytest.raises(UnknownMemberId):
        join(s, "nobody")


def test_one_protocol_per_group() -> None:
    s = shard(Clock())
    join(s, protocols=[("range", b"")])
    with pytest.raises(InconsistentGroupProtocol):
        join(s, protocols=[("roundrobin", b"")])
    with pytest.raises(InconsistentGroupProtocol):  # a KIP-848 member cannot join a classic group
        s.heartbeat(HeartbeatRequest("g", "m1", 0, subscribed_topic_names=("t",)))
    s.heartbeat(HeartbeatRequest("other", "m1", 0, subscribed_topic_names=("t",)))
    with pytest.raises(InconsistentGroupProtocol):  # nor a classic member a KIP-848 group
        s.classic.join("other", "", "", "consumer", [("range", b"")], 10_000, 30_000, "c", "h", False,
                       other_protocol_members=len(s.groups["other"].members))


def test_replay_and_snapshot_rebuild_the_last_synced_generation_and_offsets() -> None:
    clock = Clock()
    s = shard(clock)
    _, a = join(s)
    _, b = join(s)
    join(s, a)
    log = list(s.classic.sync("g", a, 2, {a: b"A", b: b"B"})[1])
    log += s.commit("g", "", -1, [("t", 0, 42, "m")])
    for rebuilt in (log, s.snapshot()):
        fresh = shard(clock)
        for record in rebuilt:
            fresh.replay(record)
        group = fresh.classic.groups["g"]
        assert (group.state, group.generation, group.leader, group.protocol) == (STABLE, 2, a, "range")
        assert {m.member_id: m.assignment for m in group.members.values()} == {a: b"A", b: b"B"}
        assert fresh.classic.pending_sync("g", b, 2) == b"B"
        assert fresh.fetch_offsets("g")[("t", 0)].offset == 42
    with pytest.raises(Exception, match="live member"):
        s.delete_group("g")
