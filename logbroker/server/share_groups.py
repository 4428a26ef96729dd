"""Share groups on the broker: each partition's share state machine, group configs, and dead letters.

The share state of a partition lives on its leader (ShareStateMachine, attached to the replica when it
opens); this module finds it for the front-ends, ticks it (lock expiry, dead letters, snapshots) and
appends the records it dead-letters to the group's dead-letter topic, wherever that partition is led.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from typing import TYPE_CHECKING

from logbroker_client import records as rec

from logbroker.groups.share import InvalidShareConfig, RecordState, ShareConfig, share_config_from
from logbroker.groups.share_runtime import ShareStateMachine
from logbroker.server import errors

if TYPE_CHECKING:
    from logbroker.server.broker import Broker

log = logging.getLogger("logbroker.broker")


def dead_letter_producer_id(group_id: str, topic: str, partition: int) -> int:
    """Fixed for (group, source partition): in [2^61, 2^62), away from clients' random 62-bit ids' usual range."""
    return (1 << 61) | (zlib.crc32(f"{group_id}\0{topic}\0{partition}".encode()) << 16)


class ShareGroups:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._ticks: dict[tuple[str, int], asyncio.Task[None]] = {}
        # The share states tick() visits, with their partitions: keyed by the machine, so a replaced one (its
        # replica reopened) and its successor are both present until tick() drops the one no longer in use.
        self._with_groups: dict[ShareStateMachine, tuple[str, int]] = {}

    def add_machine(self, topic: str, index: int, machine: ShareStateMachine) -> None:
        """Serve this partition's share groups from machine, and visit it in tick() from its first group on."""
        key = (topic, index)
        self.broker.share_machines[key] = machine

        def added() -> None:
            self._with_groups[machine] = key

        machine.on_group_added = added
        if machine.groups:
            added()

    def share_config(self, group_id: str) -> ShareConfig:
        try:
            return share_config_from(self.broker.cluster.group_configs.get(group_id, {}))
        except InvalidShareConfig:
            return ShareConfig()  # validated before it was proposed; a newer version's key: use defaults

    def share_machine(self, topic: str, index: int) -> ShareStateMachine:
        if topic.startswith("__"):
            raise errors.InvalidTopic(f"topic {topic!r} is internal; share groups read user topics")
        replica = self.broker.replicas.leader_replica(topic, index)
        machine = self.broker.share_machines.get((topic, index))
        if machine is None or machine.replica is not replica:
            raise errors.NotLeader(f"{topic}-{index}: share state is not loaded here; retry", leader_id=-1)
        return machine

    async def alter_group_configs(self, group_id: str, configs: dict[str, str], timeout_s: float) -> None:
        merged = {**self.broker.cluster.group_configs.get(group_id, {}), **configs}
        try:
            share_config_from({k: v for k, v in merged.items() if v != ""})
        except InvalidShareConfig as exc:
            raise errors.InvalidRequest(f"group {group_id!r}: {exc}") from None
        await self.broker.controller_client.propose_command(
            {"op": "group_configs", "group": group_id, "configs": dict(configs)}, timeout_s)

    def tick(self) -> None:
        """Lock expiry, dead letters and snapshots of every share-group partition this broker leads."""
        for machine, key in list(self._with_groups.items()):
            if self.broker.share_machines.get(key) is not machine or not machine.groups:
                del self._with_groups[machine]  # closed or replaced (its replica went), or its state rebuilt empty
                continue
            running = self._ticks.get(key)
            if machine.replica.is_leader and (running is None or running.done()):
                self._ticks[key] = asyncio.get_running_loop().create_task(self._tick_share(key, machine))

    async def _tick_share(self, key: tuple[str, int], machine: ShareStateMachine) -> None:
        try:
            await machine.tick(lambda group, partition, items: self._dead_letter(key[0], group, partition, items))
        except Exception as exc:  # leadership moving, the dead-letter topic unavailable: the next round retries
            log.debug("%s-%d: share maintenance skipped: %s", key[0], key[1], exc)

    async def _dead_letter(self, topic: str, group_id: str, partition: int,
                           items: list[tuple[int, RecordState, rec.Record]]) -> None:
        """Append records to the group's dead-letter topic (created on demand) with headers saying where
        they came from. Each batch carries a producer id fixed for (group, source partition) and the source
        offset as sequence, so a copy retried after a failover is recognised and stored once."""
        cluster = self.broker.cluster
        config = self.share_config(group_id)
        dlq = config.dlq_topic or f"{topic}.dlq"
        if dlq not in cluster.topics:
            await self.broker.controller_client.ensure_topic(dlq, cluster.topics[topic].partitions)
        target = partition % cluster.topics[dlq].partitions
        producer_id = dead_letter_producer_id(group_id, topic, partition)
        for offset, state, record in items:
            builder = rec.BatchBuilder()
            builder.append(record.timestamp, record.key, record.value, [
                *record.headers, ("lb.dlq.topic", topic.encode()), ("lb.dlq.partition", str(partition).encode()),
                ("lb.dlq.offset", str(offset).encode()), ("lb.dlq.delivery.count", str(state.count).encode()),
                ("lb.dlq.group", group_id.encode()), ("lb.dlq.reason", state.reason.encode())])
            batch = builder.build(producer_id=producer_id, producer_epoch=0, base_sequence=state.dlq_seq & 0x7FFFFFFF)
            # DuplicateSequence: written before a failover, and older than the partition remembers: it is there.
            with contextlib.suppress(errors.DuplicateSequence):
                await self._produce_anywhere(dlq, target, batch)

    async def _produce_anywhere(self, topic: str, index: int, batch: bytes) -> None:
        broker = self.broker
        replica = broker.replicas.replica(topic, index)
        if replica is not None and replica.is_leader:
            await broker.data.produce_internal(topic, index, batch)
            return
        if broker.dead_letter_sender is None:
            raise errors.LeaderNotAvailable(f"{topic}-{index} is led elsewhere and no sender is set")
        leader = broker.replicas.known_leader(topic, index)
        if leader is None or leader not in broker.peers:
            raise errors.LeaderNotAvailable(f"{topic}-{index} has no leader now; the dead letter is retried")
        await broker.dead_letter_sender(broker.peers[leader], (topic, index), batch)
