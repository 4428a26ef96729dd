"""The broker's data port: Produce, Fetch and ListOffsets served in the event loop from plain TCP frames.

The bytes are documented in logbroker_client/data_wire.py. The handlers are the gRPC service's own
(BrokerService, timed under protocol="data"), given a small call context in place of gRPC's: the same
request reaches the same code and gets the same answer on either port. What this module adds is the
framing and the limits: the HELLO deadline, the frame size, the requests in flight per connection, the
idle timeout, and how many connections one broker holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError
from logbroker_client import data_wire as wire
from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.cluster.tasks import cancel_and_wait
from logbroker.cluster.transport import LogLimiter
from logbroker.server.quotas import CLIENT_ID_METADATA_KEY

log = logging.getLogger("logbroker.data_port")

# Connections one broker holds on its data port; past it a new one is closed at once (and logged).
MAX_CONNECTIONS = 4096
# Connections from one client address: a quarter of the whole, so one host (a runaway client, a connection
# leak) cannot take every slot and push all others back onto gRPC.
MAX_CONNECTIONS_PER_HOST = 1024
IDLE_SWEEP_INTERVAL_S = 5.0
EOF_CANCEL = "client EOF"  # the cancel message of a Fetch cut short by the client's EOF (answered CANCELLED)

Handler = Callable[[Any, Any], Awaitable[Any]]


class DataCallAborted(Exception):
    """A handler refused the call as a whole (gRPC's context.abort): the status and text answered."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class DataCallContext:
    """What the service's handlers ask of a gRPC call context, for a call that came on the data port."""

    __slots__ = ("_metadata", "_peer", "_code")

    def __init__(self, metadata: tuple[tuple[str, str], ...], peer: str) -> None:
        self._metadata = metadata
        self._peer = peer
        self._code: grpc.StatusCode | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def code(self) -> grpc.StatusCode | None:
        return self._code

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code = code
        raise DataCallAborted(code, details)


def status_byte(code: grpc.StatusCode) -> int:
    return int(code.value[0])


class DataPort:
    """The listening socket and every connection on it."""

    def __init__(self, service: Any, max_request_bytes: int, framing_bytes: int) -> None:
        self.handlers: dict[int, tuple[type[Any], Handler]] = {
            wire.Method.PRODUCE: (pb.ProduceRequest, service.Produce),
            wire.Method.FETCH: (pb.FetchRequest, service.Fetch),
            wire.Method.LIST_OFFSETS: (pb.ListOffsetsRequest, service.ListOffsets),
        }
        self.max_frame_bytes = max_request_bytes + framing_bytes
        self.connections: set[DataConnection] = set()
        self.connections_per_host: dict[str, int] = {}
        self.refusals = LogLimiter()
        self.refused_count = 0
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def listen(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: DataConnection(self), host, port, backlog=1024)
        except OSError as exc:
            raise OSError(f"cannot listen for clients' data connections on {host}:{port}: {exc.strerror} (set "
                          f"--data-listen HOST:PORT to another port, or --data-listen off)") from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._sweeper = loop.create_task(self._close_idle_forever())
        return self.port

    def admit(self, connection: DataConnection) -> bool:
        """Count a new connection in, or refuse it (logged) when the broker or its client's host is at the limit."""
        host = connection.host
        from_host = self.connections_per_host.get(host, 0)
        if len(self.connections) >= MAX_CONNECTIONS:
            self.refuse("connections", "refused a connection from %s: %d connections already open (the limit); "
                        "clients should share connections", connection.peer, MAX_CONNECTIONS)
            return False
        if from_host >= MAX_CONNECTIONS_PER_HOST:
            self.refuse("host-connections", "refused a connection from %s: %d connections from host %s already "
                        "open (the limit for one host); look for a client there that opens a connection per "
                        "request or never closes them", connection.peer, MAX_CONNECTIONS_PER_HOST, host)
            return False
        self.connections.add(connection)
        self.connections_per_host[host] = from_host + 1
        return True

    def release(self, connection: DataConnection) -> None:
        if connection not in self.connections:
            return  # refused at admission: never counted
        self.connections.discard(connection)
        left = self.connections_per_host[connection.host] - 1
        if left:
            self.connections_per_host[connection.host] = left
        else:
            del self.connections_per_host[connection.host]

    def refuse(self, kind: str, text: str, *args: object) -> None:
        """Log why a connection was closed, at most once a second per kind."""
        self.refused_count += 1
        if self.refusals.allows(kind, self.refused_count):
            log.warning("data port: " + text, *args)

    async def _close_idle_forever(self) -> None:
        while True:
            await asyncio.sleep(IDLE_SWEEP_INTERVAL_S)
            now_s = time.monotonic()
            for connection in list(self.connections):
                connection.close_if_idle(now_s)

    async def stop(self, grace_s: float) -> None:
        """No new connections or requests; the calls being served get grace_s to answer, then every connection
        closes."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            await cancel_and_wait(self._sweeper)
        for connection in self.connections:
            connection.stop_reading()
        pending = [task for connection in self.connections for task in connection.tasks]
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
        for connection in list(self.connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()


class DataConnection(asyncio.Protocol):
    """One client's connection: HELLO first, then request frames, each served by a task of its own."""

    def __init__(self, port: DataPort) -> None:
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.context: DataCallContext | None = None  # set by the HELLO
        self.tasks: set[asyncio.Task[None]] = set()
        self.fetches: set[asyncio.Task[None]] = set()  # the tasks of Fetch requests, cut short at EOF
        self.peer = "?"
        self.host = "?"
        self.last_active_s = time.monotonic()
        self._reading_paused = False
        self._writing_paused = False
        self._writable = asyncio.Event()  # cleared while the transport's buffer is over its high-water mark
        self._writable.set()
        self._eof = False  # the client closed its sending side: answer what is in flight, then close
        self._stopped = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.partial_frame_since_s: float | None = None  # when the unfinished frame in the buffer began

    # ------------------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport's
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.host = peer[0] if isinstance(peer, tuple) else str(peer)
        if not self.port.admit(self):
            self.transport.abort()
            return
        self._handshake_timer = asyncio.get_running_loop().call_later(wire.HANDSHAKE_TIMEOUT_S, self._no_hello)

    def connection_lost(self, exc: Exception | None) -> None:
        self.port.release(self)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        for task in self.tasks:  # the client is gone: nobody reads what these would answer
            task.cancel()

    def pause_writing(self) -> None:
        """Answers pile up unread: take no new requests, and hold the ones not yet served, until they drain
        (what one connection buffers is then bounded by the answers already being built)."""
        self._writing_paused = True
        self._writable.clear()
        self._pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._writable.set()
        self._maybe_resume_reading()

    def eof_received(self) -> bool:
        """The client will send nothing more: answer the requests in flight (an acks=all produce that lands
        must be answered), then close. True keeps the transport open for those answers.

        Fetches in flight are answered CANCELLED at once: a client closing its connection (a consumer's
        close() abandons its long polls) sends the same EOF as one that only half-closes, and a long poll
        held for it would keep the connection, a task and the broker's stop waiting up to max_wait_ms."""
        self._eof = True
        for task in self.fetches:
            task.cancel(EOF_CANCEL)
        return bool(self.tasks)  # none in flight: every whole frame was served (reading was not paused)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.last_active_s = time.monotonic()
        if self.context is None and not self._read_hello():
            return
        self._read_requests()

    # ------------------------------------------------------------------------------ reading

    def _read_hello(self) -> bool:
        buffer = self.buffer
        if len(buffer) < wire.HELLO_HEAD_BYTES:
            return False
        try:
            id_bytes = wire.hello_length(bytes(buffer[:wire.HELLO_HEAD_BYTES]))
        except wire.WireError as exc:
            self._refuse("hello", "closed a connection from %s: %s", str(exc))
            return False
        end = wire.HELLO_HEAD_BYTES + id_bytes
        if len(buffer) < end:
            return False
        client_id = bytes(buffer[wire.HELLO_HEAD_BYTES:end]).decode(errors="replace")
        del buffer[:end]
        self.context = DataCallContext(((CLIENT_ID_METADATA_KEY, client_id),), self.peer)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._write(wire.encode_welcome(self.port.max_frame_bytes))
        return True

    def _read_requests(self) -> None:
        buffer = self.buffer
        head = wire.FRAME_HEAD
        start = 0
        available = len(buffer)
        while available - start >= head.size and not self._stopped and not self._reading_paused:
            length, correlation_id, method = head.unpack_from(buffer, start)
            if length > self.port.max_frame_bytes:
                self._answer_error(correlation_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"a request of {length} bytes is larger than max {self.port.max_frame_bytes} "
                                   "(the broker's max_request_bytes plus framing); the connection is closed")
                self._refuse("frame", "closed the connection from %s: %s", f"a {length}-byte request frame")
                return
            if length < wire.HEAD_AFTER_LENGTH_BYTES:
                self._refuse("frame", "closed the connection from %s: %s", f"a frame of length {length}")
                return
            end = start + 4 + length
            if end > available:
                break
            self._start(correlation_id, method, bytes(buffer[start + head.size:end]))
            start = end
        if start:
            del buffer[:start]
        if not buffer or self._reading_paused:  # paused: the rest of a frame waits on the broker, not the client
            self.partial_frame_since_s = None
        elif self.partial_frame_since_s is None or start:
            self.partial_frame_since_s = time.monotonic()

    def _start(self, correlation_id: int, method: int, body: bytes) -> None:
        handler = self.port.handlers.get(method)
        if handler is None:
            self._answer_error(correlation_id, grpc.StatusCode.UNIMPLEMENTED,
                               f"method {method} is not served on the data port (Produce 1, Fetch 2, ListOffsets 3)")
            return
        request_type, serve = handler
        try:
            request = request_type.FromString(body)
        except DecodeError as exc:
            self._answer_error(correlation_id, grpc.StatusCode.INVALID_ARGUMENT,
                               f"the {request_type.__name__} does not parse: {exc}")
            return
        task = asyncio.get_running_loop().create_task(self._serve(correlation_id, serve, request))
        self.tasks.add(task)
        if method == wire.Method.FETCH:
            self.fetches.add(task)
        if len(self.tasks) >= wire.MAX_IN_FLIGHT_PER_CONNECTION:
            self._pause_reading()

    async def _serve(self, correlation_id: int, serve: Handler, request: Any) -> None:
        assert self.context is not None
        context = DataCallContext(self.context.invocation_metadata(), self.peer)
        try:
            if not self._writable.is_set():
                await self._writable.wait()
            response = await serve(request, context)
        except DataCallAborted as refused:
            self._answer_error(correlation_id, refused.code, refused.details)
        except asyncio.CancelledError as cancelled:
            if cancelled.args != (EOF_CANCEL,):
                raise  # the connection is gone or the broker stops: nothing to answer
            self._answer_error(correlation_id, grpc.StatusCode.CANCELLED, "the client closed its side of the "
                               "connection: a fetch is not held open for it (fetch again on a new connection)")
        except Exception as exc:
            log.exception("data port: %s from %s failed", type(request).__name__, self.peer)
            self._answer_error(correlation_id, grpc.StatusCode.INTERNAL, f"the broker failed the call: {exc}")
        else:
            body = response.SerializeToString()
            if len(body) < wire.JOIN_ANSWER_BELOW_BYTES:
                self._write(wire.encode_frame(correlation_id, 0, body))
            elif self.transport is not None and not self.transport.is_closing():
                self.transport.writelines([wire.frame_head(correlation_id, 0, len(body)), body])
        finally:
            self.tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            self.fetches.discard(asyncio.current_task())  # type: ignore[arg-type]
            self.last_active_s = time.monotonic()
            self._maybe_resume_reading()  # with frames buffered while paused, this may start more
            if self._eof and not self.tasks:
                self.close()

    # ------------------------------------------------------------------------------ writing and closing

    def _answer_error(self, correlation_id: int, code: grpc.StatusCode, details: str) -> None:
        self._write(wire.encode_frame(correlation_id, status_byte(code), details.encode()))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _refuse(self, kind: str, text: str, reason: str) -> None:
        self.port.refuse(kind, text, self.peer, reason)
        self.close()

    def _no_hello(self) -> None:
        self._refuse("hello", "closed a connection from %s: %s",
                     f"no HELLO within {wire.HANDSHAKE_TIMEOUT_S:.0f} s (is it a logbroker client?)")

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = True
            self.transport.pause_reading()

    def _maybe_resume_reading(self) -> None:
        if (self._reading_paused and not self._writing_paused and not self._stopped
                and len(self.tasks) < wire.MAX_IN_FLIGHT_PER_CONNECTION // 2
                and self.transport is not None and not self.transport.is_closing()):
            self._reading_paused = False
            self.transport.resume_reading()
            self._read_requests()  # whole frames that arrived before the pause

    def stop_reading(self) -> None:
        self._stopped = True
        self._pause_reading()

    def close_if_idle(self, now_s: float) -> None:
        if (self.partial_frame_since_s is not None and not self._reading_paused
                and now_s - self.partial_frame_since_s >= wire.FRAME_DEADLINE_S):
            self._refuse("frame", "closed the connection from %s: %s",
                         f"a request frame left unfinished for {wire.FRAME_DEADLINE_S:.0f} s")
            return
        if not self.tasks and now_s - self.last_active_s >= wire.IDLE_TIMEOUT_S:
            log.info("data port: closed the connection from %s, idle for %.0f s", self.peer, wire.IDLE_TIMEOUT_S)
            self.close()

    def close(self) -> None:
        self._stopped = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # writes what is buffered (an error answer), then closes
