"""RaftTransport over loopback: each node's Raft port on a free 127.0.0.1 port, in one event loop."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from logbroker_client import records as rec
from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.cluster import raft_wire as wire
from logbroker.cluster.raft_codec import encode_message
from logbroker.cluster.transport import RaftTransport, _wire_bytes_bound
from logbroker.raft.membership import Membership
from logbroker.raft.types import Entry, EntryKind, Message, MessageType
from tests.cluster.test_raft_codec import messages

DEADLINE_S = 10.0
POLL_S = 0.005
SECRET = "test-cluster-secret-0123456789"


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    """Poll ``condition`` every few ms until it holds; fail with ``what`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(POLL_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def address(port: int) -> str:
    return f"127.0.0.1:{port}"


@dataclass
class Node:
    """One broker's Raft endpoint: its transport, its Raft port, and every envelope it was handed."""

    node_id: int
    port: int
    envelopes: list[list[tuple[str, Message]]] = field(default_factory=list)
    transport: RaftTransport | None = None
    listening: bool = False

    @property
    def received(self) -> list[tuple[str, Message]]:
        return [item for envelope in self.envelopes for item in envelope]

    def on_messages(self, batch: list[tuple[str, Message]]) -> None:
        self.envelopes.append(batch)

    def make_transport(self, peers: dict[int, str], **limits: int) -> RaftTransport:
        self.transport = RaftTransport(self.node_id, peers, self.on_messages, secret=SECRET, **limits)
        return self.transport

    async def serve(self) -> None:
        assert self.transport is not None
        assert await self.transport.listen("127.0.0.1", self.port) == self.port
        self.listening = True

    async def halt_server(self) -> None:
        if self.transport is not None and self.listening:
            await self.transport.stop_listening()
        self.listening = False

    async def close(self) -> None:
        if self.transport is not None:
            await self.transport.stop()
        await self.halt_server()


@pytest.fixture
async def nodes() -> AsyncIterator[dict[int, Node]]:
    """Three nodes with transports pointed at each other; tests start what they need."""
    cluster = {node_id: Node(node_id, free_port()) for node_id in (1, 2, 3)}
    peers = {node_id: address(node.port) for node_id, node in cluster.items()}
    for node in cluster.values():
        node.make_transport(peers)
    try:
        yield cluster
    finally:
        for node in cluster.values():
            await node.close()


async def start(*members: Node) -> None:
    for node in members:
        assert node.transport is not None
        await node.serve()
        await node.transport.start()


def tx(node: Node) -> RaftTransport:
    assert node.transport is not None
    return node.transport


def heartbeat(from_node: int, to_node: int, commit_offset: int = 10) -> Message:
    return Message(MessageType.HEARTBEAT, from_node, to_node, term=3, commit_offset=commit_offset)


def record_batch(count: int, value: bytes = b"\x00batch\xff") -> bytes:
    """A real record batch: a DATA entry's payload must be one (the receiving codec checks it)."""
    builder = rec.BatchBuilder()
    for i in range(count):
        builder.append(1_700_000_000_000 + i, None, value)
    return builder.build()


def rich_messages(from_node: int, to_node: int) -> list[Message]:
    entries = (
        Entry(0, 0, 1, EntryKind.NOOP),
        Entry(1, 99, 1, EntryKind.DATA, record_batch(99)),
        Entry(100, 100, 2, EntryKind.CONFIG, Membership.of([1, 2, 3]).encode()),
    )
    return [
        Message(MessageType.PRE_VOTE, from_node, to_node, term=5, last_log_offset=99, last_log_term=1),
        Message(MessageType.VOTE, from_node, to_node, term=5, leadership_transfer=True, last_log_offset=7),
        Message(MessageType.VOTE_RESP, from_node, to_node, term=5, reject=True),
        Message(MessageType.APPEND, from_node, to_node, term=2, prev_last_offset=-1, entries=entries, commit_offset=1),
        Message(
            MessageType.APPEND_RESP,
            from_node,
            to_node,
            term=2,
            reject=True,
            prev_last_offset=40,
            reject_hint_offset=12,
            reject_hint_term=1,
        ),
        Message(MessageType.APPEND_RESP, from_node, to_node, term=2, match_offset=100),
        heartbeat(from_node, to_node),
        Message(MessageType.TIMEOUT_NOW, from_node, to_node, term=6),
        Message(
            MessageType.RESET_LOG,
            from_node,
            to_node,
            term=6,
            log_start_offset=500,
            prev_term=4,
            commit_offset=499,
            membership=Membership.of([1, 2], [3]),
        ),
    ]


async def test_messages_arrive_in_order_with_all_fields(nodes: dict[int, Node]) -> None:
    a, b = nodes[1], nodes[2]
    await start(a, b)
    sent = [(group, m) for group in ("orders-0", "orders-1", "__controller") for m in rich_messages(1, 2)]
    for group, message in sent:
        tx(a).send(group, message)
    replies = [("orders-0", Message(MessageType.APPEND_RESP, 2, 1, term=2, match_offset=100))]
    tx(b).send_many(replies)

    await wait_until(lambda: len(b.received) == len(sent), "all of A's messages at B")
    await wait_until(lambda: a.received == replies, "B's reply at A, on B's own stream")
    assert b.received == sent
    assert tx(a).peer_connected(2) and tx(b).peer_connected(1)
    assert not tx(a).peer_connected(3)  # nothing sent to 3, so no stream was opened


async def test_a_tick_of_1000_groups_travels_in_few_envelopes(nodes: dict[int, Node]) -> None:
    a, b = nodes[1], nodes[2]
    await start(a, b)
    tx(a).send("warm-up", heartbeat(1, 2))  # measure the steady state, not the connection set-up
    await wait_until(lambda: len(b.received) == 1, "the connection to be up")
    b.envelopes.clear()
    sent = [(f"topic-{i}", heartbeat(1, 2, commit_offset=i)) for i in range(1000)]
    for group, message in sent:  # all within one event-loop turn, like the heartbeats of one tick
        tx(a).send(group, message)

    await wait_until(lambda: len(b.received) == len(sent), "1,000 heartbeats at B")
    assert b.received == sent
    assert len(b.envelopes) <= 3


async def test_a_turns_first_message_to_an_idle_peer_leaves_at_once_and_the_rest_wait_for_the_sender(
        nodes: dict[int, Node]) -> None:
    a, b = nodes[1], nodes[2]
    await start(a, b)
    tx(a).send("warm-up", heartbeat(1, 2))
    await wait_until(lambda: len(b.received) == 1, "the connection to be up")
    await asyncio.sleep(0)  # a turn of its own: the warm-up may have been this turn's first write
    b.envelopes.clear()

    first, second, third = (("orders-0", heartbeat(1, 2, commit_offset=i)) for i in (1, 2, 3))
    tx(a).send(*first)
    assert tx(a).queued_messages(2) == 0  # written on this stack, before the sender task could run
    tx(a).send(*second)
    tx(a).send(*third)
    assert tx(a).queued_messages(2) == 2  # later in the same turn: queued, for one envelope on the next

    await wait_until(lambda: len(b.received) == 3, "all three at B")
    assert b.received == [first, second, third]
    assert [len(envelope) for envelope in b.envelopes] == [1, 2]


async def test_a_large_backlog_is_split_by_envelope_bytes(nodes: dict[int, Node]) -> None:
    a, b = nodes[1], nodes[2]
    limit_bytes = 64 << 10
    a.make_transport({2: address(b.port)}, max_envelope_bytes=limit_bytes)
    await start(a, b)
    payload = record_batch(1, b"r" * 4000)
    sent = [
        ("t-0", Message(MessageType.APPEND, 1, 2, term=1, prev_last_offset=i - 1,
                        entries=(Entry(i, i, 1, EntryKind.DATA, payload),)))
        for i in range(200)
    ]
    tx(a).send_many(sent)

    await wait_until(lambda: len(b.received) == len(sent), "the whole backlog at B")
    assert b.received == sent
    assert len(b.envelopes) >= len(sent) * len(payload) // limit_bytes
    assert max(len(envelope) for envelope in b.envelopes) * len(payload) <= limit_bytes


async def test_a_down_peer_never_blocks_stays_bounded_and_recovers(
    nodes: dict[int, Node], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="logbroker.transport")
    a, b = nodes[1], nodes[2]
    bound = 100
    a.make_transport({2: address(b.port)}, max_queue_messages=bound)
    await start(a)  # B's server is not running: its port refuses connections

    loop = asyncio.get_running_loop()
    began_s = loop.time()
    tx(a).send_many(("t-0", heartbeat(1, 2, commit_offset=i)) for i in range(10_000))
    assert loop.time() - began_s < 1.0
    assert tx(a).queued_messages(2) <= bound
    assert tx(a).dropped_messages[2] >= 10_000 - bound

    await wait_until(lambda: "unreachable" in caplog.text, "a failed connection attempt")
    # Keep sending through several retries: the queue stays bounded the whole time.
    for i in range(5):
        tx(a).send_many(("t-0", heartbeat(1, 2, commit_offset=20_000 + i)) for _ in range(bound))
        await asyncio.sleep(0)
        assert tx(a).queued_messages(2) <= bound
    assert not tx(a).peer_connected(2)

    b.make_transport({1: address(a.port)})
    await b.serve()  # same port as before
    marker = ("t-0", heartbeat(1, 2, commit_offset=99_999))
    tx(a).send(*marker)
    await wait_until(lambda: marker in b.received, "delivery after the peer came up")
    assert b.received[-1] == marker
    assert len(b.received) <= bound + 1
    assert tx(a).peer_connected(2)
    assert caplog.text.count("unreachable") == 1  # once per state change, not per retry
    assert caplog.text.count("connected") == 1


async def test_a_restarted_peer_is_noticed_and_reached_again(
    nodes: dict[int, Node], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="logbroker.transport")
    a, b = nodes[1], nodes[2]
    await start(a, b)
    tx(a).send("g", heartbeat(1, 2))
    await wait_until(lambda: len(b.received) == 1, "first heartbeat")

    await b.halt_server()
    await wait_until(lambda: not tx(a).peer_connected(2), "A noticing that B went away")
    await b.serve()
    tx(a).send("g", heartbeat(1, 2, commit_offset=11))
    await wait_until(lambda: len(b.received) == 2, "heartbeat after B restarted")
    assert b.received[-1][1].commit_offset == 11
    assert caplog.text.count("disconnected") == 1
    assert caplog.text.count(" connected") == 2


async def test_an_envelope_for_another_node_is_dropped(
    nodes: dict[int, Node], caplog: pytest.LogCaptureFixture
) -> None:
    a, c = nodes[1], nodes[3]
    a.make_transport({2: address(c.port)})  # a wrong --peers: node 2's address is really node 3's
    await start(a, c)
    tx(a).send("g", heartbeat(1, 2))
    await wait_until(lambda: tx(c).misaddressed_envelopes == 1, "C rejecting the envelope")
    assert c.envelopes == []
    assert "addressed to node 2: this is node 3" in caplog.text


async def raw_connection(node: Node, from_node: int = 1, secret: str = SECRET,
                         to_node: int | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``node``'s Raft port that has read the HELLO and sent a PROOF, as a peer with its own
    code would."""
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    nonce = wire.parse_hello(await reader.readexactly(wire.HELLO_BYTES))
    writer.write(wire.proof(secret, nonce, from_node, node.node_id if to_node is None else to_node))
    return reader, writer


async def raw_stream(node: Node, envelopes: list[pb.RaftEnvelope | bytes]) -> None:
    """Write ``envelopes`` (or raw frame bodies) to ``node`` on one proven connection, then close it."""
    _, writer = await raw_connection(node)
    for envelope in envelopes:
        writer.write(wire.frame(envelope if isinstance(envelope, bytes) else envelope.SerializeToString()))
    await writer.drain()
    writer.close()


async def closed_by_peer(reader: asyncio.StreamReader, timeout_s: float = DEADLINE_S) -> bool:
    """Whether the other end closes the connection within the time (keepalive bytes are skipped)."""
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await reader.read(4096):
                assert not chunk.strip(wire.KEEPALIVE), f"unexpected bytes {chunk!r}"
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


async def test_bad_envelopes_are_dropped_without_killing_the_stream(
    nodes: dict[int, Node], caplog: pytest.LogCaptureFixture
) -> None:
    b = nodes[2]
    await start(b)
    good = pb.RaftEnvelope(from_node=1, to_node=2, messages=[encode_message("g", heartbeat(1, 2))])
    misaddressed = pb.RaftEnvelope(from_node=1, to_node=3, messages=[encode_message("g", heartbeat(1, 3))])
    undecodable = pb.RaftEnvelope(from_node=1, to_node=2, messages=[pb.RaftMessage(group="g", type=77)])

    forged_sender = pb.RaftEnvelope(from_node=3, to_node=2, messages=[encode_message("g", heartbeat(3, 2))])
    not_protobuf = b"\xff\xfe not a RaftEnvelope"

    await raw_stream(b, [misaddressed, undecodable, forged_sender, not_protobuf, good])
    await wait_until(lambda: b.received != [], "the good envelope at B")
    assert b.received == [("g", heartbeat(1, 2))]  # the connection stays in order, so the others were seen
    assert tx(b).misaddressed_envelopes == 1 and tx(b).undecodable_envelopes == 3
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3 and all("from node 1" in e or "proved to be node 1" in e for e in errors), errors


async def test_a_failing_handler_does_not_cut_the_stream(
    nodes: dict[int, Node], caplog: pytest.LogCaptureFixture
) -> None:
    b = nodes[2]
    delivered: list[list[tuple[str, Message]]] = []

    def on_messages(batch: list[tuple[str, Message]]) -> None:
        delivered.append(batch)
        if len(delivered) == 1:
            raise RuntimeError("handler bug")

    b.transport = RaftTransport(2, {1: address(nodes[1].port)}, on_messages, secret=SECRET)
    await start(b)
    first, second = heartbeat(1, 2, commit_offset=1), heartbeat(1, 2, commit_offset=2)
    await raw_stream(
        b, [pb.RaftEnvelope(from_node=1, to_node=2, messages=[encode_message("g", m)]) for m in (first, second)]
    )
    await wait_until(lambda: len(delivered) == 2, "both envelopes handed over")
    assert delivered == [[("g", first)], [("g", second)]]
    assert "on_messages failed" in caplog.text


async def test_messages_for_unknown_nodes_are_dropped_and_counted(
    nodes: dict[int, Node], caplog: pytest.LogCaptureFixture
) -> None:
    a = nodes[1]
    await start(a)
    tx(a).send("g", heartbeat(1, 9))
    tx(a).send("g", heartbeat(1, 9))
    tx(a).send("g", heartbeat(1, 1))  # itself: never a peer
    assert tx(a).dropped_messages[9] == 2 and tx(a).dropped_messages[1] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "node 9" in w]) == 1


async def test_set_peer_address_repoints_a_peer(nodes: dict[int, Node]) -> None:
    a, b = nodes[1], nodes[2]
    b_elsewhere = Node(2, free_port())
    b_elsewhere.make_transport({1: address(a.port)})
    try:
        await start(a, b)
        await b_elsewhere.serve()
        tx(a).send("g", heartbeat(1, 2, commit_offset=1))
        await wait_until(lambda: len(b.received) == 1, "delivery at the first address")

        tx(a).set_peer_address(2, address(b_elsewhere.port))
        tx(a).send("g", heartbeat(1, 2, commit_offset=2))
        await wait_until(lambda: len(b_elsewhere.received) == 1, "delivery at the new address")
        assert len(b.received) == 1
    finally:
        await b_elsewhere.close()


async def test_stop_is_idempotent_and_leaves_no_tasks(nodes: dict[int, Node]) -> None:
    a, b = nodes[1], nodes[2]
    baseline = asyncio.all_tasks()
    await start(a, b)
    tx(a).send("g", heartbeat(1, 2))
    tx(a).send("g", heartbeat(1, 3))  # node 3 is down: its sender is retrying when stop() comes
    await wait_until(lambda: len(b.received) == 1, "delivery before stop")

    await tx(a).stop()
    await tx(a).stop()
    await tx(b).stop()
    tx(a).send("g", heartbeat(1, 2))  # after stop: dropped, not raised, not queued for ever
    assert tx(a).queued_messages(2) == 0 and not tx(a).peer_connected(2)
    assert not any(task.get_name().startswith("raft-sender") for task in asyncio.all_tasks())
    assert tx(a).inbound_connections == 0 and tx(b).inbound_connections == 0
    current = asyncio.current_task()
    await wait_until(lambda: not (asyncio.all_tasks() - baseline - {current}), "server tasks to end", 5.0)


@settings(max_examples=200, deadline=None)
@given(group=st.text(max_size=300), message=messages())
def test_envelope_sizing_bounds_the_encoded_size(group: str, message: Message) -> None:
    alone = pb.RaftEnvelope(messages=[encode_message(group, message)]).ByteSize()
    assert alone <= _wire_bytes_bound(group, message)


class FreezableProxy:
    """A TCP relay to a server that can go silent without closing anything, like a peer that lost power."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            pump = asyncio.create_task(self._pump(reader, writer))
            self._pumps.add(pump)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                if not self.frozen:  # frozen: swallow everything, answer nothing, keep the socket open
                    writer.write(data)
                    await writer.drain()
        finally:
            writer.close()


async def test_keepalive_notices_a_silent_peer_within_seconds(nodes: dict[int, Node]) -> None:
    a, b = nodes[1], nodes[2]
    proxy = FreezableProxy(b.port)
    await proxy.start()
    try:
        a.make_transport({2: address(proxy.port)})
        await start(a, b)
        tx(a).send("g", heartbeat(1, 2))
        await wait_until(lambda: len(b.received) == 1, "delivery through the proxy")

        proxy.frozen = True
        await wait_until(lambda: not tx(a).peer_connected(2), "keepalive to declare B dead", timeout_s=8.0)
    finally:
        await tx(a).stop()
        await proxy.close()


async def test_appends_for_a_down_peer_stay_within_the_byte_bound(nodes: dict[int, Node]) -> None:
    a, b = nodes[1], nodes[2]
    bound_bytes = 64 << 10
    a.make_transport({2: address(b.port)}, max_queue_bytes=bound_bytes)
    await start(a)  # B is down: everything queues
    payload = record_batch(1, b"r" * 4000)
    appends = [("t-0", Message(MessageType.APPEND, 1, 2, term=1, prev_last_offset=i - 1,
                               entries=(Entry(i, i, 1, EntryKind.DATA, payload),)))
               for i in range(100)]
    tx(a).send_many(appends)
    assert tx(a).queued_bytes(2) <= bound_bytes
    kept = tx(a).queued_messages(2)
    assert 0 < kept < len(appends) and tx(a).dropped_messages[2] == len(appends) - kept
    tx(a).send("t-0", heartbeat(1, 2))  # no entries: never refused for bytes
    assert tx(a).queued_messages(2) == kept + 1

    b.make_transport({1: address(a.port)})
    await b.serve()
    await wait_until(lambda: len(b.received) == kept + 1, "the queued messages at B")
    assert b.received == [*appends[:kept], ("t-0", heartbeat(1, 2))]  # the oldest kept: a gap-free run
    assert tx(a).queued_bytes(2) == 0


# ---------------------------------------------------------------------------- the Raft port's handshake


async def test_connections_that_do_not_prove_the_secret_are_closed_unheard(
    nodes: dict[int, Node], caplog: pytest.LogCaptureFixture
) -> None:
    b = nodes[2]
    await start(b)
    envelope = pb.RaftEnvelope(from_node=1, to_node=2, messages=[encode_message("g", heartbeat(1, 2))])
    attempts = [
        dict(secret="another-cluster-secret-0123456789"),  # a broker of another cluster
        dict(secret=""),                                    # no secret at all
        dict(from_node=9),                                  # the right secret, but not a peer
        dict(to_node=3),                                    # meant for another node (a wrong --raft-peers)
    ]
    for attempt in attempts:
        reader, writer = await raw_connection(b, **attempt)  # type: ignore[arg-type]
        writer.write(wire.frame(envelope.SerializeToString()))
        assert await closed_by_peer(reader), f"B kept a connection after {attempt}"
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
    await reader.readexactly(wire.HELLO_BYTES)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 64)  # a gRPC client at the wrong port
    assert await closed_by_peer(reader)
    writer.close()

    assert b.envelopes == []
    assert tx(b).refused_connections == 4 and tx(b).misaddressed_envelopes == 1
    text = caplog.text
    assert "does not prove this cluster's secret" in text and "node 9 is not a peer of node 2" in text
    assert "wrong greeting" in text and "addressed to node 3: this is node 2" in text


async def test_a_frame_beyond_the_limit_closes_the_connection(nodes: dict[int, Node]) -> None:
    b = nodes[2]
    await start(b)
    reader, writer = await raw_connection(b)
    writer.write(wire.FRAME_HEADER.pack(wire.MAX_FRAME_BYTES + 1) + b"\x00" * 1024)
    assert await closed_by_peer(reader)
    writer.close()
    assert tx(b).undecodable_envelopes == 1 and b.envelopes == []


async def test_silent_handshakes_time_out_and_a_surplus_one_pushes_out_the_oldest(
    nodes: dict[int, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wire, "HANDSHAKE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(wire, "MAX_PENDING_HANDSHAKES", 3)
    b = nodes[2]
    await start(b)
    idle = [await asyncio.open_connection("127.0.0.1", b.port) for _ in range(3)]
    for reader, _ in idle:
        await reader.readexactly(wire.HELLO_BYTES)
    surplus_reader, surplus_writer = await asyncio.open_connection("127.0.0.1", b.port)
    assert await surplus_reader.readexactly(wire.HELLO_BYTES)  # let in: strangers cannot keep a peer out
    assert await closed_by_peer(idle[0][0], 0.2), "the oldest pending handshake was not pushed out"
    for reader, writer in [*idle[1:], (surplus_reader, surplus_writer)]:  # the others time out
        assert await closed_by_peer(reader, 2.0)
        writer.close()
    idle[0][1].close()
    await wait_until(lambda: tx(b).inbound_connections == 0, "every refused connection to be let go")
    assert tx(b).refused_connections == 4

    # A real peer still gets through afterwards.
    a = nodes[1]
    await start(a)
    tx(a).send("g", heartbeat(1, 2))
    await wait_until(lambda: len(b.received) == 1, "delivery from a real peer")


async def test_a_frame_left_unfinished_past_the_deadline_closes_the_connection(
    nodes: dict[int, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wire, "FRAME_DEADLINE_S", 0.5)
    monkeypatch.setattr(wire, "KEEPALIVE_INTERVAL_S", 0.1)
    b = nodes[2]
    await start(b)
    reader, writer = await raw_connection(b)
    writer.write(wire.FRAME_HEADER.pack(1 << 20) + b"\x00" * 1000)  # 1 MiB announced, 1,000 bytes sent
    assert await closed_by_peer(reader, 5.0)
    writer.close()
    assert tx(b).undecodable_envelopes == 1 and b.envelopes == []


async def test_a_sender_refused_by_its_peer_keeps_retrying_and_delivers_nothing(
    nodes: dict[int, Node], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="logbroker.transport")
    a, b = nodes[1], nodes[2]
    a.transport = RaftTransport(1, {2: address(b.port)}, a.on_messages, secret="another-cluster-secret-0123456789")
    await start(a, b)
    for _ in range(2):  # Raft keeps sending (heartbeats): each message finds a refused connection and a retry
        refused = tx(b).refused_connections
        tx(a).send("g", heartbeat(1, 2))
        await wait_until(lambda refused=refused: tx(b).refused_connections > refused, "B refusing A again")
    assert b.envelopes == []
    assert "does not prove this cluster's secret" in caplog.text
    assert "closed the connection at our handshake" in caplog.text
    assert not tx(a).peer_connected(2) and " connected" not in caplog.text  # never counted as up


async def test_a_port_that_is_not_a_raft_port_is_named_in_the_log(
    nodes: dict[int, Node], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="logbroker.transport")

    async def http_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n" + b" " * 64)
        await writer.drain()

    server = await asyncio.start_server(http_server, "127.0.0.1", 0)
    try:
        a = nodes[1]
        a.make_transport({2: address(server.sockets[0].getsockname()[1])})
        await start(a)
        tx(a).send("g", heartbeat(1, 2))
        await wait_until(lambda: "did not answer with the logbroker Raft greeting" in caplog.text,
                         "A to say what it found at the port")
        assert not tx(a).peer_connected(2)
    finally:
        server.close()


async def test_unfinished_frames_past_the_port_bound_close_the_connection_holding_the_most(
    nodes: dict[int, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each unfinished frame is bounded in time (FRAME_DEADLINE_S); all of them together are bounded in bytes, so a
    peer cannot hold a maximal frame open on any number of connections. Whole frames still pass, and the count
    of what is held goes back to zero."""
    bound_bytes = 100_000
    monkeypatch.setattr(wire, "MAX_UNFINISHED_FRAMES_BYTES", bound_bytes)
    b = nodes[2]
    await start(b)
    big = await raw_connection(b)
    big[1].write(wire.FRAME_HEADER.pack(1 << 20) + b"\x00" * 70_000)  # 1 MiB announced, 70 kB sent
    await wait_until(lambda: tx(b).unfinished_frames_bytes >= 70_000, "the first unfinished frame to be held")
    small = await raw_connection(b)
    small[1].write(wire.FRAME_HEADER.pack(1 << 20) + b"\x00" * 20_000)
    await wait_until(lambda: tx(b).unfinished_frames_bytes >= 90_000, "the second unfinished frame to be held")
    assert not await closed_by_peer(big[0], 0.2), "closed while under the bound"
    small[1].write(b"\x00" * 20_000)  # 110 kB in all: past the bound
    assert await closed_by_peer(big[0], 5.0), "the connection holding the most was not closed"
    assert not await closed_by_peer(small[0], 0.2), "the connection holding less was closed too"
    assert tx(b).oversized_closes == 1 and tx(b).unfinished_frames_bytes <= bound_bytes
    small[1].write(b"\x00" * ((1 << 20) - 40_000))  # its frame completes: zeros, not an envelope, and dropped
    await wait_until(lambda: tx(b).unfinished_frames_bytes == 0, "the completed frame to leave the buffer")
    await raw_stream(b, [pb.RaftEnvelope(from_node=1, to_node=2, messages=[encode_message("g", heartbeat(1, 2))])])
    await wait_until(lambda: len(b.received) == 1, "a whole envelope delivered after the close")
    small[1].close()
    big[1].close()
    await wait_until(lambda: tx(b).inbound_connections == 0, "every connection to be let go")
    assert tx(b).unfinished_frames_bytes == 0
