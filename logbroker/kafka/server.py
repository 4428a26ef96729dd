"""The Kafka listener: one asyncio task per connection, requests answered in the order they came.

Each connection has a reader and a responder. The reader takes a frame, decodes it and starts its handler
at once, in arrival order (a produce's batches are proposed before the next request's handler starts, so
the log keeps a connection's order), and queues it; the responder writes the answers in that same order.
At most MAX_IN_FLIGHT requests of a connection are being handled at once: past that the reader stops
reading, which is TCP back-pressure on the client. A Produce with acks=0 gets no answer.

What breaks the framing (a size over max_request_bytes, a truncated frame, an unknown API key, a body
that does not decode) closes that connection after the answers already due, as Kafka does; the broker and
its other connections carry on. A client that goes away (end of stream) takes its unanswered requests
with it: their handlers are cancelled (a long-poll fetch does not wait out its max wait for nobody).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kio.serial import entity_reader, entity_writer

from logbroker.cluster.tasks import cancel_and_wait
from logbroker.kafka import framing
from logbroker.kafka import handlers as _handlers  # noqa: F401  (registers every API)
from logbroker.kafka.context import Context, ListenerSettings
from logbroker.kafka.handlers.meta import unsupported_api_versions
from logbroker.kafka.legacy import legacy_produce_answer
from logbroker.kafka.versions import APIS, is_flexible, request_class, response_class
from logbroker.server.metrics import kafka_error_names

log = logging.getLogger("logbroker.kafka")

MAX_IN_FLIGHT = 16
ANSWERS_DUE_TIMEOUT_S = 5.0  # how long a refused connection's earlier answers may take
API_VERSIONS_KEY = 18
PRODUCE_KEY = 0
_writers: dict[type, Callable[..., Any]] = {}
_readers: dict[type, Callable[..., Any]] = {}


def encode(message: Any) -> bytes:
    cls = type(message)
    writer = _writers.get(cls)
    if writer is None:
        writer = _writers[cls] = entity_writer(cls)
    buf = io.BytesIO()
    writer(buf, message)
    return buf.getvalue()


def decode(cls: type, frame: bytes, offset: int) -> Any:
    reader = _readers.get(cls)
    if reader is None:
        reader = _readers[cls] = entity_reader(cls)
    value, _ = reader(frame, offset)
    return value


@dataclass
class ListenerStats:
    connections: int = 0
    requests: int = 0
    closed_for_bad_input: int = 0
    by_api: dict[str, int] = field(default_factory=dict)


class KafkaListener:
    def __init__(self, broker: Any, groups: Any, settings: ListenerSettings) -> None:
        self.broker = broker
        self.groups = groups
        self.settings = settings
        self.stats = ListenerStats()
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self.port = 0

    async def start(self) -> None:
        host, port = self.settings.listen_host, self.settings.listen_port
        self._server = await asyncio.start_server(self._on_connection, host, port, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("broker %d: Kafka protocol on %s:%d", self.broker.node_id, host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections.values()):
            writer.transport.abort()
        if self._connections:
            _, stuck = await asyncio.wait(list(self._connections), timeout=1.0)
            for task in stuck:  # a handler still waiting (a long-poll fetch): its client is gone anyway
                task.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=1.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        self.stats.connections += 1
        peer = writer.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else str(peer)
        pending: asyncio.Queue[asyncio.Task[bytes | None] | None] = asyncio.Queue(MAX_IN_FLIGHT)
        loop = asyncio.get_running_loop()
        responder = loop.create_task(self._respond(pending, writer))
        requests = loop.create_task(self._read_requests(reader, pending, host))
        try:
            await asyncio.wait((requests, responder), return_when=asyncio.FIRST_COMPLETED)
            if requests.done() and isinstance(requests.exception(), framing.FrameError):
                self.stats.closed_for_bad_input += 1
                log.info("kafka connection from %s closed: %s", host, requests.exception())
                await pending.put(None)  # the answers already due go out before the connection closes
                await asyncio.wait((responder,), timeout=ANSWERS_DUE_TIMEOUT_S)
        except asyncio.CancelledError:  # the listener is stopping
            pass
        finally:
            # The peer went away, the responder could not write, or the answers due are out: stop everything
            # this connection started.
            while not pending.empty():
                queued = pending.get_nowait()
                if queued is not None:
                    queued.cancel()
            for part in (requests, responder):
                # cancel_and_wait: a responder awaiting a long-poll answer could outlive one cancel() (Python
                # 3.11's wait_for), and this connection then stayed open and listed for good.
                with contextlib.suppress(Exception):
                    await cancel_and_wait(part)
            writer.transport.abort()
            self._connections.pop(task, None)

    async def _read_requests(self, reader: asyncio.StreamReader,
                             pending: asyncio.Queue[asyncio.Task[bytes | None] | None], host: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frame = await framing.read_frame(reader, self.settings.max_request_bytes)
            if frame is None:
                return
            self.stats.requests += 1
            answer = loop.create_task(self._dispatch(frame, host))
            try:
                await pending.put(answer)
            except asyncio.CancelledError:
                answer.cancel()
                raise

    async def _respond(self, pending: asyncio.Queue[asyncio.Task[bytes | None] | None],
                       writer: asyncio.StreamWriter) -> None:
        while True:
            task = await pending.get()
            if task is None:
                return
            try:
                frame = await task
            except framing.FrameError as exc:
                log.info("kafka request refused, connection closed: %s", exc)
                self.stats.closed_for_bad_input += 1
                writer.close()
                return
            except Exception:
                log.exception("kafka request failed unexpectedly; connection closed")
                writer.close()
                return
            if frame is not None:
                try:
                    writer.write(frame)
                    await writer.drain()
                except ConnectionError:
                    return

    def _dispatch(self, frame: bytes, host: str) -> Any:
        """The coroutine answering one frame (the response frame, or None for none); decoding happens here,
        before the coroutine starts, so that a bad frame stops the reading at once."""
        key, version, correlation_id = framing.peek_ids(frame)
        found = APIS.get(key)
        if found is None:
            raise framing.FrameError(f"unknown API key {key} (version {version}); this broker serves "
                                     f"{sorted(APIS)}")
        self.stats.by_api[found.name] = self.stats.by_api.get(found.name, 0) + 1
        if not found.served_from <= version <= found.max_version:
            if key == API_VERSIONS_KEY:  # answered in v0, with our ranges, so the client can pick one
                return _ready(framing.response_frame(correlation_id, encode(unsupported_api_versions()), False))
            if key == PRODUCE_KEY and version < found.served_from:
                return _ready(legacy_produce_answer(frame, version, correlation_id))
            raise framing.FrameError(f"{found.name} v{version} is not served (versions "
                                     f"{found.served_from}-{found.max_version})")
        flexible = is_flexible(key, version)
        header = framing.parse_header(frame, flexible)
        try:
            request = decode(request_class(key, version), frame, header.body_offset)
        except Exception as exc:
            raise framing.FrameError(f"{found.name} v{version} request does not decode: {exc}") from None
        ctx = Context(self.broker, self.groups, self.settings, header.client_id or "", host, version)
        flexible_response = bool(response_class(key, version).__flexible__) and key != API_VERSIONS_KEY
        return self._answer(found.handler(ctx, request, version), correlation_id, flexible_response, found.name)

    async def _answer(self, handling: Any, correlation_id: int, flexible_response: bool, api: str) -> bytes | None:
        metrics = getattr(self.broker, "metrics", None)  # the broker's Prometheus metrics (none in some tests)
        started = time.perf_counter()
        try:
            response = await handling
        except asyncio.CancelledError:
            raise  # the client went away: neither an error nor a latency
        except BaseException as exc:
            if metrics is not None:
                metrics.timer("kafka", api).observe(time.perf_counter() - started)
                metrics.record_error("kafka", api, type(exc).__name__)
            raise
        if metrics is not None:
            metrics.timer("kafka", api).observe(time.perf_counter() - started)
        if response is None:
            return None
        if metrics is not None:
            for error in kafka_error_names(response):
                metrics.record_error("kafka", api, error)
        return framing.response_frame(correlation_id, encode(response), flexible_response)


async def _ready(frame: bytes | None) -> bytes | None:
    return frame
