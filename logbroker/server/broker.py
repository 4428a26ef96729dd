"""The broker's core, free of gRPC: the composition root of the parts every front-end calls.

Every partition is a Raft group over its replicas and the partition log is the Raft log; the cluster
metadata (topics, configs, replica assignments) is one more Raft group, the controller, over every
broker named in --peers. A single broker is a cluster of one: the same code path, with groups of one
voter. The front-ends (gRPC service.py, the Kafka listener) turn requests into calls on the parts
below and exceptions into error codes:

- ``replicas`` (replica_manager.py): open, tick, fail, hand over, reopen and find this broker's replicas;
- ``controller_client`` (controller_client.py): the metadata log, topic create/delete, leader reports;
- ``data`` (data_plane.py): produce, read, wait for data, list offsets; ``fetch.py`` long-polls over it;
- ``share_groups`` (share_groups.py): share state machines, group configs, dead letters;
- ``maintenance`` (maintenance.py): interval flushes, retries, leader balance, retention;
- ``topic_admin`` (topic_admin.py): configs, partition counts and replica moves after creation.

Broker itself owns what they share: the configuration, the cluster metadata, the transport, liveness,
the flush thread pool, the coordinator and share-state tables, metrics and backpressure.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from logbroker.cluster.fsync_threads import FsyncThreads
from logbroker.cluster.liveness import Liveness
from logbroker.cluster.metadata import ClusterState
from logbroker.cluster.replica import Replica
from logbroker.cluster.transport import RaftTransport
from logbroker.groups.coordinator import GroupConfig
from logbroker.groups.runtime import GroupShardRuntime
from logbroker.groups.share_runtime import ShareStateMachine
from logbroker.server.config import BrokerConfig
from logbroker.server.controller_client import CONTROLLER_DIR, ControllerClient
from logbroker.server.data_plane import DataPlane
from logbroker.server.disk_identity import has_disk_id, load_or_create_disk_id, mark_metadata_catch_up
from logbroker.server.maintenance import Maintenance
from logbroker.server.metrics import BrokerMetrics
from logbroker.server.quotas import Backpressure, DiskGuard, quotas_from
from logbroker.server.replica_manager import ReplicaManager
from logbroker.server.share_groups import ShareGroups
from logbroker.server.topic_admin import TopicAdmin

log = logging.getLogger("logbroker.broker")


class LeaderReportSender(Protocol):
    def __call__(self, address: str, node_id: int, leaders: list[list[Any]], disk_id: str = "") -> Awaitable[bool]:
        """True once the controller leader at address has committed the report (leaderships won by node_id,
        and the registration of its disk when disk_id is given)."""
        ...


class Broker:
    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.node_id = config.node_id
        self.peers = config.peer_addresses()  # where this broker reaches the others (its own client address too)
        self.client_addresses = config.client_addresses()  # where clients are told to reach each broker
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.disk_is_new = not has_disk_id(self.data_dir)  # a new or replaced disk (or one from before disk IDs)
        if self.disk_is_new and not (self.data_dir / CONTROLLER_DIR).exists():
            # Before disk.id: a broker killed between the two must not restart as a known disk with an empty
            # metadata log and no reason to wait (ControllerClient waits while the file exists).
            mark_metadata_catch_up(self.data_dir)
        self.disk_id = load_or_create_disk_id(self.data_dir)  # before anything else is written here
        self.executor = ThreadPoolExecutor(max_workers=config.flush_threads, thread_name_prefix="flush")
        # Small appends' fsyncs, in native threads that take no GIL (None where the C extension was not built).
        self.fsync_threads = FsyncThreads.start(config.flush_threads) if config.native_fsync else None
        self.cluster = ClusterState()
        self.liveness = Liveness(self.node_id, list(self.peers), config.liveness_timeout_ticks)
        self.controller: Replica | None = None  # this broker's replica of the metadata log, once open
        self.group_runtimes: dict[int, GroupShardRuntime] = {}  # __consumer_offsets partition -> its coordinator
        self.share_machines: dict[tuple[str, int], ShareStateMachine] = {}  # share-group state per partition
        self.group_config = GroupConfig(session_timeout_ms=config.group_session_timeout_ms,
                                        heartbeat_interval_ms=config.group_heartbeat_interval_ms,
                                        offsets_retention_ms=config.offsets_retention_minutes * 60_000,
                                        snapshot_trigger_bytes=config.offsets_snapshot_trigger_bytes)
        # Set by the server layer (over gRPC): produce a dead letter at the partition's leader; ask the
        # controller leader at an address to create a topic; send leader reports to the controller leader.
        self.dead_letter_sender: Callable[[str, tuple[str, int], bytes], Awaitable[None]] | None = None
        self.topic_creator: Callable[[str, str, int], Awaitable[None]] | None = None
        self.send_leader_report: LeaderReportSender | None = None
        self.metrics = BrokerMetrics(self)  # Prometheus: counters bumped by the parts, gauges read when scraped
        self.backpressure = Backpressure(quotas_from(config), config.max_inflight_produce_bytes,
                                         config.produce_backpressure_wait_ms / 1000, config.node_id)
        self.disk_guard = DiskGuard(self.data_dir, config.min_free_disk_bytes)
        self.replicas = ReplicaManager(self)
        self.transport = RaftTransport(self.node_id, config.raft_peer_addresses(), self.replicas.on_raft_messages,
                                       secret=config.cluster_secret)
        self.controller_client = ControllerClient(self)
        self.data = DataPlane(self)
        self.share_groups = ShareGroups(self)
        self.maintenance = Maintenance(self)
        self.topic_admin = TopicAdmin(self)  # configs, partition counts and replica moves after creation

    async def open(self) -> None:
        """Open the controller log (its committed commands re-create every local replica as they apply),
        then start the transport, the Raft ticker and the leader reports."""
        self.controller_client.open()
        await self.transport.start()
        self.replicas.start_ticking()
        self.controller_client.start_reporting()
        log.info("broker %d up: peers %s, data under %s", self.node_id, self.peers, self.data_dir)

    async def close(self) -> None:
        self.topic_admin.close()
        await self.replicas.stop_ticking()
        await self.controller_client.stop_reporting()
        await self.transport.stop()
        self.replicas.close_all()
        self.executor.shutdown(wait=True)
        if self.fsync_threads is not None:
            self.fsync_threads.close()
        log.info("broker %d closed every partition cleanly", self.node_id)
