"""Wiring: the broker core, its gRPC services, health and reflection, and graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from logbroker.cluster.tasks import cancel_and_wait
from logbroker.server.broker import Broker
from logbroker.server.config import BrokerConfig, split_host_port
from logbroker.server.data_port import DataPort
from logbroker.server.groups import GroupFrontEnd
from logbroker.server.metrics import instrument_servicer
from logbroker.server.metrics_server import MetricsServer
from logbroker.server.service import (
    AdminService,
    BrokerService,
    GroupsService,
    RaftService,
    ShareService,
    create_topic_at,
    leader_report_sender,
    move_done_sender,
    send_dead_letter,
)

if TYPE_CHECKING:
    from logbroker.kafka.server import KafkaListener

log = logging.getLogger("logbroker.server")

SERVICE_NAMES = [
    pb.DESCRIPTOR.services_by_name["Broker"].full_name,
    pb.DESCRIPTOR.services_by_name["Admin"].full_name,
    pb.DESCRIPTOR.services_by_name["Raft"].full_name,
    pb.DESCRIPTOR.services_by_name["Groups"].full_name,
    pb.DESCRIPTOR.services_by_name["Share"].full_name,
]


# Room for what the byte limits do not count: a request's protobuf framing and topic names, and an answer's
# per-partition results (a Fetch may name 10,000 partitions, each answered with an error message).
REQUEST_FRAMING_BYTES = 64 * 1024
ANSWER_FRAMING_BYTES = 8 * 1024 * 1024
# Limits for slow and idle clients, none of which touches a well-behaved client's request:
# - a connection that has not sent its HTTP/2 preface and settings within this time is closed (gRPC's
#   default is two minutes, time enough for slow-loris connections to pile up);
HANDSHAKE_TIMEOUT_MS = 10_000
# - every connection is pinged this often, and closed with its streams when the ping goes unanswered: a
#   client that stopped reading (or vanished) releases what it holds; gRPC clients answer on their own;
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 20_000
# - a connection with no request for this long is closed gracefully (clients reconnect on their next
#   request; Kafka's connections.max.idle.ms is the same).
CONNECTION_IDLE_MS = 10 * 60_000
# No maximum connection age: it would cut consumers' long polls.
# Calls that arrived but were not yet handed to a handler. Past gRPC's defaults (1,000, and 3,000 for
# sure) it cancels new calls at random, and a burst of streams from slow clients that never send their
# message pushed a well-behaved producer's request out that way. max_concurrent_streams per connection
# bounds what one client may open; these only stop the random cancelling of everyone else.
MAX_PENDING_CALLS = 20_000
MAX_PENDING_CALLS_HARD_LIMIT = 40_000


# Accept clients' keepalive pings (a consumer's channel pings during long polls) instead of answering them with
# GOAWAY "too_many_pings" when a connection happens to be idle.
KEEPALIVE_PERMIT_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
]


def grpc_options(config: BrokerConfig) -> list[tuple[str, int]]:
    largest_answer_bytes = max(config.max_fetch_bytes, config.max_request_bytes)  # a lone batch may fill one
    return [
        *KEEPALIVE_PERMIT_OPTIONS,
        ("grpc.max_receive_message_length", config.max_request_bytes + REQUEST_FRAMING_BYTES),
        ("grpc.max_send_message_length", largest_answer_bytes + ANSWER_FRAMING_BYTES),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.max_connection_idle_ms", CONNECTION_IDLE_MS),
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS_HARD_LIMIT),
        ("grpc.so_reuseport", 0),
    ]


class BrokerServer:
    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.broker = Broker(config)
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._maintenance: asyncio.Task[None] | None = None
        self.port = config.port
        self.kafka: KafkaListener | None = None
        self.raft_port: int | None = None  # the Raft port bound, for a broker with peers
        self.metrics_server: MetricsServer | None = None
        self.data_port: DataPort | None = None

    async def start(self) -> None:
        if self.config.metrics_listen:  # first: a port in use stops the start before anything else runs
            self.metrics_server = MetricsServer(self.broker.metrics, self.config.metrics_listen)
            await self.metrics_server.start()
        server = grpc.aio.server(options=grpc_options(self.config))
        services = pb.DESCRIPTOR.services_by_name
        metrics = self.broker.metrics

        def timed(servicer: object, name: str) -> object:  # request latency and errors per method
            return instrument_servicer(servicer, services[name], metrics)

        pb_grpc.add_BrokerServicer_to_server(timed(BrokerService(self.broker), "Broker"), server)
        data_service = instrument_servicer(BrokerService(self.broker), services["Broker"], metrics, protocol="data")
        pb_grpc.add_AdminServicer_to_server(timed(AdminService(self.broker), "Admin"), server)
        pb_grpc.add_RaftServicer_to_server(timed(RaftService(self.broker), "Raft"), server)
        pb_grpc.add_GroupsServicer_to_server(timed(GroupsService(self.broker), "Groups"), server)
        pb_grpc.add_ShareServicer_to_server(timed(ShareService(self.broker), "Share"), server)
        self.broker.dead_letter_sender = send_dead_letter
        self.broker.topic_creator = create_topic_at
        self.broker.send_leader_report = leader_report_sender(self.config.cluster_secret)
        self.broker.topic_admin.send_move_done = move_done_sender(self.config.cluster_secret)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        # The servicer answers SERVING for "" by default; not until the cluster metadata has a leader.
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection([*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        try:
            self.port = server.add_insecure_port(self.config.listen)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.config.listen}: {exc} (is another broker using the port?)") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}: the address is in use or not local")
        await server.start()
        self._server = server
        await self._start_data_port(data_service)
        if len(self.broker.peers) > 1:  # a cluster of one has no one to talk Raft with
            host, port = self.config.raft_listen_address()
            self.raft_port = await self.broker.transport.listen(host, port)
        await self.broker.open()
        if self.config.kafka_listen:
            await self._start_kafka()
        self._maintenance = asyncio.get_running_loop().create_task(self._serve_when_ready())
        # What the start built (modules, protocol schemas, the replayed metadata, every replica opened) lives as
        # long as the process: out of the cyclic collector's sight, its full passes scan only what came after
        # (measured on a serving broker: 65 ms pauses of the event loop, 93,000 objects, before; 15 ms after).
        gc.freeze()
        data_port = "" if self.data_port is None else f", data port {self.data_port.port}"
        log.info("broker %d serving on %s:%d%s (data in %s)",
                 self.config.node_id, self.config.host, self.port, data_port, self.config.data_dir)

    async def _start_data_port(self, service: BrokerService) -> None:
        address = self.config.data_listen_address()
        if address is None:
            return
        self.data_port = DataPort(service, self.config.max_request_bytes, REQUEST_FRAMING_BYTES)
        await self.data_port.listen(*address)

    async def _start_kafka(self) -> None:
        # Imported here: kio's message classes take over half a second to import, which every broker start
        # without a Kafka listener (most test clusters, a gRPC-only deployment) would pay.
        from logbroker.kafka.context import ListenerSettings
        from logbroker.kafka.producer_ids import ProducerIdAllocator
        from logbroker.kafka.server import KafkaListener

        host, port = split_host_port(self.config.kafka_listen)
        settings = ListenerSettings(host, port, self.config.max_request_bytes, self.config.kafka_auto_create_topics,
                                    port_offset=port - self.port,
                                    producer_ids=ProducerIdAllocator(self.config.data_dir, self.config.node_id))
        self.kafka = KafkaListener(self.broker, GroupFrontEnd(self.broker), settings)
        await self.kafka.start()

    async def _serve_when_ready(self) -> None:
        """Report SERVING once the cluster metadata has a leader (a majority of brokers is up) and names this broker's
        disk (so the partitions created from then on are new to it: disk_identity.py), then maintain."""
        controller = self.broker.controller
        assert controller is not None
        while controller.leader_id is None or not self.broker.controller_client.disk_registered:
            await asyncio.sleep(self.config.raft_tick_ms / 1000)
        for name in [*SERVICE_NAMES, ""]:  # the overall status last: it is what start-up waits on
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("broker %d: controller leader is broker %d; serving", self.config.node_id, controller.leader_id)
        await self.broker.maintenance.run()

    async def stop(self) -> None:
        """Stop taking requests, let in-flight ones finish, then close every log cleanly."""
        log.info("broker %d shutting down", self.config.node_id)
        await self.broker.replicas.hand_over_leadership()
        await self._health.enter_graceful_shutdown()
        if self.kafka is not None:
            await self.kafka.stop()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        # The Raft transport (its port and its connections to peers) stops before the gRPC server's grace period.
        await self.broker.transport.stop()
        grace_s = self.config.shutdown_grace_ms / 1000
        if self.data_port is not None:  # beside the gRPC server's grace period, not before it
            data_stopped = asyncio.get_running_loop().create_task(self.data_port.stop(grace_s))
        if self._server is not None:
            await self._server.stop(grace_s)
        if self.data_port is not None:
            await data_stopped
        if self._maintenance is not None:
            await cancel_and_wait(self._maintenance)
        await self.broker.close()

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


async def serve(config: BrokerConfig) -> None:
    """Run one broker until SIGTERM or SIGINT."""
    server = BrokerServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
