"""The server-side assignors: validity for any input, uniform's balance and stickiness, range per Kafka."""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logbroker.groups.assignors import (
    ASSIGNORS,
    DEFAULT_ASSIGNOR,
    Assignor,
    MemberSpec,
    RangeAssignor,
    UniformAssignor,
    get_assignor,
)

TopicPartition = tuple[str, int]
Group = tuple[list[MemberSpec], dict[str, int]]

TOPICS = ["a", "b", "c", "d"]
NAMES = [*TOPICS, "gone"]  # "gone" is subscribed to now and then but never exists
UNIFORM = UniformAssignor()
RANGE = RangeAssignor()
BOTH = pytest.mark.parametrize("assignor", [UNIFORM, RANGE], ids=["uniform", "range"])

# No deadline: the first examples pay for warm-up, and a slow CI box is no bug. Applied per test: loading
# a profile would change the settings of every other module in the run.
props = settings(deadline=None, max_examples=100)


def member(member_id: str, topics: set[str] | frozenset[str], current: set[TopicPartition] | None = None,
           instance_id: str | None = None) -> MemberSpec:
    return MemberSpec(member_id, instance_id, frozenset(topics), frozenset(current or ()))


member_ids = st.text(alphabet="mnxyz0123", min_size=1, max_size=4)
topic_sets = st.frozensets(st.sampled_from(NAMES))
partition_counts = st.dictionaries(st.sampled_from(TOPICS), st.integers(0, 12), max_size=len(TOPICS))


@st.composite
def groups(draw: st.DrawFn, homogeneous: bool = False) -> Group:
    """Members with any subscriptions and any current targets: stale, overlapping, out of range, or for
    topics they no longer want. The assignor must cope with all of it."""
    topic_partitions = draw(partition_counts)
    ids = draw(st.lists(member_ids, max_size=8, unique=True))
    shared = draw(topic_sets)
    members = []
    for member_id in ids:
        topics = shared if homogeneous else draw(topic_sets)
        current = draw(st.frozensets(st.tuples(st.sampled_from(NAMES), st.integers(-1, 13)), max_size=10))
        instance_id = draw(st.none() | st.sampled_from(["s0", "s1", "s2"]))  # duplicates on purpose
        members.append(MemberSpec(member_id, instance_id, topics, current))
    return members, topic_partitions


@st.composite
def balanced_groups(draw: st.DrawFn) -> Group:
    """A homogeneous group of 1..10 members whose targets deal every partition out, counts within one."""
    topic_partitions = draw(st.dictionaries(st.sampled_from(TOPICS), st.integers(1, 30), min_size=1))
    topics = frozenset(topic_partitions)
    ids = draw(st.lists(member_ids, min_size=1, max_size=10, unique=True))
    partitions = draw(st.permutations([(t, p) for t, count in topic_partitions.items() for p in range(count)]))
    return [member(member_id, topics, set(partitions[i::len(ids)])) for i, member_id in enumerate(ids)], \
        topic_partitions


def subscribed_partitions(members: Sequence[MemberSpec], topic_partitions: Mapping[str, int]) -> set[TopicPartition]:
    wanted = set().union(*(m.subscribed_topics for m in members))
    return {(t, p) for t, count in topic_partitions.items() if t in wanted for p in range(count)}


def check_valid(members: Sequence[MemberSpec], topic_partitions: Mapping[str, int],
                result: Mapping[str, frozenset[TopicPartition]]) -> None:
    by_id = {m.member_id: m for m in members}
    assert set(result) == set(by_id)  # everyone appears, even with nothing
    handed_out = [tp for member_id, tps in result.items() for tp in tps
                  if tp[0] in by_id[member_id].subscribed_topics]
    assert sum(map(len, result.values())) == len(handed_out), "a partition went to a non-subscriber"
    assert len(handed_out) == len(set(handed_out)), "a partition went to two members"
    assert set(handed_out) == subscribed_partitions(members, topic_partitions)


def spread(counts: Sequence[int]) -> int:
    return max(counts) - min(counts) if counts else 0


def with_current(members: Sequence[MemberSpec], result: Mapping[str, frozenset[TopicPartition]]) -> list[MemberSpec]:
    return [MemberSpec(m.member_id, m.instance_id, m.subscribed_topics, result[m.member_id]) for m in members]


# Any assignor, any input


@BOTH
@props
@given(group=groups())
def test_every_subscribed_partition_goes_to_exactly_one_subscriber(assignor: Assignor, group: Group) -> None:
    members, topic_partitions = group
    check_valid(members, topic_partitions, assignor.assign(members, topic_partitions))


