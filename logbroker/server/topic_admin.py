"""Changing a topic after its creation: configs, partition count, and where its replicas live.

Each change is a controller command, proposed on the controller leader after the same validation as a
create, so that every broker applies it at the same point of the metadata log (broker.py reacts to the
events: new configs on open logs, new replicas opened, moved replicas closed).

Replica moves: the controller only records each partition's target replica set. The broker that leads the
partition drives the Raft membership changes towards it, one per maintenance round (the core allows one
uncommitted change at a time), and reports the move done to the controller once its voters are the target
and that configuration is committed. Why the leader and not the controller: docs/replica-moves.md.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from logbroker.cluster.metadata import place_replicas
from logbroker.cluster.replica import Replica
from logbroker.cluster.replica_moves import (
    ADD_LEARNER,
    DONE,
    PROMOTE,
    REMOVE,
    TRANSFER,
    MoveRefused,
    MoveStep,
    check_target,
    next_move_step,
    plan_drain,
)
from logbroker.cluster.topic_names import MAX_PARTITIONS
from logbroker.raft.errors import LeadershipTransferError, MembershipChangeError, NotLeaderError, ProposalDroppedError
from logbroker.raft.membership import ChangeKind, MembershipChange
from logbroker.server import errors
from logbroker.storage.config import LOG_CONFIG_KEYS

if TYPE_CHECKING:
    from logbroker.server.broker import Broker

log = logging.getLogger("logbroker.topic_admin")

MOVE_DONE_TIMEOUT_S = 10.0
_CHANGE_KINDS = {ADD_LEARNER: ChangeKind.ADD_LEARNER, PROMOTE: ChangeKind.PROMOTE_LEARNER,
                 REMOVE: ChangeKind.REMOVE_NODE}

# Set by the server layer: tells the controller leader at an address that a partition's move is done.
MoveDoneSender = Callable[[str, int, str, str, int, list[int]], Awaitable[None]]


class TopicAdmin:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.send_move_done: MoveDoneSender | None = None
        self._finishing: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._last_step: dict[tuple[str, int], MoveStep] = {}

    # ------------------------------------------------------------------ on the controller leader

    async def alter_configs(self, name: str, changes: dict[str, str], deletes: list[str],
                            timeout_s: float, validate_only: bool = False) -> dict[str, str]:
        """Set and remove a topic's config overrides; returns the new overrides. Refused whole, naming the
        bad key or value, when any of them is wrong."""
        topic = self.broker.controller_client.topic(name)
        if name.startswith("__"):
            raise errors.InvalidConfig(f"topic {name!r} is internal; its settings are the broker's own")
        unknown = [key for key in deletes if key not in LOG_CONFIG_KEYS]
        if unknown:
            raise errors.InvalidConfig(f"topic {name!r}: cannot delete unknown config key {unknown[0]!r}: "
                                       f"allowed keys are {', '.join(sorted(LOG_CONFIG_KEYS))}")
        overrides = {**topic.configs, **changes}
        for key in deletes:
            overrides.pop(key, None)
        self.broker.controller_client.checked_log_config(name, overrides)
        if validate_only:
            return overrides
        await self.broker.controller_client.propose_command(
            {"op": "alter_topic_configs", "name": name, "topic_id": topic.topic_id, "configs": overrides}, timeout_s)
        log.info("topic %s: config overrides now %s", name, overrides or "none (broker defaults)")
        return overrides

    async def add_partitions(self, name: str, total: int, timeout_s: float) -> None:
        """Grow the topic to ``total`` partitions, the new ones placed over the live brokers."""
        topic = self.broker.controller_client.topic(name)
        if name.startswith("__"):
            raise errors.InvalidPartitions(f"topic {name!r} is internal; its partition count is fixed")
        if total <= topic.partitions:
            raise errors.InvalidPartitions(
                f"topic {name!r} has {topic.partitions} partition(s) and partitions are never removed (keys would "
                f"map elsewhere); ask for more than {topic.partitions}")
        if total > MAX_PARTITIONS:
            raise errors.InvalidPartitions(f"topic {name!r}: at most {MAX_PARTITIONS} partitions, asked {total}")
        live = self.broker.replicas.live_brokers()
        if topic.replication_factor > len(live):
            raise errors.InvalidReplicationFactor(
                f"topic {name!r} has replication factor {topic.replication_factor} but only {len(live)} broker(s) "
                f"are up ({', '.join(map(str, live))}); start the others and try again")
        placed = place_replicas(live, total, topic.replication_factor, salt=hash(name) & 0xFFFF)
        await self.broker.controller_client.await_disks_registered(placed[topic.partitions:], f"topic {name!r}",
                                                                   timeout_s)
        await self.broker.controller_client.propose_command(
            {"op": "add_partitions", "name": name, "topic_id": topic.topic_id, "from": topic.partitions,
             "assignment": placed[topic.partitions:]}, timeout_s)
        if self.broker.cluster.topics.get(name) is not topic or topic.partitions != total:
            raise errors.InvalidPartitions(f"topic {name!r} was changed by a concurrent request; it now has "
                                           f"{topic.partitions} partition(s): describe it and try again")
        await self.broker.controller_client.wait_for_leaders(name, timeout_s)
        log.info("topic %s: grown to %d partitions", name, total)

    async def move_replicas(self, name: str, targets: dict[int, list[int]], timeout_s: float) -> None:
        """Record where each named partition's replicas must go; the partition leaders do the moving."""
        topic = self.broker.controller_client.topic(name)
        brokers = sorted(self.broker.peers)
        for partition, target in targets.items():
            if not 0 <= partition < topic.partitions:
                raise errors.UnknownTopicOrPartition(
                    f"topic {name!r} has partitions 0..{topic.partitions - 1}; partition {partition} does not exist")
            try:
                check_target(f"{name}-{partition}", target, brokers)
            except MoveRefused as exc:
                refused = errors.InvalidRequest(str(exc)) if target else errors.InvalidReplicationFactor(str(exc))
                raise refused from None
        await self.broker.controller_client.propose_command(
            {"op": "move_replicas", "name": name, "topic_id": topic.topic_id,
             "moves": sorted([p, t] for p, t in targets.items())}, timeout_s)
        log.info("topic %s: moving %s", name, ", ".join(f"partition {p} to {t}" for p, t in sorted(targets.items())))

    async def drain(self, node: int, timeout_s: float) -> dict[tuple[str, int], list[int]]:
        """Move every replica off ``node``; returns the target of every partition moved."""
        if node not in self.broker.peers:
            raise errors.InvalidRequest(f"broker {node} is not in this cluster (brokers "
                                        f"{', '.join(map(str, sorted(self.broker.peers)))})")
        cluster = self.broker.cluster
        current = {(name, p): cluster.moves.get((name, p), replicas)
                   for name, topic in cluster.topics.items() for p, replicas in enumerate(topic.assignment)}
        try:
            plan = plan_drain(node, current, sorted(self.broker.peers), self.broker.replicas.live_brokers())
        except MoveRefused as exc:
            raise errors.InvalidRequest(str(exc)) from None
        by_topic: dict[str, dict[int, list[int]]] = {}
        for (name, partition), target in plan.items():
            by_topic.setdefault(name, {})[partition] = target
        for name, targets in sorted(by_topic.items()):
            await self.move_replicas(name, targets, timeout_s)
        return plan

    async def finish_move(self, from_node: int, name: str, topic_id: str, partition: int,
                          replicas: list[int]) -> None:
        """A partition leader says its voters are now the target: record the new assignment."""
        topic = self.broker.cluster.topics.get(name)
        if topic is None or topic.topic_id != topic_id:
            raise errors.UnknownTopicOrPartition(f"topic {name!r} with ID {topic_id} does not exist")
        if from_node not in replicas:
            raise errors.InvalidRequest(f"broker {from_node} is not in {replicas}: it cannot lead {name}-{partition}")
        if self.broker.cluster.moves.get((name, partition)) != replicas:
            return  # finished already, or retargeted: the leader goes on towards the new target
        await self.broker.controller_client.propose_command(
            {"op": "move_done", "name": name, "topic_id": topic_id, "partition": partition, "replicas": replicas},
            MOVE_DONE_TIMEOUT_S)

    # ------------------------------------------------------------------ on each partition leader

    def drive_moves(self) -> None:
        """One step of every move of a partition this broker leads (called every maintenance round)."""
        for key, target in list(self.broker.cluster.moves.items()):
            replica = self.broker.replicas.hosted_replica(*key)
            if replica is None or not replica.is_leader or replica.closed:
                continue
            step = next_move_step(replica.node.membership, target, self.broker.node_id,
                                  functools.partial(_caught_up, replica))
            if self._last_step.get(key) != step:
                self._last_step[key] = step
                log.info("%s: move to %s: %s%s", replica.name, target, step.action.replace("_", " "),
                         f": {step.why}" if step.why else "")
            self._take(key, replica, step, target)
        for key in list(self._last_step):
            if key not in self.broker.cluster.moves:
                del self._last_step[key]

    def _take(self, key: tuple[str, int], replica: Replica, step: MoveStep, target: list[int]) -> None:
        node = replica.node
        try:
            if step.action in _CHANGE_KINDS:
                node.propose_membership_change(MembershipChange(_CHANGE_KINDS[step.action], step.node))
                replica.wake()  # a quiet leader must send the change out now
            elif step.action == TRANSFER and node.lead_transferee is None:
                replica.transfer_leadership(step.node)
            elif step.action == DONE and node.membership_at(node.commit_offset) == node.membership:
                self._report_done(key, replica, target)
        except (MembershipChangeError, NotLeaderError, ProposalDroppedError, LeadershipTransferError) as exc:
            # An earlier change not committed yet, a leader new in its term, leadership moving: next round.
            log.debug("%s: move step %s deferred: %s", replica.name, step.action, exc)

    def _report_done(self, key: tuple[str, int], replica: Replica, target: list[int]) -> None:
        running = self._finishing.get(key)
        if running is not None and not running.done():
            return
        topic = self.broker.cluster.topics[key[0]]
        task = asyncio.get_running_loop().create_task(self._send_done(key, topic.topic_id, target))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._finishing[key] = task

    async def _send_done(self, key: tuple[str, int], topic_id: str, target: list[int]) -> None:
        name, partition = key
        controller = self.broker.controller
        assert controller is not None
        try:
            if controller.is_leader:
                await self.finish_move(self.broker.node_id, name, topic_id, partition, target)
            elif controller.leader_id is not None and self.send_move_done is not None:
                await self.send_move_done(self.broker.peers[controller.leader_id], self.broker.node_id, name,
                                          topic_id, partition, target)
        except Exception as exc:  # the controller is moving: the next round reports again
            log.debug("%s-%d: move-done report failed (%s); retrying", name, partition, exc)

    def close(self) -> None:
        for task in self._finishing.values():
            task.cancel()


def _caught_up(replica: Replica, node: int) -> bool:
    """Whether ``node`` holds every committed entry of the leader's log (the core's promotion rule)."""
    progress = replica.node.progress(node)
    return progress is not None and progress.match_offset >= replica.node.commit_offset

