"""Priority lanes for queues: a queue with N priority levels is N topics, and consumers weigh them.

Level 0 is the default and the least urgent; it is the queue's own topic, so producers and consumers that know
nothing of priorities keep working on it. Level k > 0 is the topic `<queue>.p<k>`; the higher k, the more urgent
(RabbitMQ's convention: a higher number goes first). A share consumer subscribed with priorities=N fetches
the lanes 0..N-1, the most urgent first, while every lane keeps a guaranteed share of the fetches (lane k
weighs 2**k, so with three lanes the shares are 4/7, 2/7 and 1/7 while all three have work): a flood of
urgent jobs slows the others down but never starves them.

Why lanes and not a priority index on the partition leader: the order within a level stays the log's own
(nothing to sort, nothing to persist or rebuild after a failover), each lane scales with partitions and is
watched on its own (`lb share describe` shows the depth of every lane), and a lane can be given its own
retention or replication. The cost is a handful of topics per queue, and that priority is only as exact as
the weighting: an urgent job waits at most for the records already fetched, never behind the backlog.
Lanes led by different brokers are fetched concurrently (with max_in_flight's room shared among them), so
when several lanes have records at the same moment a poll may start with a less urgent lane's; within what
has arrived, the most urgent records are handed out first.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_PRIORITY_LEVELS = 10
DEFAULT_PRIORITY = 0


def check_priority(priority: int, levels: int = MAX_PRIORITY_LEVELS) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority < levels:
        raise ValueError(f"priority must be a whole number from 0 (the default, least urgent) to {levels - 1} "
                         f"(most urgent), got {priority!r}")
    return priority


def check_levels(levels: int) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= MAX_PRIORITY_LEVELS:
        raise ValueError(f"priorities must be a whole number of levels from 1 (no priorities) to "
                         f"{MAX_PRIORITY_LEVELS}, got {levels!r}")
    return levels


def lane_topic(queue: str, priority: int) -> str:
    """The topic that holds a queue's records of one priority level: the queue itself for level 0."""
    return queue if priority == DEFAULT_PRIORITY else f"{queue}.p{priority}"


def lane_topics(queue: str, levels: int) -> list[tuple[str, int]]:
    """(topic, level) of every lane of a queue with this many levels, the most urgent first."""
    return [(lane_topic(queue, level), level) for level in reversed(range(check_levels(levels)))]


def lane_weight(level: int) -> int:
    return 1 << level


class LaneScheduler:
    """Which level leads the next fetch: smooth weighted round-robin (nginx's) over the levels, lane k weighing
    2**k. Over any 2**N - 1 consecutive fetches with N levels, level k leads exactly 2**k of them, and the
    fetches each level leads are spread out, not bunched. order() only looks; advance() counts a fetch made."""

    def __init__(self) -> None:
        self._credit: dict[int, int] = {}

    def _lead(self, present: list[int]) -> int:
        return max(present, key=lambda level: (self._credit.get(level, 0) + lane_weight(level), level))

    def order(self, levels: Iterable[int]) -> list[int]:
        """The levels for the next fetch: the leading one first, then the others from the most urgent down."""
        present = sorted(set(levels), reverse=True)
        if not present:
            raise ValueError("no lane to schedule")
        lead = self._lead(present)
        return [lead, *(level for level in present if level != lead)]

    def advance(self, levels: Iterable[int]) -> int:
        """A fetch led by order()'s first level went out: move the credits on; returns that level."""
        present = sorted(set(levels), reverse=True)
        lead = self._lead(present)
        for level in present:
            self._credit[level] = self._credit.get(level, 0) + lane_weight(level)
        self._credit[lead] -= sum(lane_weight(level) for level in present)
        return lead
