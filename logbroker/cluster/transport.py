"""Broker-to-broker Raft transport: one TCP connection per ordered broker pair, carrying every Raft group.

Each broker connects to each peer's Raft port (``--raft-listen``; raft_wire.py has the bytes), proves the
cluster secret, and writes its messages for all groups there; the peer sends its own on its own connection back
to us, so the two directions are independent. What a caller sends during one event-loop turn leaves as one
``RaftEnvelope`` frame: with a thousand partitions, the heartbeats of a tick are one write, not a thousand.

Raft tolerates lost messages, and the transport relies on that: it never blocks the caller and never buffers
without bound. Per peer it keeps a queue capped at ``max_queue_messages`` (the oldest are dropped and
counted) and at ``max_queue_bytes`` of entries (a new append that does not fit is dropped: the leader
resends from where the follower's log ends), and while a peer is down it retries with capped exponential
backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import cast

from google.protobuf.message import DecodeError
from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.cluster import raft_wire as wire
from logbroker.cluster.raft_codec import RaftCodecError, decode_message, encode_message_into
from logbroker.cluster.tasks import cancel_and_wait
from logbroker.raft.types import Message

log = logging.getLogger("logbroker.transport")

DEFAULT_MAX_QUEUE_MESSAGES = 100_000
# Appends waiting for one slow or unreachable peer: without a byte bound, every group's in-flight window
# (Raft's max_inflight_bytes) could pile up here at once.
DEFAULT_MAX_QUEUE_BYTES = 32 << 20
DEFAULT_MAX_ENVELOPE_BYTES = 1 << 20  # small, so that heartbeats never wait long behind appends
INITIAL_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0
CONNECT_TIMEOUT_S = 5.0
# A connection must have lived this long before its end resets the backoff: a peer that accepts connections and
# then ends them at once (a broker shutting down, a wrong secret) is retried at MAX_BACKOFF_S, not 20/s.
STABLE_STREAM_S = MAX_BACKOFF_S
# The socket's own send buffer aside, what may wait in the event loop's buffer for one peer before the sender
# stops draining its queue (the queue's bounds then apply, and Raft resends what they drop).
WRITE_BUFFER_HIGH_BYTES = 4 << 20
# Upper bounds of the protobuf framing (tags, varints, length prefixes) of one RaftMessage inside an envelope
# and of one RaftEntry inside a message. Sizing envelopes by these bounds keeps them within max_envelope_bytes
# without serialising anything twice, and decides whether a message fits before it is encoded.
MESSAGE_FRAMING_BYTES = 256
ENTRY_FRAMING_BYTES = 64
# Refused handshakes and undecodable frames are logged on the first and every this-many-th, not each.
LOG_EVERY = 1000
MAX_LOGGED_SHAPES = 100  # distinct kinds of bad envelope tracked (others: only every LOG_EVERY-th is logged)
LOG_SHAPE_EVERY_S = 1.0

OnMessages = Callable[[list[tuple[str, Message]]], None]


@dataclass(eq=False)
class _Peer:
    """The sending side towards one peer: its queue, its sender task and what we last knew of its link."""

    node_id: int
    address: str  # the peer's Raft port, HOST:PORT
    queue: deque[tuple[str, Message]] = field(default_factory=deque)
    queued_bytes: int = 0  # _wire_bytes_bound of what is in the queue
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    connected: bool | None = None  # None until the first attempt, so the first outcome is logged
    task: asyncio.Task[None] | None = None
    link: _Link | None = None  # the connection the sender task writes to, once its handshake is done
    wrote_this_turn: bool = False  # send() wrote at once in this turn of the event loop (see send)


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
        """``peers`` maps node ids to their Raft ports (HOST:PORT); this node's own entry, if any, is ignored."""
        if max_queue_messages < 1 or max_envelope_bytes < 1 or max_queue_bytes < 1:
            raise ValueError("max_queue_messages, max_envelope_bytes and max_queue_bytes must be positive")
        self.node_id = node_id
        self._secret = secret
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
        self._server: asyncio.Server | None = None
        self._inbound: set[_Inbound] = set()
        self.inbound_opened = itertools.count()  # numbers inbound connections in the order they open
        self.misaddressed_envelopes = 0
        self.undecodable_envelopes = 0
        self.refused_connections = 0
        self._refusal_log = LogLimiter()  # per kind of refusal
        self.unfinished_frames_bytes = 0  # held by inbound buffers, at most wire.MAX_UNFINISHED_FRAMES_BYTES
        self.oversized_closes = 0  # connections closed because unfinished frames held too much
        self._bad_frames = 0  # frames that were not RaftEnvelopes at all (logged first and every LOG_EVERY-th)
        self._bad_envelopes = 0  # envelopes refused by the codec or forging their sender
        self._bad_envelope_log = LogLimiter()  # per shape: the text with its numbers taken out

    # ------------------------------------------------------------------ public API

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

    @property
    def inbound_connections(self) -> int:
        """Connections on our Raft port, authenticated or still in their handshake."""
        return len(self._inbound)

    def send(self, group: str, message: Message) -> None:
        """Queue ``message`` for ``message.to_node``; never blocks.

        The first message of a turn of the event loop towards an idle peer is written at once: a lone record's
        append then leaves before the leader hands its own write to the flush pool, and a follower's
        acknowledgement before anything else the turn does. The rest of the turn's messages queue, and the
        sender task writes them, many to an envelope, on the next turn, so a burst (thousands of groups
        electing after a broker dies) still costs a few writes, not one each."""
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
        link = peer.link
        if (len(peer.queue) == 1 and not peer.wrote_this_turn and link is not None and not link.paused
                and not link.closed):
            self._write_now(peer, link)  # nothing queued before it: the order on the wire is kept
        else:
            peer.wakeup.set()

    def _write_now(self, peer: _Peer, link: _Link) -> None:
        peer.wrote_this_turn = True
        asyncio.get_running_loop().call_soon(_next_turn, peer)
        try:
            for envelope in self._envelopes(peer):
                link.write(wire.frame(envelope.SerializeToString()))
        except ValueError as exc:
            # An envelope over the frame limit (one message larger than MAX_FRAME_BYTES): dropped with the
            # connection, as when the sender task writes it, never raised into the Ready that sent it, whose
            # other messages must still go. The sender task sees the link closed and reconnects.
            log.warning("raft peer %d: %s; the connection is dropped and made again", peer.node_id, exc)
            link.abort(str(exc))

    def send_many(self, items: Iterable[tuple[str, Message]]) -> None:
        for group, message in items:
            self.send(group, message)

    async def listen(self, host: str, port: int) -> int:
        """Accept peers' connections on HOST:PORT (port 0: any free one); returns the port bound."""
        if self._server is not None:
            raise RuntimeError("the Raft port is already listening")
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Inbound(self), host, port, reuse_address=True)
        except OSError as exc:
            raise OSError(f"cannot listen for Raft peers on {host}:{port}: {exc.strerror or exc} (is another "
                          "broker using the port? set --raft-listen)") from None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop_listening(self) -> None:
        """Close the Raft port and every connection on it (peers reconnect with backoff)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for inbound in list(self._inbound):
            inbound.close()
        if server is not None:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def start(self) -> None:
        if self._started or self._stopped:
            return
        self._started = True
        for peer in self._peers.values():
            self._spawn_sender(peer)

    async def stop(self) -> None:
        """Stop listening and cancel the sender tasks, which close their connections. Safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        await self.stop_listening()
        for task in list(self._senders):
            with contextlib.suppress(Exception):  # a sender's failure was its own; the stop goes on
                await cancel_and_wait(task)
        for peer in self._peers.values():
            self._mark_down(peer, "transport stopped")

    def set_peer_address(self, node_id: int, address: str) -> None:
        """Add a peer or re-point one; a re-pointed peer drops its connection and reconnects at once."""
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
        peer.link = None  # send() writes to the new task's connection only, once it is up
        if previous is not None:
            previous.cancel()
        task = asyncio.create_task(self._run_sender(peer, previous), name=f"raft-sender-{peer.node_id}")
        self._senders.add(task)
        task.add_done_callback(self._senders.discard)
        peer.task = task

    async def _run_sender(self, peer: _Peer, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            # Let the old task close its connection first, so two connections never interleave towards one peer.
            await asyncio.wait([previous])
        backoff_s = INITIAL_BACKOFF_S
        while True:
            await self._wait_for_work(peer, None)
            if await self._connect_and_send(peer) >= STABLE_STREAM_S:
                backoff_s = INITIAL_BACKOFF_S
            # Messages keep queueing (bounded) while we wait; Raft retransmits whatever gets dropped.
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)

    async def _connect_and_send(self, peer: _Peer) -> float:
        """Run one connection until it ends; returns how long it was up, in seconds (0 if never)."""
        loop = asyncio.get_running_loop()
        link: _Link | None = None
        connected_at_s: float | None = None
        try:
            host, _, port = peer.address.rpartition(":")
            async with asyncio.timeout(CONNECT_TIMEOUT_S + wire.HANDSHAKE_TIMEOUT_S):
                _, link = await loop.create_connection(lambda: _Link(peer.wakeup), host, int(port))
                nonce = await link.hello
                link.write(wire.proof(self._secret, nonce, self.node_id, peer.node_id))
                await link.accepted
            connected_at_s = loop.time()
            self._mark_up(peer)
            peer.link = link
            await self._write_envelopes(peer, link)
            reason = link.closed_reason
        except TimeoutError:
            reason = "no answer to the handshake in time" if link is not None else "connection timed out"
        except (OSError, ValueError, ConnectionError) as e:
            reason = str(e) or type(e).__name__
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # Not a network failure but a bug; keep the sender alive, since it serves every group of this peer.
            log.exception("raft sender for peer %d failed", peer.node_id)
            reason = repr(e)
        finally:
            if link is not None:
                if peer.link is link:
                    peer.link = None
                link.abort()
        self._mark_down(peer, reason)
        return 0.0 if connected_at_s is None else loop.time() - connected_at_s

    async def _write_envelopes(self, peer: _Peer, link: _Link) -> None:
        while True:
            await self._wait_for_work(peer, link)
            if link.closed:
                return  # what is queued stays queued, for the next connection
            for envelope in self._envelopes(peer):
                if link.closed:
                    return
                link.write(wire.frame(envelope.SerializeToString()))
                if link.paused:
                    await link.drained()
            if link.closed:
                return

    async def _wait_for_work(self, peer: _Peer, link: _Link | None) -> None:
        while not peer.queue and not (link is not None and link.closed):
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

    def _authenticate(self, inbound: _Inbound, data: bytes) -> int | None:
        """The proven sender's node id, or None (logged, counted) for a connection to close."""
        try:
            from_node, to_node = wire.check_proof(data, self._secret, inbound.nonce)
        except wire.HandshakeError as e:
            self._refuse(inbound.remote, str(e), e.kind)
            return None
        if to_node != self.node_id:
            self._note_misaddressed(from_node, to_node, inbound.remote)
            return None
        if from_node == self.node_id:
            self._refuse(inbound.remote, f"it proves the cluster secret as node {from_node}, this broker's own id: "
                                         "are two brokers running with the same --node-id?", "own node id")
            return None
        if from_node not in self._peers:
            self._refuse(inbound.remote, f"node {from_node} is not a peer of node {self.node_id} "
                                         f"(peers: {sorted(self._peers)})", "unknown node")
            return None
        return from_node

    def _refuse(self, remote: str, why: str, kind: str) -> None:
        """Count and log a refused connection: at most one line per kind of refusal per LOG_SHAPE_EVERY_S, and
        every LOG_EVERY-th (a flood of hostile connections must not flood the log)."""
        self.refused_connections += 1
        if self._refusal_log.allows(kind, self.refused_connections):
            log.warning("refused a connection to the Raft port of node %d from %s: %s (%d refused so far)",
                        self.node_id, remote, why, self.refused_connections)

    def _receive(self, envelope: pb.RaftEnvelope, remote: str, proven_from: int) -> None:
        if envelope.to_node != self.node_id:
            self._note_misaddressed(envelope.from_node, envelope.to_node, remote)
            return
        if envelope.from_node != proven_from:
            self._drop_bad_envelope(f"dropping a Raft envelope from {remote} that claims to come from node "
                                    f"{envelope.from_node} on a connection that proved to be node {proven_from}'s")
            return
        try:
            messages = [decode_message(raw, envelope.from_node, self.node_id) for raw in envelope.messages]
        except RaftCodecError as e:
            self._drop_bad_envelope(f"dropping a Raft envelope from node {envelope.from_node} ({remote}): {e}")
            return
        if messages:
            self._deliver(messages, envelope.from_node)

    def _drop_bad_envelope(self, why: str) -> None:
        """Count it, and log it unless one of the same shape (its text with the numbers taken out) was logged in the
        last LOG_SHAPE_EVERY_S: each kind of garbage a peer sends is named, and a flood of it is a line a second."""
        self.undecodable_envelopes += 1
        self._bad_envelopes += 1
        if self._bad_envelope_log.allows(re.sub(r"\d+", "#", why)[:200], self._bad_envelopes):
            log.error("%s (%d bad envelopes so far)", why, self._bad_envelopes)

    def _note_buffered(self, delta_bytes: int) -> None:
        """An inbound connection's buffer grew or shrank: past the bound, the one holding the most is closed."""
        self.unfinished_frames_bytes += delta_bytes
        if self.unfinished_frames_bytes <= wire.MAX_UNFINISHED_FRAMES_BYTES:
            return
        largest = max(self._inbound, key=lambda inbound: inbound.buffered_bytes)
        self.oversized_closes += 1
        if self._refusal_log.allows("unfinished frames", self.oversized_closes):
            log.warning("closing the connection to the Raft port of node %d from node %s (%s): its unfinished frame "
                        "holds %d bytes, and unfinished frames on this port %d, over %d (%d such closes so far)",
                        self.node_id, largest.from_node if largest.from_node is not None else "?", largest.remote,
                        largest.buffered_bytes, self.unfinished_frames_bytes, wire.MAX_UNFINISHED_FRAMES_BYTES,
                        self.oversized_closes)
        largest.close()
        largest.release_buffer()

    def _undecodable_frame(self, remote: str, proven_from: int, error: Exception) -> None:
        self.undecodable_envelopes += 1
        self._bad_frames += 1
        if self._bad_frames == 1 or self._bad_frames % LOG_EVERY == 0:
            log.error("dropping a Raft frame from node %d (%s) that is not a RaftEnvelope: %s", proven_from,
                      remote, error)

    def _note_misaddressed(self, from_node: int, to_node: int, remote: str) -> None:
        # A broker whose --peers (or --raft-peers) maps a node id to the wrong address; warn on the first of a burst.
        self.misaddressed_envelopes += 1
        if self.misaddressed_envelopes == 1 or self.misaddressed_envelopes % LOG_EVERY == 0:
            log.warning(
                "dropping Raft traffic from node %d (%s) addressed to node %d: this is node %d "
                "(%d misaddressed so far; check --peers and --raft-peers)",
                from_node, remote, to_node, self.node_id, self.misaddressed_envelopes,
            )

    def _deliver(self, messages: list[tuple[str, Message]], from_node: int) -> None:
        try:
            self._on_messages(messages)
        except Exception:
            # The connection carries every group from that peer; one failing handler must not cut them all off.
            log.exception("on_messages failed for an envelope from node %d", from_node)


