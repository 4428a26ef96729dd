"""Server-side partition assignors for consumer groups (KIP-848: the coordinator computes each target).

Each assignor is a pure function of the members (with their subscriptions and current targets) and the
partition count of every subscribed topic: no I/O, no clock, no randomness, and no dependence on the order
of its input. That matters because the coordinator's state is rebuilt by replaying a log: any replica that
replays the same group must compute the same target assignment.

- "uniform" (the default) is sticky: a member keeps what it owns unless that breaks balance, so a rebalance
  moves only the partitions it must (under KIP-848 every moved partition is a revoke, then an assign).
- "range" is Kafka's RangeAssignor: per topic, contiguous ranges in member order.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

TopicPartition = tuple[str, int]
Assignment = dict[str, frozenset[TopicPartition]]


@dataclass(frozen=True)
class MemberSpec:
    member_id: str
    instance_id: str | None  # static members (group.instance.id)
    subscribed_topics: frozenset[str]  # already resolved: the coordinator expands regexes
    current: frozenset[TopicPartition]  # the member's current target assignment, for stickiness


class Assignor(Protocol):
    name: str

    def assign(self, members: Sequence[MemberSpec], topic_partitions: Mapping[str, int]) -> Assignment:
        """member_id -> the partitions it should own, for every member (possibly empty).

        topic_partitions maps each existing subscribed topic to its partition count. Every partition of a
        topic someone subscribes to goes to exactly one subscriber of that topic; nothing else is assigned.
        """
        ...


def _unique(members: list[MemberSpec]) -> list[MemberSpec]:
    """The members sorted by id, refusing duplicate ids: the result is keyed by member id."""
    ordered = sorted(members, key=lambda m: m.member_id)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.member_id == b.member_id:
            raise ValueError(f"duplicate member id {a.member_id!r}")
    return ordered


@dataclass
class _Subscription:
    """Members subscribed to the same topics. They are interchangeable as far as eligibility goes, so the
    work per topic depends on the number of distinct subscriptions (usually one), not on the number of
    members: a group of 1,000 members subscribed to 1,000 topics is one subscription, not 10^6 pairs."""

    topics: list[str]  # the subscribed topics that exist, sorted
    members: list[MemberSpec]  # in the order they were given


def _by_subscription(members: list[MemberSpec], topic_partitions: Mapping[str, int]) -> list[_Subscription]:
    """Members grouped by subscription, the groups in order of their first member.

    Topics subscribed to but absent (deleted, or not created yet) are left out: nothing to assign there.
    """
    groups: dict[frozenset[str], _Subscription] = {}
    for member in members:
        group = groups.get(member.subscribed_topics)
        if group is None:
            topics = sorted(t for t in member.subscribed_topics if t in topic_partitions)
            for topic in topics:
                if topic_partitions[topic] < 0:
                    raise ValueError(f"topic {topic!r} has a negative partition count {topic_partitions[topic]}")
            group = groups[member.subscribed_topics] = _Subscription(topics, [])
        group.members.append(member)
    return list(groups.values())


def _subscribers(groups: list[_Subscription]) -> dict[str, list[int]]:
    """Existing subscribed topic -> indexes of the groups subscribed to it; topics nobody wants are absent."""
    subscribers: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        for topic in group.topics:
            subscribers.setdefault(topic, []).append(index)
    return subscribers


def _collect(members: list[MemberSpec], owner: Mapping[TopicPartition, str]) -> Assignment:
    assigned: dict[str, list[TopicPartition]] = {m.member_id: [] for m in members}
    for tp, member_id in owner.items():
        assigned[member_id].append(tp)
    return {member_id: frozenset(tps) for member_id, tps in assigned.items()}


class _Loads:
    """Partition count per member, and per topic its least-loaded subscriber (ties: lowest member id).

    Scanning a topic's subscribers for every partition would cost members x partitions (10^7 for a large
    group), so lookups go through heaps of two levels: one heap of (load, member_id) per subscription
    group, and per topic one heap of (load, member_id, group) holding each subscribed group's best member.
    Loads change after entries are pushed, so entries go stale; they are repaired when they reach the top.
    Invariant, at both levels: everyone has at least one entry that is <= its current (load, member_id).
    An entry below the current value is refreshed in place; one above it is dropped, because remove()
    pushed a lower entry when the value fell. So a top entry that matches the current value is the true
    minimum, and tuple order breaks ties by member id.
    """

    def __init__(self, groups: list[_Subscription], subscribers: Mapping[str, list[int]]) -> None:
        self.load: dict[str, int] = {m.member_id: 0 for group in groups for m in group.members}
        self._group_of = {m.member_id: index for index, group in enumerate(groups) for m in group.members}
        self._topics_of = [group.topics for group in groups]
        # Members come sorted by id, so each list of (0, member_id) is already a valid heap.
        self._member_heaps = [[(0, m.member_id) for m in group.members] for group in groups]
        self._topic_heaps: dict[str, list[tuple[int, str, int]]] = {}
        for topic, indexes in subscribers.items():
            heap = [(0, groups[i].members[0].member_id, i) for i in indexes]
            heapq.heapify(heap)
            self._topic_heaps[topic] = heap

    def _best_of_group(self, index: int) -> tuple[int, str]:
        heap = self._member_heaps[index]
        while True:
            load, member_id = heap[0]
            current = self.load[member_id]
            if load == current:
                return load, member_id
            if load < current:
                heapq.heapreplace(heap, (current, member_id))
            else:
                heapq.heappop(heap)

    def least_loaded(self, topic: str) -> str:
        heap = self._topic_heaps[topic]
        while True:
            load, member_id, index = heap[0]
            best = self._best_of_group(index)
            if (load, member_id) == best:
                return member_id
            if (load, member_id) < best:
                heapq.heapreplace(heap, (*best, index))
            else:
                heapq.heappop(heap)

    def add(self, member_id: str) -> None:
        # A rise only leaves entries too low, which the lookups repair lazily: nothing to push.
        self.load[member_id] += 1

    def remove(self, member_id: str) -> None:
        # A fall must be visible at once, or the member would hide behind its old, higher entries.
        load = self.load[member_id] - 1
        self.load[member_id] = load
        index = self._group_of[member_id]
        heapq.heappush(self._member_heaps[index], (load, member_id))
        if self._best_of_group(index) == (load, member_id):  # otherwise the group's best did not change
            for topic in self._topics_of[index]:
                heapq.heappush(self._topic_heaps[topic], (load, member_id, index))


class UniformAssignor:
    """Sticky and balanced, like Kafka's server-side "uniform" assignor.

    1. Each member keeps its current partitions that still exist and that it still subscribes to.
    2. Every other partition goes to its topic's least-loaded subscriber, the topics with the fewest
       subscribers first, so the members that can take anything fill the gaps the others leave.
    3. The most-loaded member hands a partition to that topic's least-loaded subscriber, as long as that
       one has at least two fewer; repeated until nobody can. Taking from the most loaded first means that
       when a member joins a balanced group, only the newcomer receives: the others shrink in step and
       never trade among themselves. Each move lowers the sum of squared loads, so this ends; when it
       has, members with the same subscription differ by at most one partition (one holding two more than
       a peer could still hand a partition over).
    """

    name = "uniform"

    def assign(self, members: Sequence[MemberSpec], topic_partitions: Mapping[str, int]) -> Assignment:
        ordered = _unique(list(members))
        groups = _by_subscription(ordered, topic_partitions)
        subscribers = _subscribers(groups)
        counts = {t: sum(len(groups[i].members) for i in indexes) for t, indexes in subscribers.items()}
        topics = sorted(subscribers, key=lambda t: (counts[t], t))
        loads = _Loads(groups, subscribers)
        owner = self._keep_current(ordered, topic_partitions, loads)
        self._assign_unowned(topics, topic_partitions, owner, loads)
        owned: dict[str, list[TopicPartition]] = {m.member_id: [] for m in ordered}
        # Lists in topic order, not in the order of `owner`: that one follows frozenset iteration, which
        # string hash randomisation makes differ between processes, and the lists decide who gives what.
        for topic in topics:
            for partition in range(topic_partitions[topic]):
                owned[owner[(topic, partition)]].append((topic, partition))
        self._balance(owned, loads)
        return {member_id: frozenset(tps) for member_id, tps in owned.items()}

    @staticmethod
    def _keep_current(
        ordered: list[MemberSpec], topic_partitions: Mapping[str, int], loads: _Loads
    ) -> dict[TopicPartition, str]:
        owner: dict[TopicPartition, str] = {}
        for member in ordered:
            for tp in member.current:
                topic, partition = tp
                valid = topic in member.subscribed_topics and 0 <= partition < topic_partitions.get(topic, 0)
                # Targets never overlap in a healthy group; if they do, the first member in id order keeps
                # the partition, so the result still does not depend on input order.
                if valid and tp not in owner:
                    owner[tp] = member.member_id
                    loads.add(member.member_id)
        return owner

    @staticmethod
    def _assign_unowned(
        topics: list[str], topic_partitions: Mapping[str, int], owner: dict[TopicPartition, str], loads: _Loads
    ) -> None:
        for topic in topics:
            for partition in range(topic_partitions[topic]):
                tp = (topic, partition)
                if tp not in owner:
                    member_id = loads.least_loaded(topic)
                    owner[tp] = member_id
                    loads.add(member_id)

    @classmethod
    def _balance(cls, owned: dict[str, list[TopicPartition]], loads: _Loads) -> None:
        load = loads.load
        moved = True
        while moved:  # a member that could give nothing may be able to once others have given: go round again
            moved = False
            # Max-heap of (-load, member_id). A member whose load rose is pushed again at once; entries
            # left behind with an old, lower load are skipped when they surface.
            heap = [(-len(tps), member_id) for member_id, tps in owned.items() if tps]
            heapq.heapify(heap)
            while heap:
                negative, giver = heapq.heappop(heap)
                if -negative != load[giver]:
                    continue
                move = cls._find_move(owned[giver], load[giver], loads)
                if move is None:
                    continue  # stuck for this round: every subscriber of its topics is within one
                index, receiver = move
                owned[receiver].append(owned[giver].pop(index))
                loads.remove(giver)
                loads.add(receiver)
                heapq.heappush(heap, (-load[giver], giver))
                heapq.heappush(heap, (-load[receiver], receiver))
                moved = True

    @staticmethod
    def _find_move(tps: list[TopicPartition], giver_load: int, loads: _Loads) -> tuple[int, str] | None:
        """(index in tps, receiver) of a partition the giver should hand over, or None.

        Searched from the end, so a member gives first what it received last and keeps its oldest.
        """
        checked: set[str] = set()  # topics whose least-loaded subscriber is within one: no need to ask again
        for index in range(len(tps) - 1, -1, -1):
            topic = tps[index][0]
            if topic in checked:
                continue
            receiver = loads.least_loaded(topic)
            if loads.load[receiver] < giver_load - 1:
                return index, receiver
            checked.add(topic)
        return None


def _range_order(member: MemberSpec) -> tuple[bool, str, str]:
    # Kafka's order (RangeAssignor's MemberInfo): static members first, by instance id, then the rest by
    # member id. A restarted static member comes back with a new member id but the same instance id, so
    # it gets the same ranges again.
    if member.instance_id is not None:
        return (False, member.instance_id, member.member_id)
    return (True, member.member_id, "")


def _ranges(count: int, members: int) -> Iterator[range]:
    """Split partitions 0..count-1 into contiguous ranges; the first count % members get one extra."""
    base, extra = divmod(count, members)
    start = 0
    for i in range(members):
        size = base + 1 if i < extra else base
        yield range(start, start + size)
        start += size


class RangeAssignor:
    """Kafka's RangeAssignor, topic by topic; not sticky (a join shifts every range after it)."""

    name = "range"

    def assign(self, members: Sequence[MemberSpec], topic_partitions: Mapping[str, int]) -> Assignment:
        ordered = sorted(_unique(list(members)), key=_range_order)
        groups = _by_subscription(ordered, topic_partitions)
        owner: dict[TopicPartition, str] = {}
        for topic, indexes in _subscribers(groups).items():
            for member_id, partitions in self._split(topic_partitions[topic], [groups[i] for i in indexes]):
                for partition in partitions:
                    owner[(topic, partition)] = member_id
        return _collect(ordered, owner)

    @staticmethod
    def _split(count: int, groups: list[_Subscription]) -> Iterator[tuple[str, range]]:
        """(member_id, its range) for the subscribers of one topic that get a non-empty range."""
        total = sum(len(group.members) for group in groups)
        # Each group's members are already in range order, so merging them gives the topic's subscribers
        # in order; only the first `count` can get anything, so the rest are never visited.
        subscribers = heapq.merge(*(group.members for group in groups), key=_range_order)
        for member, partitions in zip(itertools.islice(subscribers, count), _ranges(count, total), strict=False):
            yield member.member_id, partitions


ASSIGNORS: dict[str, Assignor] = {"uniform": UniformAssignor(), "range": RangeAssignor()}
DEFAULT_ASSIGNOR = "uniform"


def get_assignor(name: str) -> Assignor:
    """The assignor called name; "" (a client that named none) means the default."""
    assignor = ASSIGNORS.get(name or DEFAULT_ASSIGNOR)
    if assignor is None:
        raise ValueError(f"unknown assignor {name!r}: known ones are {', '.join(sorted(ASSIGNORS))}")
    return assignor