@BOTH
@props
@given(group=groups(), seed=st.integers(0, 2**32 - 1))
def test_the_result_does_not_depend_on_input_order(assignor: Assignor, group: Group, seed: int) -> None:
    members, topic_partitions = group
    expected = assignor.assign(members, topic_partitions)
    shuffled = random.Random(seed).sample(members, len(members))
    reordered_topics = dict(random.Random(seed).sample(sorted(topic_partitions.items()), len(topic_partitions)))
    assert assignor.assign(shuffled, reordered_topics) == expected
    assert assignor.assign(members, topic_partitions) == expected


@BOTH
def test_partitions_of_unwanted_or_missing_topics_are_dropped(assignor: Assignor) -> None:
    members = [member("m1", {"a", "gone"}, {("a", 0), ("a", 7), ("gone", 0), ("b", 1)})]
    result = assignor.assign(members, {"a": 2, "b": 2, "c": 1})
    # "b" and "c" exist but nobody subscribes; "gone" is subscribed but no longer exists; a-7 is out of range.
    assert result == {"m1": frozenset({("a", 0), ("a", 1)})}


@BOTH
def test_no_members_or_no_topics(assignor: Assignor) -> None:
    assert assignor.assign([], {"a": 3}) == {}
    assert assignor.assign([member("m1", {"a"})], {}) == {"m1": frozenset()}
    assert assignor.assign([member("m1", {"a"})], {"a": 0}) == {"m1": frozenset()}