class LogLimiter:
    """Whether to log one more of a kind of event: at most once per LOG_SHAPE_EVERY_S per kind (for up to
    MAX_LOGGED_SHAPES kinds), and on every LOG_EVERY-th event counted, so a flood of garbage is a line a second."""

    def __init__(self) -> None:
        self._last_s: dict[str, float] = {}  # kind -> when last logged

    def allows(self, kind: str, count: int) -> bool:
        now_s = time.monotonic()
        last_s = self._last_s.get(kind)
        tracked = last_s is not None or len(self._last_s) < MAX_LOGGED_SHAPES
        if (tracked and (last_s is None or now_s - last_s >= LOG_SHAPE_EVERY_S)) or count % LOG_EVERY == 0:
            self._last_s[kind] = now_s
            return True
        return False


def _wire_bytes_bound(group: str, message: Message) -> int:
    """An upper bound of the bytes ``message`` adds to an envelope once encoded."""
    size_bytes = MESSAGE_FRAMING_BYTES + len(group.encode())
    if message.membership is not None:
        size_bytes += len(message.membership.encode())
    for entry in message.entries:
        size_bytes += ENTRY_FRAMING_BYTES + len(entry.payload)
    return size_bytes


def _next_turn(peer: _Peer) -> None:
    peer.wrote_this_turn = False


