"""Broker-to-broker Raft transport: one gRPC stream per ordered broker pair, carrying every Raft group.

Each broker opens one client-streaming ``Raft.Exchange`` call to each peer and writes its messages for all
groups on it; the peer answers on its own stream back to us, so the two directions are independent. What a
caller sends during one event-loop turn leaves as one ``RaftEnvelope``: with a thousand partitions, the
heartbeats of a tick are one write, not a thousand.

Raft tolerates lost messages, and the transport relies on that: it never blocks the caller and never buffers
without bound. Per peer it keeps a queue capped at ``max_queue_messages`` (the oldest are dropped and
counted) and at ``max_queue_bytes`` of entries (a new append that does not fit is dropped: the leader
resends from where the follower's log ends), and while a peer is down it retries with capped exponential
backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import grpc
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from logbroker.cluster.peer_auth import peer_metadata
from logbroker.cluster.raft_codec import RaftCodecError, decode_message, encode_message_into
from logbroker.cluster.tasks import cancel_and_wait
from logbroker.raft.types import Message

log = logging.getLogger("logbroker.transport")

DEFAULT_MAX_QUEUE_MESSAGES = 100_000
# Appends waiting for one slow or unreachable peer: without a byte bound, every group's in-flight window
# (Raft's max_inflight_bytes) could pile up here at once.
DEFAULT_MAX_QUEUE_BYTES = 32 << 20
DEFAULT_MAX_ENVELOPE_BYTES = 1 << 20  # small, so that heartbeats never wait long behind appends
MAX_GRPC_MESSAGE_BYTES = 64 << 20
INITIAL_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0
# A stream must have lived this long before its end resets the backoff: a peer that accepts streams and then
# ends them at once (no Raft service there, or a broker shutting down) is retried at MAX_BACKOFF_S, not 20/s.
STABLE_STREAM_S = MAX_BACKOFF_S
# Upper bounds of the protobuf framing (tags, varints, length prefixes) of one RaftMessage inside an envelope
# and of one RaftEntry inside a message. Sizing envelopes by these bounds keeps them within max_envelope_bytes
# without serialising anything twice, and decides whether a message fits before it is encoded.
MESSAGE_FRAMING_BYTES = 256
ENTRY_FRAMING_BYTES = 64

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES),
    # Ping every 2 s, even on an idle stream, so a peer that vanished without a FIN is noticed in seconds.
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 2000),
    # Recent gRPC cores wait for a ping's ack under this separate limit (default 1 min), not keepalive_timeout.
    ("grpc.http2.ping_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # gRPC's own reconnect backoff defaults to 1 s growing to 120 s; a broker that restarts must be reached
    # again within our backoff, not minutes later.
    ("grpc.initial_reconnect_backoff_ms", int(INITIAL_BACKOFF_S * 1000)),
    ("grpc.min_reconnect_backoff_ms", int(INITIAL_BACKOFF_S * 1000)),
    ("grpc.max_reconnect_backoff_ms", int(MAX_BACKOFF_S * 1000)),
    # Raft resends what matters; gRPC retries would only buffer stale messages behind our back.
    ("grpc.enable_retries", 0),
]

# For the broker's grpc.aio server: accept the peers' 2-second keepalive pings instead of answering them
# with GOAWAY "too_many_pings" when a stream happens to be idle.
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
]

OnMessages = Callable[[list[tuple[str, Message]]], None]


@dataclass(eq=False)
class _Peer:
    """The sending side towards one peer: its queue, its sender task and what we last knew of its link."""

    node_id: int
    address: str
    queue: deque[tuple[str, Message]] = field(default_factory=deque)
    queued_bytes: int = 0  # _wire_bytes_bound of what is in the queue
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    connected: bool | None = None  # None until the first attempt, so the first outcome is logged
    task: asyncio.Task[None] | None = None


class RaftTransport:
    """Carries Raft messages of every group between this broker and its peers."""

    def __init__(
        self,
        node_id: int,
        peers: dict[int, str],
        on_messages: OnMessages,
        max_queue_messages: int = DEFAULT_MAX_QUEUE_MESSAGES,
        max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
        secret: str = "",
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
    ) -> None:
        if max_queue_messages < 1 or max_envelope_bytes < 1 or max_queue_bytes < 1:
            raise ValueError("max_queue_messages, max_envelope_bytes and max_queue_bytes must be positive")
        self.node_id = node_id
        self._metadata = peer_metadata(secret)
        self._on_messages = on_messages
        self._max_queue_messages = max_queue_messages
        self._max_envelope_bytes = max_envelope_bytes
        self._max_queue_bytes = max_queue_bytes
        self._peers: dict[int, _Peer] = {
            peer_id: _Peer(peer_id, address) for peer_id, address in peers.items() if peer_id != node_id
        }
        self._dropped: Counter[int] = Counter()
        self._warned_unknown: set[int] = set()
        self._senders: set[asyncio.Task[None]] = set()  # every live sender, including replaced ones
        self._started = False
        self._stopped = False
        self._servicer = _RaftServicer(self)
        self.misaddressed_envelopes = 0
        self.undecodable_envelopes = 0

    # ------------------------------------------------------------------ public API

    @property
    def servicer(self) -> pb_grpc.RaftServicer:
        return self._servicer

    @property
    def dropped_messages(self) -> Mapping[int, int]:
        """Messages dropped per destination node id: queue overflow, unknown node, unencodable, stopped."""
        return MappingProxyType(self._dropped)

    def queued_messages(self, node_id: int) -> int:
        peer = self._peers.get(node_id)
        return len(peer.queue) if peer is not None else 0

    def queued_bytes(self, node_id: int) -> int:
        peer = self._peers.get(node_id)
        return peer.queued_bytes if peer is not None else 0

    def peer_connected(self, node_id: int) -> bool:
        peer = self._peers.get(node_id)
        return peer is not None and peer.connected is True

    def send(self, group: str, message: Message) -> None:
        """Queue ``message`` for ``message.to_node``; never blocks. The sender task wakes on a later turn."""
        peer = self._peers.get(message.to_node)
        if peer is None or self._stopped:
            self._drop_unroutable(message.to_node)
            return
        size_bytes = _wire_bytes_bound(group, message)
        if message.entries and peer.queue and peer.queued_bytes + size_bytes > self._max_queue_bytes:
            # Drop the new append, not the oldest: the queue stays a gap-free run of the follower's log, and
            # the leader resends the rest once the follower answers with where its log ends.
            self._dropped[peer.node_id] += 1
            return
        if len(peer.queue) >= self._max_queue_messages:
            # Drop the oldest: the newest messages carry the freshest terms and commit offsets.
            oldest_group, oldest = peer.queue.popleft()
            peer.queued_bytes -= _wire_bytes_bound(oldest_group, oldest)
            self._dropped[peer.node_id] += 1
        peer.queue.append((group, message))
        peer.queued_bytes += size_bytes
        peer.wakeup.set()

    def send_many(self, items: Iterable[tuple[str, Message]]) -> None:
        for group, message in items:
            self.send(group, message)

    async def start(self) -> None:
        if self._started or self._stopped:
            return
        self._started = True
        for peer in self._peers.values():
            self._spawn_sender(peer)

    async def stop(self) -> None:
        """Cancel the sender tasks, which close their streams and channels. Safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        for task in list(self._senders):
            with contextlib.suppress(Exception):  # a sender's failure was its own; the stop goes on
                await cancel_and_wait(task)
        for peer in self._peers.values():
            self._mark_down(peer, "transport stopped")

    def set_peer_address(self, node_id: int, address: str) -> None:
        """Add a peer or re-point one; a re-pointed peer drops its stream and reconnects at once."""
        if node_id == self.node_id or self._stopped:
            return
        peer = self._peers.get(node_id)
        if peer is None:
            peer = self._peers[node_id] = _Peer(node_id, address)
            self._warned_unknown.discard(node_id)
        elif peer.address == address:
            return
        else:
            log.info("raft peer %d moves from %s to %s", node_id, peer.address, address)
            peer.address = address
            peer.connected = None
        if self._started:
            self._spawn_sender(peer)

    # ------------------------------------------------------------------ sending

    def _drop_unroutable(self, node_id: int) -> None:
        self._dropped[node_id] += 1
        if not self._stopped and node_id not in self._warned_unknown:
            self._warned_unknown.add(node_id)
            log.warning("dropping Raft messages for node %d: not among the peers of node %d", node_id, self.node_id)

    def _spawn_sender(self, peer: _Peer) -> None:
        # The queue belongs to the peer, not to the task, so replacing the task keeps what was queued.
        previous = peer.task
        if previous is not None:
            previous.cancel()
        task = asyncio.create_task(self._run_sender(peer, previous), name=f"raft-sender-{peer.node_id}")
        self._senders.add(task)
        task.add_done_callback(self._senders.discard)
        peer.task = task

    async def _run_sender(self, peer: _Peer, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            # Let the old task close its channel first, so two streams never interleave towards one peer.
            await asyncio.wait([previous])
        channel = grpc.aio.insecure_channel(peer.address, options=CHANNEL_OPTIONS)
        try:
            await self._sender_loop(peer, pb_grpc.RaftStub(channel))
        finally:
            await channel.close()

    async def _sender_loop(self, peer: _Peer, stub: pb_grpc.RaftStub) -> None:
        backoff_s = INITIAL_BACKOFF_S
        while True:
            await self._wait_for_work(peer, None)
            if await self._stream_to(peer, stub) >= STABLE_STREAM_S:
                backoff_s = INITIAL_BACKOFF_S
            # Messages keep queueing (bounded) while we wait; Raft retransmits whatever gets dropped.
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)

    async def _stream_to(self, peer: _Peer, stub: pb_grpc.RaftStub) -> float:
        """Run one Exchange call until it ends; returns how long it was connected, in seconds (0 if never)."""
        loop = asyncio.get_running_loop()
        call = stub.Exchange(wait_for_ready=False, metadata=self._metadata)
        # Wake the sender when the call ends, so a closed stream is noticed even with nothing to send.
        call.add_done_callback(lambda _: peer.wakeup.set())
        connected_at_s: float | None = None
        try:
            await call.wait_for_connection()
            connected_at_s = loop.time()
            self._mark_up(peer)
            await self._write_envelopes(peer, call)
            reason = f"stream ended: {(await call.code()).name}"
        except grpc.aio.AioRpcError as e:
            reason = f"{e.code().name}: {e.details()}"
        except asyncio.InvalidStateError as e:  # written to a call that had just finished
            reason = str(e)
        except Exception as e:
            # Not a network failure but a bug; keep the sender alive, since it serves every group of this peer.
            log.exception("raft sender for peer %d failed", peer.node_id)
            reason = repr(e)
        finally:
            if not call.done():
                call.cancel()
        self._mark_down(peer, reason)
        return 0.0 if connected_at_s is None else loop.time() - connected_at_s

    async def _write_envelopes(self, peer: _Peer, call: Any) -> None:
        while True:
            await self._wait_for_work(peer, call)
            if call.done():
                return
            for envelope in self._envelopes(peer):
                await call.write(envelope)

    async def _wait_for_work(self, peer: _Peer, call: Any) -> None:
        while not peer.queue and not (call is not None and call.done()):
            peer.wakeup.clear()
            await peer.wakeup.wait()

    def _envelopes(self, peer: _Peer) -> Iterator[pb.RaftEnvelope]:
        """Drain the queue into envelopes of at most max_envelope_bytes (a lone larger message goes alone).

        Messages are encoded here, lazily, and taken off the queue one envelope at a time: what is still
        queued while an envelope is being written can still be dropped by the bound, or join the next one.
        """
        while peer.queue:
            envelope = pb.RaftEnvelope(from_node=self.node_id, to_node=peer.node_id)
            size_bytes = 0
            while peer.queue:
                group, message = peer.queue[0]
                message_bytes = _wire_bytes_bound(group, message)
                if envelope.messages and size_bytes + message_bytes > self._max_envelope_bytes:
                    break  # the message stays queued and opens the next envelope
                peer.queue.popleft()
                peer.queued_bytes -= message_bytes
                if self._encode_into(envelope, peer, group, message):
                    size_bytes += message_bytes
            if envelope.messages:
                yield envelope

    def _encode_into(self, envelope: pb.RaftEnvelope, peer: _Peer, group: str, message: Message) -> bool:
        """Add the message to the envelope, encoded in place (no copy of its payloads); False if dropped."""
        try:
            encode_message_into(envelope.messages.add(), group, message)
            return True
        except (ValueError, KeyError, TypeError):
            # One unencodable message (a bug upstream) must not wedge the whole queue behind it.
            del envelope.messages[-1]
            log.exception("dropping a Raft message for node %d that cannot be encoded: %r", peer.node_id, message)
            self._dropped[peer.node_id] += 1
            return False

    def _mark_up(self, peer: _Peer) -> None:
        if peer.connected is not True:
            log.info("raft peer %d at %s connected", peer.node_id, peer.address)
        peer.connected = True

    def _mark_down(self, peer: _Peer, reason: str) -> None:
        if peer.connected is True:
            log.info("raft peer %d at %s disconnected (%s); reconnecting", peer.node_id, peer.address, reason)
        elif peer.connected is None:
            log.info("raft peer %d at %s unreachable (%s); retrying", peer.node_id, peer.address, reason)
        peer.connected = False

    # ------------------------------------------------------------------ receiving

    def _receive(self, envelope: pb.RaftEnvelope, remote: str) -> None:
        if envelope.to_node != self.node_id:
            self._drop_misaddressed(envelope, remote)
            return
        if envelope.from_node not in self._peers:
            self.undecodable_envelopes += 1
            log.error("dropping a Raft envelope from %s that claims to come from node %d, which is not a peer of "
                      "node %d (peers: %s)", remote, envelope.from_node, self.node_id, sorted(self._peers))
            return
        try:
            messages = [decode_message(raw, envelope.from_node, self.node_id) for raw in envelope.messages]
        except RaftCodecError as e:
            self.undecodable_envelopes += 1
            log.error("dropping a Raft envelope from node %d (%s): %s", envelope.from_node, remote, e)
            return
        if messages:
            self._deliver(messages, envelope.from_node)

    def _drop_misaddressed(self, envelope: pb.RaftEnvelope, remote: str) -> None:
        # A broker whose --peers maps a node id to the wrong address; warn on the first envelope of a burst.
        self.misaddressed_envelopes += 1
        if self.misaddressed_envelopes == 1 or self.misaddressed_envelopes % 1000 == 0:
            log.warning(
                "dropping Raft envelope from node %d (%s) addressed to node %d: this is node %d "
                "(%d misaddressed so far; check --peers)",
                envelope.from_node,
                remote,
                envelope.to_node,
                self.node_id,
                self.misaddressed_envelopes,
            )

    def _deliver(self, messages: list[tuple[str, Message]], from_node: int) -> None:
        try:
            self._on_messages(messages)
        except Exception:
            # The stream carries every group from that peer; one failing handler must not cut them all off.
            log.exception("on_messages failed for an envelope from node %d", from_node)


def _wire_bytes_bound(group: str, message: Message) -> int:
    """An upper bound of the bytes ``message`` adds to an envelope once encoded."""
    size_bytes = MESSAGE_FRAMING_BYTES + len(group.encode())
    if message.membership is not None:
        size_bytes += len(message.membership.encode())
    for entry in message.entries:
        size_bytes += ENTRY_FRAMING_BYTES + len(entry.payload)
    return size_bytes


class _RaftServicer(pb_grpc.RaftServicer):
    """The receiving end: one Exchange call per peer, each envelope handed to on_messages as one list."""

    def __init__(self, transport: RaftTransport) -> None:
        self._transport = transport

    async def Exchange(  # the name is fixed by the generated servicer
        self, request_iterator: AsyncIterator[pb.RaftEnvelope], context: grpc.aio.ServicerContext
    ) -> pb.RaftStreamClosed:
        remote = context.peer()
        async for envelope in request_iterator:
            if self._transport._stopped:
                break  # ending the call tells the peer to stop writing to a broker that is shutting down
            self._transport._receive(envelope, remote)
        return pb.RaftStreamClosed()
