"""`logbroker serve` with a timeline of one topic's produce path, for benchmarks.latency_breakdown only.

    python -m benchmarks.traced_broker --trace-file PATH --trace-topic TOPIC serve --node-id 1 ...

Before it hands over to the broker's own command line (logbroker.server.cli), this module wraps a few methods
of the production classes (BrokerService.Produce, Replica, RaftTransport) so that each records when it ran
for the traced topic. Production code has no tracing hooks and pays nothing for this one: it exists only in
processes started through this module. The wrapped methods are private and may change; the wrappers then need
to follow (the latency benchmark's smoke test fails if a stage goes missing).

Each event is one line `<ns> <event> <peer> <first_offset> <last_offset>`: the time from time.monotonic_ns()
(CLOCK_MONOTONIC on Linux: one clock for every process of the host, and no NTP steps, so the events of the
brokers and of the client line up), what happened, the other node involved (0 when none), and the log
offsets it concerns (for an acknowledgement both are the follower's match offset). The broker writes its
events to --trace-file when it receives SIGUSR1 (and once more as it exits), through a temporary file
renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

from logbroker.cluster import replica as replica_module
from logbroker.cluster import transport as transport_module
from logbroker.raft.types import Entry, Message, MessageType, Ready
from logbroker.server import service as service_module

Event = tuple[int, str, int, int, int]  # ns, event, peer node, first offset, last offset


class Trace:
    """The events of one broker process, for one topic's Raft groups."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.group_prefix = f"{topic}-"  # groups are "<topic>-<partition>@<topic id>"
        self.events: list[Event] = []  # list.append is atomic: pool threads append too, without a lock
        self.received_at_ns = 0  # when the envelope being decoded arrived (set and read on the event loop)
        self.streaming: dict[int, list[tuple[str, int, int, int]]] = {}  # id(envelope) -> events it carries

    def traced(self, group: str) -> bool:
        return group.startswith(self.group_prefix) and group[len(self.group_prefix):].split("@")[0].isdigit()

    def add(self, event: str, peer: int = 0, first: int = -1, last: int = -1, at_ns: int | None = None) -> None:
        self.events.append((time.monotonic_ns() if at_ns is None else at_ns, event, peer, first, last))

    def write(self, path: Path) -> None:
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "w") as out:
            out.writelines(f"{ns} {event} {peer} {first} {last}\n" for ns, event, peer, first, last in self.events)
        os.replace(temporary, path)


def span(entries: Sequence[Entry]) -> tuple[int, int]:
    return entries[0].base_offset, entries[-1].last_offset


def message_event(message: Message, prefix: str) -> tuple[str, int, int, int] | None:
    """The event a traced message stands for: an append that carries entries, or a successful acknowledgement
    (heartbeats, empty appends and rejections are left out)."""
    if message.type is MessageType.APPEND and message.entries:
        first, last = span(message.entries)
        return f"{prefix}_append", message.to_node if prefix == "streamed" else message.from_node, first, last
    if message.type is MessageType.APPEND_RESP and not message.reject:
        peer = message.to_node if prefix == "streamed" else message.from_node
        return f"{prefix}_ack", peer, message.match_offset, message.match_offset
    return None


def install(trace: Trace) -> None:
    """Wrap the production methods whose moments make up a produce request's timeline."""
    wrap_produce(trace)
    wrap_replica(trace)
    wrap_transport(trace)


def wrap_produce(trace: Trace) -> None:
    service = service_module.BrokerService
    produce: Callable[..., Coroutine[Any, Any, Any]] = service.Produce

    @functools.wraps(produce)
    async def traced_produce(self: Any, request: Any, context: Any) -> Any:
        arrived_ns = time.monotonic_ns()
        response = await produce(self, request, context)
        for result in response.results:
            # The offsets are known once answered: the arrival is recorded then, with its own time.
            if result.topic == trace.topic and result.error_code == 0:
                last = result.base_offset + max(0, len(result.batch_base_offsets) - 1)
                trace.add("produce_arrived", 0, result.base_offset, last, at_ns=arrived_ns)
                trace.add("produce_answered", 0, result.base_offset, last)
        return response

    setattr(service, "Produce", traced_produce)  # noqa: B010 (a method, replaced on purpose)


