"""Connections to one broker's data port (data_wire.py): DataChannel for the threaded clients, AsyncDataChannel
for the asyncio ones.

Callers write request frames under a lock from any thread; one reader thread per connection reads the
answers, matches them to their requests by correlation id and runs each request's callback. A request not
answered by its deadline is failed with RequestTimedOutError by the reader (its late answer is dropped).
When the connection breaks, every request in flight fails with BrokerUnavailableError, as a gRPC call to a
broker that went away does; the next request opens a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import grpc

from logbroker_client import data_wire as wire
from logbroker_client.connection import translate_status
from logbroker_client.errors import BrokerUnavailableError, InvalidRequestError, LogbrokerError, RequestTimedOutError

log = logging.getLogger("logbroker_client.data_channel")

CONNECT_TIMEOUT_S = 2.0
READ_CHUNK_BYTES = 256 * 1024
IDLE_POLL_S = 1.0  # how long the reader waits on an idle connection before looking at deadlines again

# A callback gets the answer (a protobuf message) or the error, never both; it runs in the reader thread (or in
# the caller's thread when the request cannot be written), so it must be short and must not block on this channel.
AnswerCallback = Callable[[Any, LogbrokerError | None], None]


class DataChannel:
    """One TCP connection to a broker's data port, shared by every thread of a client."""

    def __init__(self, address: str, data_address: tuple[str, int], client_id: str,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connects and exchanges HELLO / WELCOME; raises BrokerUnavailableError (with the reason) if it cannot."""
        self.address = address  # the broker's gRPC address: what errors and the metadata name it by
        self.data_address = data_address
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _pending, _next_id and closed
        self._pending: dict[int, tuple[float, type[Any], AnswerCallback]] = {}
        self._next_id = 0
        self.closed = False
        self._sock = self._connect(client_id, connect_timeout_s)
        self._reader = threading.Thread(target=self._read_forever, name=f"logbroker-data-{address}", daemon=True)
        self._reader.start()

    def _connect(self, client_id: str, timeout_s: float) -> socket.socket:
        host, port = self.data_address
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as exc:
            raise BrokerUnavailableError(f"cannot reach the data port {host}:{port} of the broker at "
                                         f"{self.address} ({exc.strerror or exc})") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(wire.encode_hello(client_id))
            self.max_frame_bytes = wire.decode_welcome(_read_exactly(sock, wire.WELCOME.size))
        except (OSError, wire.WireError) as exc:
            sock.close()
            raise BrokerUnavailableError(f"the data port {host}:{port} of the broker at {self.address} did not "
                                         f"answer as one ({exc})") from None
        sock.settimeout(None)
        return sock

    def call(self, method: wire.Method, request: Any, response_type: type[Any], timeout_s: float,
             on_done: AnswerCallback) -> int:
        """Send a request; on_done(answer, None) or on_done(None, error) runs once, whatever happens (unless the
        request is forgotten first). Returns the request's correlation id (0: it failed before it was sent)."""
        body = request.SerializeToString()
        if len(body) + wire.HEAD_AFTER_LENGTH_BYTES > self.max_frame_bytes:
            on_done(None, InvalidRequestError(
                f"broker at {self.address} takes requests of at most {self.max_frame_bytes} bytes, this one is "
                f"{len(body)}: keep the client's max_request_bytes at or below the broker's max_request_bytes"))
            return 0
        with self._lock:
            if self.closed:
                error: LogbrokerError | None = BrokerUnavailableError(
                    f"the connection to the data port of the broker at {self.address} is closed")
            else:
                error = None
                self._next_id = correlation_id = self._next_id % wire.MAX_CORRELATION_ID + 1  # never 0
                self._pending[correlation_id] = (time.monotonic() + timeout_s, response_type, on_done)
        if error is not None:
            on_done(None, error)
            return 0
        try:
            with self._write_lock:
                # A broker that stops reading (frozen, or pushing back) must not hold the caller past its timeout;
                # a frame written in part leaves the connection unusable, so a timeout closes it.
                self._sock.settimeout(timeout_s)
                self._sock.sendall(wire.encode_frame(correlation_id, method, body))
        except TimeoutError:
            self._fail_all(f"a request could not be written within {timeout_s:g} s: the broker is not reading")
        except OSError as exc:
            self._fail_all(f"writing to it failed ({exc.strerror or exc})")
        return correlation_id

    def forget(self, correlation_id: int) -> None:
        """Nobody waits for that request's answer any more: drop it when it comes (the broker still serves it)."""
        with self._lock:
            self._pending.pop(correlation_id, None)

    def future(self, method: wire.Method, request: Any, response_type: type[Any], timeout_s: float) -> DataFuture:
        """Send a request; the future's result() waits for the answer (as a gRPC call's future does)."""
        future = DataFuture(self)
        future.correlation_id = self.call(method, request, response_type, timeout_s, future.set)
        return future

    def close(self) -> None:
        self._fail_all("the client closed it")

    # ------------------------------------------------------------------------------ reader thread

    def _read_forever(self) -> None:
        buffer = bytearray()
        sock = self._sock
        try:
            while not self.closed:
                readable, _, _ = select.select([sock], [], [], self._expire_overdue())
                if not readable:
                    continue
                chunk = sock.recv(READ_CHUNK_BYTES)
                if not chunk:
                    self._fail_all("the broker closed the connection")
                    return
                buffer += chunk
                self._take_answers(buffer)
        except (OSError, ValueError) as exc:  # ValueError: select() on a socket closed by close()
            self._fail_all(f"reading from it failed ({exc})")

    def _take_answers(self, buffer: bytearray) -> None:
        try:
            frames = wire.take_frames(buffer)
        except wire.WireError as exc:
            self._fail_all(f"it sent {exc}")
            return
        for correlation_id, status, body in frames:
            with self._lock:
                pending = self._pending.pop(correlation_id, None)
            if pending is not None:
                pending[2](*decode_answer(pending[1], status, body, self.address))

    def _expire_overdue(self) -> float:
        """Fail the requests past their deadline; how long until the next one is due (at most IDLE_POLL_S)."""
        now = time.monotonic()
        overdue = []
        next_due = now + IDLE_POLL_S
        with self._lock:
            for correlation_id, (deadline, _, on_done) in list(self._pending.items()):
                if deadline <= now:
                    overdue.append(on_done)
                    del self._pending[correlation_id]
                else:
                    next_due = min(next_due, deadline)
        for on_done in overdue:
            on_done(None, RequestTimedOutError(f"broker at {self.address} did not answer in time"))
        return max(0.0, next_due - now)

    def _fail_all(self, why: str) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            pending = list(self._pending.values())
            self._pending.clear()
        with contextlib.suppress(OSError):  # already reset by the other end
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if pending:
            log.info("data port %s:%d of %s: %s; %d request(s) in flight failed", *self.data_address, self.address,
                     why, len(pending))
        error = BrokerUnavailableError(f"cannot reach the broker at {self.address} (its data port: {why})")
        for _, _, on_done in pending:
            on_done(None, error)


class DataFuture:
    """The answer to one request, for a thread that waits for it."""

    __slots__ = ("_channel", "correlation_id", "_done", "_response", "_error", "_callbacks")

    def __init__(self, channel: DataChannel) -> None:
        self._channel = channel
        self.correlation_id = 0
        self._done = threading.Event()
        self._response: Any = None
        self._error: LogbrokerError | None = None
        self._callbacks: list[Callable[[DataFuture], Any]] = []

    def set(self, response: Any, error: LogbrokerError | None) -> None:
        self._response, self._error = response, error
        self._done.set()
        for callback in self._callbacks:
            callback(self)

    def add_done_callback(self, callback: Callable[[DataFuture], Any]) -> None:
        """Run callback(future) once it is done (at once if it is; possibly twice in a race, so it must be
        idempotent, as setting an Event is)."""
        self._callbacks.append(callback)
        if self._done.is_set():
            callback(self)

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> bool:
        """Stop waiting: result() raises at once; the answer, if it comes, is dropped."""
        if self._done.is_set():
            return False
        self._channel.forget(self.correlation_id)
        self.set(None, LogbrokerError(f"the request to {self._channel.address} was cancelled"))
        return True

    def result(self, timeout: float | None = None) -> Any:
        """The answer; raises its LogbrokerError, or grpc.FutureTimeoutError if it has not come within timeout
        (as a gRPC future does, so callers wait on either alike)."""
        if not self._done.wait(timeout):
            raise grpc.FutureTimeoutError()
        if self._error is not None:
            raise self._error
        return self._response


def decode_answer(response_type: type[Any], status: int, body: bytes, address: str
                  ) -> tuple[Any, LogbrokerError | None]:
    """An ANSWER frame's (response, None), or (None, the error it stands for)."""
    if status != 0:
        return None, translate_status(_status_code(status), body.decode(errors="replace"), address)
    try:
        return response_type.FromString(body), None
    except Exception as exc:
        return None, LogbrokerError(f"broker at {address} sent an answer that does not parse: {exc}")


def _status_code(status: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == status:
            return code
    return grpc.StatusCode.UNKNOWN


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise OSError("the connection closed during the handshake")
        data += chunk
    return bytes(data)


class AsyncDataChannel(asyncio.Protocol):
    """One connection to a broker's data port for the asyncio clients: requests are written from the event
    loop and answers complete their futures as they arrive (the same frames as DataChannel)."""

    def __init__(self, address: str, data_address: tuple[str, int]) -> None:
        self.address = address
        self.data_address = data_address
        self.closed = False
        self.max_frame_bytes = 0
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._welcomed: asyncio.Future[None] | None = None
        self._pending: dict[int, tuple[asyncio.Future[Any], type[Any]]] = {}
        self._next_id = 0

    @classmethod
    async def open(cls, address: str, data_address: tuple[str, int], client_id: str,
                   connect_timeout_s: float = CONNECT_TIMEOUT_S) -> AsyncDataChannel:
        """Connects and exchanges HELLO / WELCOME; raises BrokerUnavailableError (with the reason) if it cannot."""
        loop = asyncio.get_running_loop()
        channel = cls(address, data_address)
        channel._welcomed = loop.create_future()
        host, port = data_address
        try:
            async with asyncio.timeout(connect_timeout_s):
                await loop.create_connection(lambda: channel, host, port)
                assert channel._transport is not None
                channel._transport.write(wire.encode_hello(client_id))
                await channel._welcomed
        except (OSError, TimeoutError, wire.WireError) as exc:
            channel.close()
            reason = "no answer in time" if isinstance(exc, TimeoutError) else getattr(exc, "strerror", None) or exc
            raise BrokerUnavailableError(f"cannot use the data port {host}:{port} of the broker at {address} "
                                         f"({reason})") from None
        return channel

    async def call(self, method: wire.Method, request: Any, response_type: type[Any], timeout_s: float) -> Any:
        """The answer to one request; raises the LogbrokerError it failed with."""
        body = request.SerializeToString()
        if len(body) + wire.HEAD_AFTER_LENGTH_BYTES > self.max_frame_bytes:
            raise InvalidRequestError(
                f"broker at {self.address} takes requests of at most {self.max_frame_bytes} bytes, this one is "
                f"{len(body)}: keep the client's max_request_bytes at or below the broker's max_request_bytes")
        if self.closed or self._transport is None:
            raise BrokerUnavailableError(f"the connection to the data port of the broker at {self.address} is closed")
        self._next_id = correlation_id = self._next_id % wire.MAX_CORRELATION_ID + 1
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = (answer, response_type)
        self._transport.write(wire.encode_frame(correlation_id, method, body))
        try:
            async with asyncio.timeout(timeout_s):
                return await answer
        except TimeoutError:
            raise RequestTimedOutError(f"broker at {self.address} did not answer in time") from None
        finally:
            self._pending.pop(correlation_id, None)

    def close(self) -> None:
        self._fail_all("the client closed it")

    # ------------------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all("the broker closed the connection" if exc is None else f"the connection failed ({exc})")

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._welcomed is not None and not self._welcomed.done():
            if len(self._buffer) < wire.WELCOME.size:
                return
            try:
                self.max_frame_bytes = wire.decode_welcome(bytes(self._buffer[:wire.WELCOME.size]))
            except wire.WireError as exc:
                self._welcomed.set_exception(exc)
                return
            del self._buffer[:wire.WELCOME.size]
            self._welcomed.set_result(None)
        self._take_answers()

    def _take_answers(self) -> None:
        try:
            frames = wire.take_frames(self._buffer)
        except wire.WireError as exc:
            self._fail_all(f"it sent {exc}")
            return
        for correlation_id, status, body in frames:
            pending = self._pending.pop(correlation_id, None)
            if pending is None or pending[0].done():
                continue
            response, error = decode_answer(pending[1], status, body, self.address)
            if error is None:
                pending[0].set_result(response)
            else:
                pending[0].set_exception(error)

    def _fail_all(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self._transport is not None:
            self._transport.close()
        if self._welcomed is not None and not self._welcomed.done():
            self._welcomed.set_exception(OSError(why))
        error = BrokerUnavailableError(f"cannot reach the broker at {self.address} (its data port: {why})")
        for answer, _ in self._pending.values():
            if not answer.done():
                answer.set_exception(error)
        self._pending.clear()
