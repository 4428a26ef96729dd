"""The broker's Prometheus endpoint: GET /metrics over HTTP, served from the broker's own event loop.

A scrape first asks the leaders of partitions whose lag this broker reports (groups it coordinates, on
partitions led elsewhere) for their high watermarks, at most SCRAPE_ASK_TIMEOUT_S, and describes the share groups
of the partitions it leads, one partition per event-loop turn; then reads every metric on
the event loop (the collector reads the broker's structures, which only the loop changes); then formats the
text in a worker thread, so a large exposition does not hold up the loop. A tiny HTTP/1.1 server is enough:
one request per connection, no keep-alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import grpc
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import Metric

from logbroker.server.config import split_host_port
from logbroker.server.metrics import TP, BrokerMetrics

log = logging.getLogger("logbroker.metrics")

SCRAPE_ASK_TIMEOUT_S = 2.0
REQUEST_HEAD_TIMEOUT_S = 10.0
MAX_REQUEST_HEAD_BYTES = 16 * 1024
METRICS_PATHS = ("/metrics", "/")


class _Collected:
    """Metric families already read, for generate_latest (which only calls collect())."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


async def ask_high_watermarks(address: str, topics: Sequence[str]) -> dict[TP, int]:
    """The high watermarks of the partitions the broker at address leads, among these topics."""
    async with grpc.aio.insecure_channel(address) as channel:
        answer = await pb_grpc.AdminStub(channel).DescribeTopics(
            pb.DescribeTopicsRequest(names=sorted(topics), local_only=True), timeout=SCRAPE_ASK_TIMEOUT_S)
    found: dict[TP, int] = {}
    for topic in answer.topics:
        for part in topic.partitions:
            if part.local_replica and part.leader_id >= 0 and part.high_watermark >= 0:
                found[(topic.name, part.partition)] = part.high_watermark
    return found


class MetricsServer:
    def __init__(self, metrics: BrokerMetrics, listen: str) -> None:
        self.metrics = metrics
        self.host, self.port = split_host_port(listen)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._on_connection, self.host, self.port,
                                                      limit=MAX_REQUEST_HEAD_BYTES)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc} (is another "
                          "broker using the port? --metrics-listen chooses another)") from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("broker %d: Prometheus metrics on http://%s:%d/metrics", self.metrics.broker.node_id, self.host,
                 self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def exposition(self) -> bytes:
        """The text a scrape gets."""
        await self.refresh_remote_high_watermarks()
        await self.metrics.refresh_share_states()
        families = self.metrics.collect_now()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, generate_latest, _Collected(families))  # type: ignore[arg-type]

    async def refresh_remote_high_watermarks(self) -> None:
        wanted = self.metrics.partitions_needing_high_watermarks()
        peers = self.metrics.broker.peers
        leaders = list(wanted)
        answers = await asyncio.gather(*(ask_high_watermarks(peers[node], sorted(wanted[node])) for node in leaders),
                                       return_exceptions=True)
        for node, answer in zip(leaders, answers, strict=True):
            if isinstance(answer, BaseException):
                log.debug("high watermarks for lag not had from broker %d: %s", node, answer)
                continue
            self.metrics.remote_high_watermarks.update(answer)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_HEAD_TIMEOUT_S)
            method, path = _request_line(head)
            if method not in ("GET", "HEAD"):
                status, body, content_type = "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
            elif path.split("?", 1)[0] not in METRICS_PATHS:
                status, body, content_type = "404 Not Found", b"metrics are at /metrics\n", "text/plain"
            else:
                try:
                    status, body, content_type = "200 OK", await self.exposition(), CONTENT_TYPE_LATEST
                except Exception as exc:
                    log.exception("metrics scrape failed")
                    status, body, content_type = "500 Internal Server Error", f"{exc}\n".encode(), "text/plain"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode())
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError,
                ValueError) as exc:  # a client that went away or sent something else than HTTP: its loss only
            log.debug("metrics connection dropped: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _request_line(head: bytes) -> tuple[str, str]:
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("not an HTTP request line")
    return parts[0], parts[1]