class _Link(asyncio.Protocol):
    """The sending end of one connection: the HELLO's nonce, keepalives heard, write flow control."""

    def __init__(self, wakeup: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._wakeup = wakeup
        self.hello: asyncio.Future[bytes] = loop.create_future()
        self.accepted: asyncio.Future[None] = loop.create_future()  # the receiver's first byte after our PROOF
        self._greeting = bytearray()
        self._transport: asyncio.Transport | None = None
        self._heard_s = loop.time()
        self._watchdog: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None
        self.paused = False
        self.closed = False
        self.closed_reason = "connection closed"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        wire.tune_socket(transport.get_extra_info("socket"))
        self._transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH_BYTES)
        self._watchdog = self._loop.call_later(wire.KEEPALIVE_TIMEOUT_S, self._check_alive)

    def data_received(self, data: bytes) -> None:
        self._heard_s = self._loop.time()
        if not self.hello.done():
            self._greeting += data
            if len(self._greeting) < wire.HELLO_BYTES:
                return
            try:
                self.hello.set_result(wire.parse_hello(self._greeting))
            except wire.HandshakeError as e:
                self.hello.set_exception(e)
                self.abort(str(e))
                return
            data = bytes(self._greeting[wire.HELLO_BYTES:])
        if data and not self.accepted.done():
            self.accepted.set_result(None)
        if data.strip(wire.KEEPALIVE):
            self.abort("the peer wrote something other than keepalives")

    def _check_alive(self) -> None:
        silent_s = self._loop.time() - self._heard_s
        if silent_s >= wire.KEEPALIVE_TIMEOUT_S:
            self.abort(f"nothing heard from the peer for {silent_s:.1f} s")
        else:
            self._watchdog = self._loop.call_later(wire.KEEPALIVE_TIMEOUT_S - silent_s, self._check_alive)

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self.closed:
            self._transport.write(data)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def drained(self) -> None:
        if self.paused and not self.closed:
            self._drained = self._loop.create_future()
            await self._drained

    def abort(self, reason: str | None = None) -> None:
        if reason is not None and not self.closed:
            self.closed_reason = reason
        if self._transport is not None:
            self._transport.abort()
        self._closed()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.closed_reason == "connection closed":
            self.closed_reason = str(exc) or type(exc).__name__
        self._closed()

    def _closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if not self.hello.done():
            self.hello.set_exception(ConnectionError(self.closed_reason))
            self.hello.exception()  # retrieved: the sender may be gone already
        elif not self.accepted.done():
            self.accepted.set_exception(ConnectionError(
                "the peer closed the connection at our handshake: its log says why (a different cluster secret, "
                "or it does not know this node id)"))
            self.accepted.exception()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._wakeup.set()


