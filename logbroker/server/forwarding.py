"""Forwarding a request to the controller leader, broker to broker over gRPC, for every front-end.

Topic changes (create, delete, configs, partitions, moves, group configs) commit in the controller log,
which only its leader may propose to; a broker that does not lead it sends the request on, over the
gRPC Admin service, and answers with the leader's answer (the gRPC AdminService and the Kafka listener's
topics.py alike). __consumer_offsets, too, is created only by the controller leader: a FindCoordinator
forwarded there makes it.
"""

from __future__ import annotations

import asyncio
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


async def ask_forwarded(address: str, stub: type[Any], method: str, request: Any, timeout_s: float) -> Any | None:
    """Another broker's own answer to a call (marked forwarded: it answers alone, asking no one else), or None
    when it does not answer in time (down, cut off, or moving)."""
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            return await getattr(stub(channel), method)(
                request, timeout=timeout_s, metadata=((FORWARDED_METADATA_KEY, "1"),))
    except grpc.aio.AioRpcError as exc:
        log.debug("broker at %s did not answer %s: %s", address, method, exc.code())
        return None


async def forward_find_coordinator(broker: Broker, request: pb.FindCoordinatorRequest,
                                   timeout_s: float = FORWARD_TIMEOUT_S) -> pb.FindCoordinatorResponse | None:
    """Only the controller leader creates __consumer_offsets: ask it once, so the topic comes to be. Its
    answer, or None when this broker leads the controller or the leader could not be asked."""
    try:
        address = await broker.controller_client.controller_leader_address(timeout_s)
    except errors.BrokerError as exc:
        log.debug("FindCoordinator not forwarded to the controller leader: %s", exc)
        return None
    if address is None:
        return None
    return await ask_forwarded(address, pb_grpc.GroupsStub, "FindCoordinator", request, timeout_s)


async def topics_known_elsewhere(broker: Broker, names: list[str], timeout_s: float) -> set[str] | None:
    """Asked when this broker's copy of the cluster metadata lacks these topics: the ones another broker's
    copy has, that is, whose creation this broker has not applied yet (it learns of a commit a moment after
    the controller leader, longer while it is cut off from it). The controller leader is asked, or, when this
    broker knows none or it does not answer, every other broker (a created topic is applied at the leader,
    whichever it is now). None when no broker could be asked; empty when this broker leads the controller."""
    leader = broker.controller_client.controller_id()
    if leader == broker.node_id:
        return set()
    others = {node: address for node, address in broker.peers.items() if node != broker.node_id}
    request = pb.MetadataRequest(topics=names)
    if leader in others:
        answer = await ask_forwarded(others[leader], pb_grpc.BrokerStub, "Metadata", request, timeout_s)
        if answer is not None:
            return {topic.name for topic in answer.topics if not topic.error_code}
    answers = [a for a in await asyncio.gather(*(ask_forwarded(address, pb_grpc.BrokerStub, "Metadata", request,
                                                               timeout_s) for address in others.values()))
               if a is not None]
    if not answers:
        return None
    return {topic.name for answer in answers for topic in answer.topics if not topic.error_code}
