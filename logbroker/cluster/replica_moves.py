"""Replica moves, decided without I/O: the next membership step towards a target, and drain plans.

A move takes a partition's Raft group from its current voters to a target set one membership change at a
time (docs/replica-moves.md): every new broker joins as a learner, is promoted once it has caught up, and
only then are the old voters removed, the leader last (it hands its leadership to a target voter first).
The voter count never drops below the smaller of the old and new sets, so a move never costs a majority.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from logbroker.raft.membership import Membership

ADD_LEARNER = "add_learner"
PROMOTE = "promote"
REMOVE = "remove"
TRANSFER = "transfer"
WAIT = "wait"
DONE = "done"


@dataclass(frozen=True)
class MoveStep:
    action: str  # one of the constants above
    node: int = -1  # the broker the step is about (-1 for WAIT and DONE)
    why: str = ""  # for the log: what the step does or waits for


def next_move_step(membership: Membership, target: Sequence[int], leader: int,
                   caught_up: Callable[[int], bool]) -> MoveStep:
    """The one membership change the leader should make next (or WAIT, or DONE once voters == target).

    caught_up(node) says whether a learner or voter holds everything committed so far."""
    wanted = set(target)
    for node in sorted(membership.learners - wanted):
        return MoveStep(REMOVE, node, f"broker {node} is a learner left from an earlier target")
    for node in target:
        if node not in membership.members:
            return MoveStep(ADD_LEARNER, node, f"broker {node} joins as a learner and copies the log")
    learners = [node for node in target if node in membership.learners]
    for node in learners:
        if caught_up(node):
            return MoveStep(PROMOTE, node, f"broker {node} has caught up and becomes a voter")
    if learners:
        return MoveStep(WAIT, why=f"broker(s) {', '.join(map(str, learners))} still catching up")
    for node in sorted(membership.voters - wanted - {leader}):
        return MoveStep(REMOVE, node, f"broker {node} leaves the partition")
    if leader not in wanted:
        heirs = [node for node in target if caught_up(node)]
        if not heirs:
            return MoveStep(WAIT, why="no broker of the target has caught up to take leadership yet")
        return MoveStep(TRANSFER, heirs[0], f"broker {leader} hands leadership to broker {heirs[0]} before it leaves")
    return MoveStep(DONE, why=f"the voters are now {', '.join(map(str, target))}")


class MoveRefused(ValueError):
    """A target or drain that cannot be done; the message says why and what to do."""


def check_target(where: str, target: Sequence[int], brokers: Sequence[int]) -> list[int]:
    """The target as a list, or MoveRefused naming the first problem with it. A broker that is down is allowed:
    the move waits for it (liveness flickers under load, and the operator may be restarting it)."""
    if not target:
        raise MoveRefused(f"{where}: a partition needs at least one replica (replication factor 0 asked); "
                          "name the brokers to hold it, e.g. --to 1,2,3")
    repeated = sorted(node for node, count in Counter(target).items() if count > 1)
    if repeated:
        raise MoveRefused(f"{where}: broker {repeated[0]} is named more than once in {list(target)}; a broker "
                          "holds at most one replica of a partition")
    unknown = [node for node in target if node not in brokers]
    if unknown:
        raise MoveRefused(f"{where}: broker {unknown[0]} is not in this cluster (brokers "
                          f"{', '.join(map(str, sorted(brokers)))})")
    return list(target)


def plan_drain(broker: int, assignments: Mapping[tuple[str, int], Sequence[int]], brokers: Sequence[int],
               live: Sequence[int]) -> dict[tuple[str, int], list[int]]:
    """A target for every partition with a replica on ``broker``: that replica goes to the broker, not already
    holding one of the partition, that is up and holds the fewest replicas so far (then the lowest id). When
    ``broker`` was the preferred leader, the next replica takes that role, so leadership stays on a broker
    that already has the data."""
    load = Counter(node for replicas in assignments.values() for node in replicas)
    candidates = [node for node in brokers if node != broker]
    plan: dict[tuple[str, int], list[int]] = {}
    for (topic, partition), replicas in sorted(assignments.items()):
        if broker not in replicas:
            continue
        free = [node for node in candidates if node not in replicas]
        if not free:
            raise MoveRefused(
                f"cannot drain broker {broker}: {topic}-{partition} has replicas on "
                f"{', '.join(map(str, replicas))} and no other broker can take one; add a broker first")
        heir = min(free, key=lambda node: (node not in live, load[node], node))
        load[heir] += 1
        load[broker] -= 1
        kept = [node for node in replicas if node != broker]
        plan[(topic, partition)] = kept + [heir] if replicas[0] == broker else \
            [heir if node == broker else node for node in replicas]
    return plan