class _Inbound(asyncio.Protocol):
    """The receiving end of one connection: HELLO out, PROOF in, then frames, with keepalives going back."""

    def __init__(self, owner: RaftTransport) -> None:
        self._owner = owner
        self._loop = asyncio.get_running_loop()
        self.nonce = wire.new_nonce()
        self.remote = "?"
        # The order connections were opened in: the loop's clock is read once per turn (uvloop caches it), so
        # connections accepted in one turn had equal times, and "the oldest" pushed out was any one of them.
        self.opened_order = next(owner.inbound_opened)
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._from_node: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._partial_since_s: float | None = None  # when the unfinished frame in the buffer began, if any
        self.buffered_bytes = 0  # len(self._buffer) as last told to the owner (RaftTransport._note_buffered)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        self.remote = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        pending = [other for other in self._owner._inbound if other._from_node is None]
        self._owner._inbound.add(self)
        if self._owner._stopped:
            self.close()
            return
        if len(pending) >= wire.MAX_PENDING_HANDSHAKES:
            # Close the oldest, not this one: a real peer proves itself within a round trip, so strangers who hold
            # idle handshakes open cannot keep it out; they only push each other out.
            oldest = min(pending, key=lambda other: other.opened_order)
            self._owner._refuse(oldest.remote, f"{len(pending)} connections are still in their handshake; the "
                                               "oldest is closed", "too many")
            oldest.close()
        wire.tune_socket(transport.get_extra_info("socket"))
        self._transport.write(wire.hello(self.nonce))
        self._timer = self._loop.call_later(wire.HANDSHAKE_TIMEOUT_S, self._handshake_timed_out)

    @property
    def from_node(self) -> int | None:
        """The node this connection proved to be, None while in its handshake."""
        return self._from_node

    def _handshake_timed_out(self) -> None:
        self._owner._refuse(self.remote, f"no handshake within {wire.HANDSHAKE_TIMEOUT_S:.0f} s", "timeout")
        self.close()

    def _keepalive(self) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        if self._partial_since_s is not None and self._loop.time() - self._partial_since_s > wire.FRAME_DEADLINE_S:
            # A peer writes a frame in one go; one left unfinished this long holds its buffer for nothing.
            self._owner._undecodable_frame(self.remote, self._from_node or 0, TimeoutError(
                f"a frame begun {wire.FRAME_DEADLINE_S:.0f} s ago is still unfinished ({len(self._buffer)} bytes "
                "so far); closing the connection"))
            self.close()
            return
        self._transport.write(wire.KEEPALIVE)
        self._timer = self._loop.call_later(wire.KEEPALIVE_INTERVAL_S, self._keepalive)

    def data_received(self, data: bytes) -> None:
        try:
            self._take(data)
        finally:
            self._account()

    def _account(self) -> None:
        delta_bytes = len(self._buffer) - self.buffered_bytes
        if delta_bytes:
            self.buffered_bytes += delta_bytes
            self._owner._note_buffered(delta_bytes)

    def release_buffer(self) -> None:
        """Let the buffer's memory go now (closing: nothing more is read from it)."""
        self._buffer = bytearray()
        self._account()

    def _take(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if self._from_node is None:
            if len(buffer) < wire.PROOF_BYTES:
                return
            self._from_node = self._owner._authenticate(self, bytes(buffer[:wire.PROOF_BYTES]))
            if self._from_node is None:
                self.close()
                return
            del buffer[:wire.PROOF_BYTES]
            if self._transport is not None:
                self._transport.write(wire.KEEPALIVE)  # the acceptance: the sender starts writing frames now
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_later(wire.KEEPALIVE_INTERVAL_S, self._keepalive)
        self._read_frames(buffer, self._from_node)

    def _read_frames(self, buffer: bytearray, from_node: int) -> None:
        header_bytes = wire.FRAME_HEADER.size
        start = 0
        while len(buffer) - start >= header_bytes:
            (length,) = wire.FRAME_HEADER.unpack_from(buffer, start)
            if length > wire.MAX_FRAME_BYTES:
                self._owner._undecodable_frame(self.remote, from_node, ValueError(
                    f"a frame of {length} bytes exceeds {wire.MAX_FRAME_BYTES}; closing the connection"))
                self.close()
                return
            end = start + header_bytes + length
            if len(buffer) < end:
                break
            body = bytes(buffer[start + header_bytes:end])
            start = end
            try:
                envelope = pb.RaftEnvelope.FromString(body)
            except DecodeError as e:
                self._owner._undecodable_frame(self.remote, from_node, e)
                continue
            self._owner._receive(envelope, self.remote, from_node)
            if self._transport is None or self._transport.is_closing():
                return
        if start:
            del buffer[:start]
        if not buffer:
            self._partial_since_s = None
        elif start or self._partial_since_s is None:
            self._partial_since_s = self._loop.time()  # a new frame began

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._owner._inbound.discard(self)
        self._transport = None
        self.release_buffer()
