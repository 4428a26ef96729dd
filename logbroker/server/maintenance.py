"""The broker's periodic work: interval flushes, failed-replica retries, coordinator and share-group ticks,
replica moves, leader balance and retention."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from logbroker.cluster.replica import now_ms
from logbroker.storage.errors import StorageError

if TYPE_CHECKING:
    from logbroker.cluster.replica import Replica
    from logbroker.server.broker import Broker

log = logging.getLogger("logbroker.broker")

MAINTENANCE_INTERVAL_S = 0.1
# How often at most the interval flusher looks over every partition for those of flush="interval" topics, and only
# after partitions opened or closed or topic configs changed (ReplicaManager.layout_version); in between it visits
# only those (walking thousands of flush="always" partitions ten times a second was a quarter of an idle broker's
# CPU, and once a second still 3% of a core at 10,000 partitions). A partition created, or switched to interval
# flushes, is flushed at most this much later.
INTERVAL_FLUSH_RESCAN_S = 1.0
MAX_LEADER_TRANSFERS_PER_ROUND = 100


class Maintenance:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._last_flush_s: dict[str, float] = {}  # flush="interval" groups: when their log was last fsynced
        self._interval_flushed: list[Replica] = []  # the replicas of flush="interval" topics, as last looked over
        self._rescan_at_s = 0.0
        self._scanned_layout = -1  # ReplicaManager.layout_version when the list above was made

    async def run(self) -> None:
        """Interval flushes, leader balancing and retention, forever (cancelled at shutdown)."""
        broker = self.broker
        loop = asyncio.get_running_loop()
        next_balance = loop.time() + broker.config.leader_balance_interval_ms / 1000
        next_retention = loop.time() + broker.config.retention_check_interval_ms / 1000
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL_S)
            await self.flush_interval_partitions(loop.time())
            broker.replicas.retry_failed_replicas(time.monotonic())
            self.tick_group_coordinators()
            broker.topic_admin.drive_moves()
            if loop.time() >= next_balance:
                next_balance = loop.time() + broker.config.leader_balance_interval_ms / 1000
                self.balance_leaders()
            if loop.time() >= next_retention:
                next_retention = loop.time() + broker.config.retention_check_interval_ms / 1000
                self.apply_retention()

    def tick_group_coordinators(self) -> None:
        """Session and rebalance timeouts, snapshots and log cuts of every local coordinator partition; lock
        expiry, dead letters and snapshots of every share-group partition this broker leads."""
        for runtime in list(self.broker.group_runtimes.values()):
            runtime.schedule_tick()
        self.broker.share_groups.tick()

    async def flush_interval_partitions(self, now_s: float) -> None:
        """fsync the logs of flush="interval" topics whose flush.interval.ms has passed (in the thread pool)."""
        loop = asyncio.get_running_loop()
        for replica in self._interval_flushed_replicas(now_s):
            config = replica.log.config
            if config.flush == "always" or replica.closed:
                continue
            if now_s - self._last_flush_s.setdefault(replica.group, now_s) >= config.flush_interval_ms / 1000:
                self._last_flush_s[replica.group] = now_s
                try:
                    await loop.run_in_executor(self.broker.executor, replica.log.flush)
                except (StorageError, OSError) as exc:
                    # One partition's disk trouble must not end the loop that fsyncs and retries every other.
                    replica.stop_after_write_failure(exc)

    def _interval_flushed_replicas(self, now_s: float) -> list[Replica]:
        layout = self.broker.replicas.layout_version
        if now_s >= self._rescan_at_s and layout != self._scanned_layout:
            self._rescan_at_s = now_s + INTERVAL_FLUSH_RESCAN_S
            self._scanned_layout = layout
            self._interval_flushed = [replica for _, replica in self.broker.replicas.local_partitions()
                                      if replica.log.config.flush != "always"]
        return self._interval_flushed

    def balance_leaders(self) -> int:
        """Hand groups this broker leads back to their preferred leader (the first replica placed), when
        that broker is alive and caught up, so leadership stays spread as placement intended after
        failovers and restarts. Returns the number of transfers started."""
        node_id = self.broker.node_id
        is_alive = self.broker.liveness.is_alive
        started = 0
        for _, replica in self.broker.replicas.local_partitions():
            if started >= MAX_LEADER_TRANSFERS_PER_ROUND:
                break
            preferred = replica.preferred_leader
            if not replica.is_leader or preferred is None or preferred == node_id or not is_alive(preferred):
                continue
            progress = replica.node.progress(preferred)
            if progress is None or progress.match_offset < replica.node.log.last_offset:
                continue
            with contextlib.suppress(Exception):
                replica.transfer_leadership(preferred)
                started += 1
        if started:
            log.info("moving leadership of %d group(s) back to their preferred brokers", started)
        return started

    def apply_retention(self) -> int:
        """Delete expired segments: never at or past the high watermark, nor past the oldest share-group
        snapshot a rebuild needs; the term before the new log start is saved first (Raft asks for it)."""
        deleted = 0
        for key, replica in self.broker.replicas.local_partitions():
            if replica.closed:
                continue
            bound = replica.high_watermark
            share = self.broker.share_machines.get(key)
            kept = share.retain_from() if share is not None else None
            if kept is not None:
                bound = min(bound, kept)
            cut = replica.log.retention_cut_point(now_ms(), max_offset=bound)
            count = replica.truncate_prefix(cut) if cut > replica.log.log_start_offset else 0
            if count:
                log.info("%s: retention deleted %d segment(s); log now starts at offset %d",
                         replica.name, count, replica.log.log_start_offset)
            deleted += count
        return deleted
