"""Adversarial tests of RaftTransport's direct write (commit 211c730): a turn's first message to an idle peer is
written on the caller's stack. Every test runs under the default asyncio loop and under uvloop (the broker's)."""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Awaitable, Callable

import pytest
import uvloop
from logbroker_client import records as rec
from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.cluster import raft_wire as wire
from logbroker.cluster.transport import WRITE_BUFFER_HIGH_BYTES, RaftTransport
from logbroker.raft.types import Entry, EntryKind, Message, MessageType

SECRET = "adversary-secret"
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(loop_name: str, main: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(60):  # the same task as main: no_tasks_left sees only the transports' tasks
            await main()

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(bounded())


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def hb(seq: int, src: int = 1, dst: int = 2) -> Message:
    return Message(MessageType.HEARTBEAT, src, dst, term=1, commit_offset=seq)


def batch_payload(value_bytes: int) -> bytes:
    builder = rec.BatchBuilder()
    builder.append(1000, None, b"x" * value_bytes)
    return builder.build()


def append(seq: int, payload: bytes, src: int = 1, dst: int = 2) -> Message:
    entry = Entry(base_offset=seq, last_offset=seq, term=1, kind=EntryKind.DATA, payload=payload)
    return Message(MessageType.APPEND, src, dst, term=1, prev_last_offset=seq - 1, prev_term=1 if seq else 0,
                   entries=(entry,), commit_offset=seq)


def seq_of(message: Message) -> int:
    return message.commit_offset


def assert_strictly_increasing(seqs: list[int]) -> None:
    for before, after in zip(seqs, seqs[1:], strict=False):
        assert after > before, f"reordered or duplicated: {before} then {after} (of {len(seqs)})"


class Receiver:
    def __init__(self, node_id: int, peers: dict[int, str], on_message: Callable[[str, Message], None] | None = None):
        self.seqs: list[int] = []
        self.on_message = on_message
        self.transport = RaftTransport(node_id, peers, self._got, secret=SECRET)
        self.port = 0

    def _got(self, messages: list[tuple[str, Message]]) -> None:
        for group, message in messages:
            self.seqs.append(seq_of(message))
            if self.on_message is not None:
                self.on_message(group, message)

    async def listen(self, port: int = 0) -> int:
        self.port = await self.transport.listen("127.0.0.1", port)
        return self.port


async def connected_pair(peer_port: int) -> RaftTransport:
    sender = RaftTransport(1, {2: f"127.0.0.1:{peer_port}"}, lambda _: None, secret=SECRET)
    await sender.start()
    return sender


async def stop_both(sender: RaftTransport, receiver: Receiver) -> None:
    """Stop both transports; nothing of theirs may be left running."""
    await sender.stop()
    await receiver.transport.stop()
    await no_tasks_left()


async def no_tasks_left() -> None:
    current = asyncio.current_task()
    await wait_until(lambda: all(t is current or t.done() for t in asyncio.all_tasks()), 5, "tasks to end")


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_mixed_direct_and_queued_turns_keep_strict_order(loop_name: str) -> None:
    """Random bursts (0..5 messages a turn, some turns empty, some yielding to the sender mid-burst): every message
    arrives, once, in send order, and bursts still share envelopes."""

    async def main() -> None:
        rng = random.Random(211)
        receiver = Receiver(2, {1: "127.0.0.1:1"})
        port = await receiver.listen()
        sender = await connected_pair(port)
        sender.send("g", hb(0))
        await wait_until(lambda: sender.peer_connected(2), what="connection")
        seq = 1
        direct = 0
        for _ in range(3000):
            for _ in range(rng.choice([0, 1, 1, 2, 5])):
                before = sender.queued_messages(2)
                sender.send(f"g{seq % 7}", hb(seq))
                direct += before == 0 and sender.queued_messages(2) == 0
                seq += 1
            await asyncio.sleep(0)
        await wait_until(lambda: len(receiver.seqs) == seq, what=f"{seq} messages")
        assert receiver.seqs == list(range(seq))
        assert direct > 100  # the direct path really ran
        await stop_both(sender, receiver)

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_send_from_receive_callback_ping_pong_keeps_order(loop_name: str) -> None:
    """Each side answers from inside on_messages (direct writes while handling inbound frames), two answers per
    message so the second queues behind the first: both directions stay in order, nothing duplicated."""

    async def main() -> None:
        limit = 2000
        a_seen: list[int] = []
        b_transport: list[RaftTransport] = []

        def b_answer(_group: str, message: Message) -> None:
            s = seq_of(message)
            if s < limit:
                b_transport[0].send("pong", hb(2 * s, 2, 1))
                b_transport[0].send("pong", hb(2 * s + 1, 2, 1))

        b = Receiver(2, {1: "127.0.0.1:1"}, b_answer)
        b_port = await b.listen()
        a = Receiver(1, {2: f"127.0.0.1:{b_port}"})
        a_port = await a.listen()
        b.transport.set_peer_address(1, f"127.0.0.1:{a_port}")
        b_transport.append(b.transport)
        next_ping = [1]

        def a_answer(_group: str, message: Message) -> None:
            a_seen.append(seq_of(message))
            if seq_of(message) % 2 == 1 and next_ping[0] < limit:
                a.transport.send("ping", hb(next_ping[0], 1, 2))
                next_ping[0] += 1

        a.on_message = a_answer
        await a.transport.start()
        await b.transport.start()
        a.transport.send("ping", hb(0, 1, 2))
        await wait_until(lambda: len(a_seen) == 2 * limit, 30, "all pongs")
        assert b.seqs == list(range(limit))
        assert a_seen == list(range(2 * limit))
        await a.transport.stop()
        await b.transport.stop()
        await no_tasks_left()

    run(loop_name, main)


class RawPeer:
    """A receiver that does the handshake by hand, then reads nothing until told to: the sender's link pauses."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.reading = asyncio.Event()
        self.frames: list[pb.RaftEnvelope] = []
        self.accepted = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=1 << 16)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        nonce = wire.new_nonce()
        writer.write(wire.hello(nonce))
        proof = await reader.readexactly(wire.PROOF_BYTES)
        assert wire.check_proof(proof, SECRET, nonce)[1] == self.node_id
        writer.write(wire.KEEPALIVE)
        self.accepted.set()

        async def keepalive() -> None:
            while True:
                await asyncio.sleep(wire.KEEPALIVE_INTERVAL_S / 2)
                writer.write(wire.KEEPALIVE)

        ka = asyncio.create_task(keepalive())
        try:
            await self.reading.wait()
            while True:
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                self.frames.append(pb.RaftEnvelope.FromString(await reader.readexactly(length)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            ka.cancel()

    def seqs(self) -> list[int]:
        return [m.commit_offset for env in self.frames for m in env.messages]

    async def close(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_paused_link_bounds_direct_writes_then_drains_in_order(loop_name: str) -> None:
    """A peer that handshakes and never reads: one 64 KiB append a turn must stop at the write buffer's bound (the
    direct path never writes past a paused link), the queue stays within max_queue_bytes, and once the peer reads,
    what arrives is in order and without duplicates (drops allowed)."""

    async def main() -> None:
        peer = RawPeer(2)
        port = await peer.start()
        max_queue_bytes = 2 << 20
        sender = RaftTransport(1, {2: f"127.0.0.1:{port}"}, lambda _: None, secret=SECRET,
                               max_queue_bytes=max_queue_bytes)
        await sender.start()
        payload = batch_payload(64 << 10)
        sender.send("g", append(0, payload))
        await wait_until(lambda: sender.peer_connected(2) and peer.accepted.is_set(), what="handshake")
        link = sender._peers[2].link
        assert link is not None
        transport = link._transport
        assert transport is not None
        direct_writes = 0
        for seq in range(1, 600):  # ~38 MiB offered, far past socket buffers + WRITE_BUFFER_HIGH_BYTES
            paused_before, buffered_before = link.paused, transport.get_write_buffer_size()
            sender.send("g", append(seq, payload))
            grew_bytes = transport.get_write_buffer_size() - buffered_before
            if grew_bytes > 0:  # written on our stack: the direct path
                direct_writes += 1
                assert not paused_before, f"direct write of {grew_bytes} bytes past a paused link"
                assert buffered_before <= WRITE_BUFFER_HIGH_BYTES, buffered_before
                assert grew_bytes <= len(payload) + 1024, grew_bytes
            assert sender.queued_bytes(2) <= max_queue_bytes + len(payload) + 1024
            await asyncio.sleep(0)
        assert link.paused, "the link never paused: the test did not fill the buffers"
        assert direct_writes > 0
        assert transport.get_write_buffer_size() <= WRITE_BUFFER_HIGH_BYTES + (1 << 20) + len(payload) + 1024
        assert sender.dropped_messages.get(2, 0) > 0
        peer.reading.set()
        # While it drains, the link resumes and pauses again: sends keep coming one or two a turn, so direct writes
        # land between resume_writing and the sender task's next step, and appends queue behind heartbeats.
        for seq in range(600, 1200):
            sender.send("g", append(seq, payload) if seq % 3 else hb(seq))
            if seq % 5 == 0:
                sender.send("g", hb(seq + 1000))  # out of the main run: filtered out below
            await asyncio.sleep(0)
        last = 1200  # a heartbeat: appends past the queue's byte bound are dropped, this one is not
        sender.send("g", hb(last))
        await wait_until(lambda: bool(peer.seqs()) and peer.seqs()[-1] == last, 20, "the last append")
        all_seqs = peer.seqs()
        seqs = [s for s in all_seqs if s <= last]
        extras = [s for s in all_seqs if s > last]
        assert_strictly_increasing(seqs)
        assert_strictly_increasing(extras)
        assert len(seqs) > 100
        assert seqs[0] == 0
        await sender.stop()
        await peer.close()
        await no_tasks_left()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_receiver_killed_and_restarted_mid_stream_no_dup_no_reorder(loop_name: str) -> None:
    """The receiving transport is stopped and a new one listens on the same port, three times, while messages flow
    one or a few a turn: what arrives (across all incarnations) is strictly increasing."""

    async def main() -> None:
        rng = random.Random(7)
        first = Receiver(2, {1: "127.0.0.1:1"})
        port = await first.listen()
        receivers = [first]
        sender = await connected_pair(port)
        seq = 0
        for restart in range(3):
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:
                for _ in range(rng.choice([1, 1, 3])):
                    sender.send("g", hb(seq))
                    seq += 1
                await asyncio.sleep(0)
            await receivers[-1].transport.stop()
            for _ in range(50):  # sends while the peer is down
                sender.send("g", hb(seq))
                seq += 1
                await asyncio.sleep(0)
            receiver = Receiver(2, {1: "127.0.0.1:1"})
            await receiver.listen(port)
            receivers.append(receiver)
            await wait_until(lambda r=receiver: bool(r.seqs), 10, f"traffic after restart {restart}")
        final = seq - 1
        sender.send("g", hb(seq))
        await wait_until(lambda: bool(receivers[-1].seqs) and receivers[-1].seqs[-1] == seq, 10, "last message")
        everything = [s for r in receivers for s in r.seqs]
        assert_strictly_increasing(everything)
        assert everything[-1] == final + 1
        await sender.stop()
        for r in receivers:
            await r.transport.stop()
        await no_tasks_left()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_set_peer_address_sends_nothing_more_to_the_old_address(loop_name: str) -> None:
    """Mid-stream, with direct writes every turn, the peer is re-pointed (in the middle of a turn's burst): the old
    address never receives a message sent after the call, the new one gets them all in order."""

    async def main() -> None:
        old = Receiver(2, {1: "127.0.0.1:1"})
        old_port = await old.listen()
        new = Receiver(2, {1: "127.0.0.1:1"})
        new_port = await new.listen()
        sender = await connected_pair(old_port)
        sender.send("g", hb(0))
        await wait_until(lambda: old.seqs == [0], what="first message")
        seq = 1
        for _ in range(500):
            sender.send("g", hb(seq))
            sender.send("g", hb(seq + 1))
            seq += 2
            await asyncio.sleep(0)
        sender.send("g", hb(seq))  # direct to the old link: may or may not arrive
        first_after = seq + 1
        sender.set_peer_address(2, f"127.0.0.1:{new_port}")
        seq += 1
        for _ in range(500):
            sender.send("g", hb(seq))
            seq += 1
            await asyncio.sleep(0)
        await wait_until(lambda: bool(new.seqs) and new.seqs[-1] == seq - 1, what="the last message at the new port")
        assert all(s < first_after for s in old.seqs), [s for s in old.seqs if s >= first_after][:5]
        assert_strictly_increasing(old.seqs)
        assert_strictly_increasing(new.seqs)
        assert new.seqs[0] >= first_after - 1  # queued before the call: may follow the peer to its new address
        assert new.seqs[-(seq - first_after):] == list(range(first_after, seq))
        await sender.stop()
        await old.transport.stop()
        await new.transport.stop()
        await no_tasks_left()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_stop_while_sending_leaves_no_tasks_and_drops_later_sends(loop_name: str) -> None:
    """stop() runs while another task sends one message a turn (direct path) and a burst is queued: no task is left
    behind, sends after stop are counted as dropped and raise nothing, and what arrived is in order."""

    async def main() -> None:
        receiver = Receiver(2, {1: "127.0.0.1:1"})
        port = await receiver.listen()
        sender = await connected_pair(port)
        sender.send("g", hb(0))
        await wait_until(lambda: sender.peer_connected(2), what="connection")
        state = {"seq": 1, "stop": False}

        async def pump() -> None:
            while not state["stop"]:
                for _ in range(3):
                    sender.send("g", hb(state["seq"]))
                    state["seq"] += 1
                await asyncio.sleep(0)

        pumping = asyncio.create_task(pump())
        await wait_until(lambda: len(receiver.seqs) > 200, what="traffic")
        dropped_before = sender.dropped_messages.get(2, 0)
        await sender.stop()
        sent_at_stop = state["seq"]
        await wait_until(lambda: state["seq"] > sent_at_stop + 30, what="sends after stop")
        state["stop"] = True
        await pumping
        assert sender.dropped_messages.get(2, 0) - dropped_before >= state["seq"] - sent_at_stop
        assert_strictly_increasing(receiver.seqs)
        assert all(s < sent_at_stop for s in receiver.seqs)
        await receiver.transport.stop()
        await no_tasks_left()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_big_and_small_messages_interleaved_keep_order(loop_name: str) -> None:
    """Appends of 1-3 MiB real record batches (each larger than an envelope) mixed with heartbeats, some direct and
    some queued behind them: all arrive, decoded, once and in order."""

    async def main() -> None:
        rng = random.Random(3)
        receiver = Receiver(2, {1: "127.0.0.1:1"})
        port = await receiver.listen()
        sender = await connected_pair(port)
        payloads = [batch_payload(size) for size in (1 << 20, 2 << 20, 3 << 20, 100)]
        seq = 0
        for _ in range(60):
            for _ in range(rng.choice([1, 2, 3])):
                if rng.random() < 0.4:
                    sender.send("g", append(seq, rng.choice(payloads)))
                else:
                    sender.send("g", hb(seq))
                seq += 1
            await asyncio.sleep(0)
        await wait_until(lambda: len(receiver.seqs) >= seq, 20, f"{seq} messages")
        assert receiver.seqs == list(range(seq))
        assert sender.dropped_messages.get(2, 0) == 0
        await stop_both(sender, receiver)

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_oversized_append_never_raises_into_the_caller(loop_name: str) -> None:
    """send() "never blocks" and, before the direct path, never raised: an append too large for a frame (a topic with
    max.message.bytes above 64 MiB) must not blow up in the Raft code that called send_many, nor stop the
    messages after it (here: a heartbeat to the same peer) from being sent."""

    async def main() -> None:
        receiver = Receiver(2, {1: "127.0.0.1:1"})
        port = await receiver.listen()
        sender = await connected_pair(port)
        sender.send("g", hb(0))
        await wait_until(lambda: receiver.seqs == [0], what="connection")
        await asyncio.sleep(0)  # a new turn: the peer is idle, the next send takes the direct path
        huge = append(1, batch_payload(wire.MAX_FRAME_BYTES + (1 << 20)))
        raised: BaseException | None = None
        try:
            sender.send_many([("big", huge), ("g", hb(2))])
        except Exception as e:  # noqa: BLE001 - recorded, asserted below
            raised = e
        try:
            assert raised is None, f"send_many raised {raised!r}"
            await wait_until(lambda: 2 in receiver.seqs, what="the heartbeat after the oversized append")
        finally:
            await sender.stop()
            await receiver.transport.stop()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_repointed_twice_in_one_turn_then_back_never_splits_the_stream(loop_name: str) -> None:
    """Re-pointed A->B->C in one turn (the middle sender task is cancelled before it ever runs, so the last one does
    not wait for the first), then back to A while traffic flows: each address gets only what was sent while the peer
    pointed there (plus what was queued at the switch), each in order, nothing twice."""

    async def main() -> None:
        rs = [Receiver(2, {1: "127.0.0.1:1"}) for _ in range(3)]
        ports = [await r.listen() for r in rs]
        sender = await connected_pair(ports[0])
        sender.send("g", hb(0))
        await wait_until(lambda: rs[0].seqs == [0], what="first message")
        seq = 1
        for _ in range(200):
            sender.send("g", hb(seq))
            seq += 1
            await asyncio.sleep(0)
        switch_c = seq
        sender.set_peer_address(2, f"127.0.0.1:{ports[1]}")
        sender.set_peer_address(2, f"127.0.0.1:{ports[2]}")
        for _ in range(200):
            sender.send("g", hb(seq))
            seq += 1
            await asyncio.sleep(0)
        await wait_until(lambda: bool(rs[2].seqs) and rs[2].seqs[-1] == seq - 1, what="traffic at C")
        switch_a = seq
        sender.set_peer_address(2, f"127.0.0.1:{ports[0]}")
        for _ in range(200):
            sender.send("g", hb(seq))
            seq += 1
            await asyncio.sleep(0)
        await wait_until(lambda: rs[0].seqs[-1] == seq - 1, what="traffic back at A")
        assert rs[1].seqs == []
        assert all(s < switch_c or s >= switch_a - 1 for s in rs[0].seqs)
        assert all(switch_c - 1 <= s < switch_a for s in rs[2].seqs)
        everything = sorted(s for r in rs for s in r.seqs)
        assert len(everything) == len(set(everything))
        for r in rs:
            assert_strictly_increasing(r.seqs)
        await sender.stop()
        for r in rs:
            await r.transport.stop()
        await no_tasks_left()

    run(loop_name, main)