def wrap_replica(trace: Trace) -> None:
    replica = replica_module.Replica
    propose, handle, send = replica.propose, replica._handle, replica._send
    persist, write_and_fsync = replica._persist, replica._write_and_fsync
    write_then_sync, end_flush = replica._write_then_sync, replica._end_flush
    step, apply = replica.step, replica._apply
    persisting: dict[int, tuple[int, int]] = {}  # id(replica) -> offsets its pool trip writes (one at a time)

    def traced_propose(self: Any, payloads: Any) -> Any:
        entries = propose(self, payloads)
        if entries and trace.traced(self.group):
            trace.add("proposed", 0, *span(entries))
        return entries

    async def traced_handle(self: Any, ready: Ready) -> None:
        if ready.entries and trace.traced(self.group):
            trace.add("ready", 0, *span(ready.entries))
        await handle(self, ready)

    def traced_send(self: Any, messages: Sequence[Message]) -> None:
        if trace.traced(self.group):
            for message in messages:
                if message.type is MessageType.APPEND and message.entries:
                    trace.add("appends_to_transport", 0, *span(message.entries))
                    break  # one event for the appends to every follower, handed over together
            for message in messages:
                if message.type is MessageType.APPEND_RESP and not message.reject:
                    trace.add("ack_sent", message.to_node, message.match_offset, message.match_offset)
        send(self, messages)

    async def traced_persist(self: Any, ready: Ready) -> None:
        if not (ready.entries and trace.traced(self.group)):
            await persist(self, ready)
            return
        offsets = span(ready.entries)
        trace.add("persist_start", 0, *offsets)
        persisting[id(self)] = offsets
        try:
            await persist(self, ready)
        finally:
            persisting.pop(id(self), None)
        trace.add("persist_end", 0, *offsets)

    def traced_write_and_fsync(self: Any, data: Any, timestamp_ms: int, state: Any) -> None:
        offsets = persisting.get(id(self))  # read in the pool thread; set before the trip, removed after it
        if offsets is not None:
            trace.add("write_start", 0, *offsets)
        write_and_fsync(self, data, timestamp_ms, state)
        if offsets is not None:
            trace.add("fsync_end", 0, *offsets)

    async def traced_write_then_sync(self: Any, data: Any, timestamp_ms: int) -> None:
        # The same two stages when a small append is written on the loop and fsynced by the native threads.
        offsets = persisting.get(id(self))
        if offsets is not None:
            trace.add("write_start", 0, *offsets)
        await write_then_sync(self, data, timestamp_ms)

    def traced_end_flush(self: Any, pending: Any, error: Any) -> None:
        offsets = persisting.get(id(self))
        if offsets is not None:
            trace.add("fsync_end", 0, *offsets)
        end_flush(self, pending, error)

    def traced_step(self: Any, message: Message, kick: bool = True) -> None:
        if trace.traced(self.group):
            event = message_event(message, "stepped")
            if event is not None:
                trace.add(*event)
        step(self, message, kick)

    def traced_apply(self: Any, entries: Sequence[Entry]) -> None:
        if trace.traced(self.group):
            trace.add("applied", 0, *span(entries))
        apply(self, entries)

    for name, wrapper in (("propose", traced_propose), ("_handle", traced_handle), ("_send", traced_send),
                          ("_persist", traced_persist), ("_write_and_fsync", traced_write_and_fsync),
                          ("_write_then_sync", traced_write_then_sync), ("_end_flush", traced_end_flush),
                          ("step", traced_step), ("_apply", traced_apply)):
        setattr(replica, name, functools.wraps(getattr(replica, name))(wrapper))


def wrap_transport(trace: Trace) -> None:
    transport = transport_module.RaftTransport
    receive, deliver = transport._receive, transport._deliver
    encode_into, envelopes = transport._encode_into, transport._envelopes

    def traced_receive(self: Any, envelope: Any, remote: str, proven_from: int) -> None:
        trace.received_at_ns = time.monotonic_ns()  # before decoding: the decode is part of the hop
        receive(self, envelope, remote, proven_from)

    def traced_deliver(self: Any, messages: list[tuple[str, Message]], from_node: int) -> None:
        for group, message in messages:
            event = message_event(message, "received") if trace.traced(group) else None
            if event is not None:
                trace.add(*event, at_ns=trace.received_at_ns)
        deliver(self, messages, from_node)

    def traced_encode_into(self: Any, envelope: Any, peer: Any, group: str, message: Message) -> bool:
        encoded = bool(encode_into(self, envelope, peer, group, message))
        event = message_event(message, "streamed") if encoded and trace.traced(group) else None
        if event is not None:
            trace.streaming.setdefault(id(envelope), []).append(event)
        return encoded

    def traced_envelopes(self: Any, peer: Any) -> Iterator[Any]:
        for envelope in envelopes(self, peer):
            carried = trace.streaming.pop(id(envelope), ())
            at_ns = time.monotonic_ns()  # the envelope is written to the peer's socket right after this
            for event in carried:
                trace.add(*event, at_ns=at_ns)
            yield envelope

    for name, wrapper in (("_receive", traced_receive), ("_deliver", traced_deliver),
                          ("_encode_into", traced_encode_into), ("_envelopes", traced_envelopes)):
        setattr(transport, name, functools.wraps(getattr(transport, name))(wrapper))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.traced_broker", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)  # the broker's own options pass through untouched
    parser.add_argument("--trace-file", type=Path, required=True, help="where SIGUSR1 (and exit) write the events")
    parser.add_argument("--trace-topic", required=True, help="the topic whose partitions are traced")
    args, broker_argv = parser.parse_known_args(argv)
    trace = Trace(args.trace_topic)
    install(trace)
    signal.signal(signal.SIGUSR1, lambda signum, frame: trace.write(args.trace_file))

    from logbroker.server.cli import main as broker_main

    try:
        return broker_main(broker_argv)
    finally:
        trace.write(args.trace_file)


if __name__ == "__main__":
    sys.exit(main())