@BOTH
def test_bad_input_is_refused(assignor: Assignor) -> None:
    with pytest.raises(ValueError, match="duplicate member id 'm1'"):
        assignor.assign([member("m1", {"a"}), member("m1", {"b"})], {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="negative partition count"):
        assignor.assign([member("m1", {"a"})], {"a": -1})


# Uniform: balance


@props
@given(group=groups(homogeneous=True))
def test_uniform_balances_a_homogeneous_group(group: Group) -> None:
    members, topic_partitions = group
    result = UNIFORM.assign(members, topic_partitions)
    assert spread([len(tps) for tps in result.values()]) <= 1


@props
@given(group=groups())
def test_uniform_balances_members_with_the_same_subscription(group: Group) -> None:
    members, topic_partitions = group
    result = UNIFORM.assign(members, topic_partitions)
    counts: dict[frozenset[str], list[int]] = defaultdict(list)
    for m in members:
        counts[m.subscribed_topics].append(len(result[m.member_id]))
    assert all(spread(same) <= 1 for same in counts.values())


def test_uniform_gives_constrained_topics_first_so_the_flexible_fill_the_gaps() -> None:
    # Only m2 can take "b". Handing out "a" first would give m2 one of it and leave m2 with 3 against 1.
    result = UNIFORM.assign([member("m1", {"a"}), member("m2", {"a", "b"})], {"a": 2, "b": 2})
    assert result == {"m1": frozenset({("a", 0), ("a", 1)}), "m2": frozenset({("b", 0), ("b", 1)})}


def test_uniform_spreads_a_fresh_group_round_robin() -> None:
    members = [member(f"m{i}", {"a"}) for i in range(3)]
    result = UNIFORM.assign(members, {"a": 7})
    assert result == {"m0": frozenset({("a", 0), ("a", 3), ("a", 6)}), "m1": frozenset({("a", 1), ("a", 4)}),
                      "m2": frozenset({("a", 2), ("a", 5)})}


# Uniform: stickiness


@props
@given(group=groups())
def test_uniform_keeps_its_own_result(group: Group) -> None:
    members, topic_partitions = group
    first = UNIFORM.assign(members, topic_partitions)
    assert UNIFORM.assign(with_current(members, first), topic_partitions) == first


@props
@given(group=balanced_groups(), newcomer=member_ids)
def test_uniform_join_moves_only_what_the_newcomer_needs(group: Group, newcomer: str) -> None:
    members, topic_partitions = group
    if newcomer in {m.member_id for m in members}:
        newcomer += "-new"
    topics = members[0].subscribed_topics
    result = UNIFORM.assign([*members, member(newcomer, topics)], topic_partitions)
    moved = sum(len(m.current - result[m.member_id]) for m in members)
    total = sum(topic_partitions.values())
    assert moved <= math.ceil(total / (len(members) + 1)) + 1
    assert moved == len(result[newcomer])  # nothing shuffled among the old members
    assert spread([len(tps) for tps in result.values()]) <= 1


@props
@given(group=balanced_groups(), data=st.data())
def test_uniform_leave_moves_only_the_leavers_partitions(group: Group, data: st.DataObject) -> None:
    members, topic_partitions = group
    leaver = data.draw(st.sampled_from(members))
    staying = [m for m in members if m is not leaver]
    result = UNIFORM.assign(staying, topic_partitions)
    check_valid(staying, topic_partitions, result)
    assert all(m.current <= result[m.member_id] for m in staying)
    assert spread([len(tps) for tps in result.values()]) <= 1


def test_uniform_unsubscribing_hands_the_topic_over_then_rebalances() -> None:
    before = UNIFORM.assign([member("m1", {"a", "b"}), member("m2", {"a", "b"})], {"a": 4, "b": 4})
    assert before == {"m1": frozenset({("a", 0), ("a", 2), ("b", 0), ("b", 2)}),
                      "m2": frozenset({("a", 1), ("a", 3), ("b", 1), ("b", 3)})}
    # m1 drops "b": m2, its only subscriber, takes b-0 and b-2 (6 against 2), then hands over its two "a"
    # partitions to get back within one. m1 keeps what it still wants.
    after = UNIFORM.assign(with_current([member("m1", {"a"}), member("m2", {"a", "b"})], before), {"a": 4, "b": 4})
    assert after == {"m1": frozenset({("a", 0), ("a", 1), ("a", 2), ("a", 3)}),
                     "m2": frozenset({("b", 0), ("b", 1), ("b", 2), ("b", 3)})}


def test_uniform_is_fast_for_1000_members_and_10000_partitions() -> None:
    topic_partitions = {f"t{i}": 1000 for i in range(10)}
    topics = frozenset(topic_partitions)
    members = [member(f"m{i:04d}", topics) for i in range(1000)]
    started = time.perf_counter()
    first = UNIFORM.assign(members, topic_partitions)
    grown = [*with_current(members, first), member("m9999", topics)]
    second = UNIFORM.assign(grown, topic_partitions)
    elapsed = time.perf_counter() - started
    check_valid(grown, topic_partitions, second)
    assert spread([len(tps) for tps in second.values()]) <= 1
    assert elapsed < 2.0  # measured at ~35 ms for both runs; the bound only catches a quadratic regression


# Range


def kafka_range(members: Sequence[MemberSpec], topic_partitions: Mapping[str, int]) -> dict[str, set[TopicPartition]]:
    """An oracle written from Kafka's RangeAssignor.assign (its arithmetic, its member order)."""
    def order(m: MemberSpec) -> tuple[int, str, str]:
        return (0, m.instance_id, m.member_id) if m.instance_id is not None else (1, m.member_id, "")

    result: dict[str, set[TopicPartition]] = {m.member_id: set() for m in members}
    for topic, count in topic_partitions.items():
        consumers = sorted((m for m in members if topic in m.subscribed_topics), key=order)
        if not consumers:
            continue
        per_consumer, extra = divmod(count, len(consumers))
        for i, consumer in enumerate(consumers):
            start = per_consumer * i + min(i, extra)
            length = per_consumer + (0 if i + 1 > extra else 1)
            result[consumer.member_id].update((topic, p) for p in range(start, start + length))
    return result


def test_range_matches_kafkas_documented_example() -> None:
    # Kafka's javadoc: two consumers C0, C1; topics t0, t1 of 3 partitions each.
    members = [member("c1", {"t0", "t1"}), member("c0", {"t0", "t1"})]
    assert RANGE.assign(members, {"t0": 3, "t1": 3}) == {
        "c0": frozenset({("t0", 0), ("t0", 1), ("t1", 0), ("t1", 1)}),
        "c1": frozenset({("t0", 2), ("t1", 2)}),
    }
    assert RANGE.assign(members, {"t0": 3}) == {"c0": frozenset({("t0", 0), ("t0", 1)}),
                                                 "c1": frozenset({("t0", 2)})}


def test_range_puts_static_members_first_by_instance_id() -> None:
    # Kafka's order: a restarted static member (new member id, same instance id) gets its range back.
    members = [member("a", {"t"}), member("z", {"t"}, instance_id="i1"), member("b", {"t"}, instance_id="i0")]
    assert RANGE.assign(members, {"t": 5}) == {"b": frozenset({("t", 0), ("t", 1)}),
                                               "z": frozenset({("t", 2), ("t", 3)}), "a": frozenset({("t", 4)})}


@props
@given(group=groups())
def test_range_agrees_with_kafkas_arithmetic(group: Group) -> None:
    members, topic_partitions = group
    expected = kafka_range(members, topic_partitions)
    assert RANGE.assign(members, topic_partitions) == {k: frozenset(v) for k, v in expected.items()}


# Lookup


def test_get_assignor() -> None:
    assert DEFAULT_ASSIGNOR == "uniform"
    assert get_assignor("") is ASSIGNORS["uniform"] and get_assignor("uniform").name == "uniform"
    assert isinstance(get_assignor("range"), RangeAssignor) and get_assignor("range").name == "range"
    assert {name: a.name for name, a in ASSIGNORS.items()} == {"uniform": "uniform", "range": "range"}
    with pytest.raises(ValueError, match=r"unknown assignor 'sticky'.*range, uniform"):
        get_assignor("sticky")
    with pytest.raises(ValueError, match="unknown assignor"):
        get_assignor("Range")
