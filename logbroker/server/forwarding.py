"""Forwarding a request to the controller leader, broker to broker over gRPC, for every front-end.

Topic changes (create, delete, configs, partitions, moves, group configs) commit in the controller log,
which only its leader may propose to; a broker that does not lead it sends the request on, over the
gRPC Admin service, and answers with the leader's answer (the gRPC AdminService and the Kafka listener's
topics.py alike). __consumer_offsets, too, is created only by the controller leader: a FindCoordinator
forwarded there makes it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import grpc
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from logbroker.server import errors

if TYPE_CHECKING:
    from logbroker.server.broker import Broker

log = logging.getLogger("logbroker.service")

FORWARD_TIMEOUT_S = 30.0
# Marks a request one broker forwards to another, so that the other answers it alone (never forwards it on).
FORWARDED_METADATA_KEY = "x-logbroker-forwarded"


async def forward_to_controller(broker: Broker, method: str, request: Any,
                                timeout_s: float = FORWARD_TIMEOUT_S) -> Any | None:
    """The controller leader's answer to an Admin call, or None when this broker is the leader (the caller
    then runs the request here)."""
    address = await broker.controller_client.controller_leader_address(timeout_s)
    if address is None:
        return None
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            return await getattr(pb_grpc.AdminStub(channel), method)(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        # The controller leader moved or went down mid-request: a retriable condition, said as such (a
        # raw AioRpcError would reach the client as UNKNOWN, which clients take as final).
        raise errors.LeaderNotAvailable(
            f"{method} could not be forwarded to the controller leader at {address} "
            f"({exc.code().name}: {exc.details()}); it may be moving, retry") from None


async def forward_find_coordinator(broker: Broker, request: pb.FindCoordinatorRequest,
                                   timeout_s: float = FORWARD_TIMEOUT_S) -> pb.FindCoordinatorResponse | None:
    """Only the controller leader creates __consumer_offsets: ask it once, so the topic comes to be. Its
    answer, or None when this broker leads the controller or the leader could not be asked."""
    try:
        address = await broker.controller_client.controller_leader_address(timeout_s)
        if address is None:
            return None
        async with grpc.aio.insecure_channel(address) as channel:
            return await pb_grpc.GroupsStub(channel).FindCoordinator(  # type: ignore[no-any-return]
                request, timeout=timeout_s, metadata=((FORWARDED_METADATA_KEY, "1"),))
    except (grpc.aio.AioRpcError, errors.BrokerError) as exc:
        log.debug("FindCoordinator not forwarded to the controller leader: %s", exc)
        return None


async def controller_names_topic(broker: Broker, name: str, timeout_s: float) -> bool:
    """Asked when this broker's copy of the cluster metadata has no topic `name`: whether the controller
    leader's copy has it, that is, this broker has not yet applied the topic's creation (it learns of a commit
    a moment after the leader, longer while it is cut off from it). False when the leader does not name it
    either, when this broker is the leader, or when the leader cannot be asked in time."""
    try:
        address = await broker.controller_client.controller_leader_address(timeout_s)
        if address is None:
            return False
        async with grpc.aio.insecure_channel(address) as channel:
            answer = await pb_grpc.BrokerStub(channel).Metadata(
                pb.MetadataRequest(topics=[name]), timeout=timeout_s, metadata=((FORWARDED_METADATA_KEY, "1"),))
    except (grpc.aio.AioRpcError, errors.BrokerError) as exc:
        log.debug("could not ask the controller leader whether topic %r exists: %s", name, exc)
        return False
    return any(topic.name == name and not topic.error_code for topic in answer.topics)
