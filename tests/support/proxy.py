"""A fault-injecting TCP proxy on loopback, for cutting brokers off from each other.

``FaultProxy(listen_port, target_port)`` accepts connections on 127.0.0.1:listen_port and relays bytes
both ways to 127.0.0.1:target_port. Its event loop runs on its own daemon thread, so tests drive it
from ordinary synchronous code:

- ``cut()`` aborts every relayed connection (TCP RST, as a crashed switch or a killed peer would look)
  and from then on accepts new connections only to abort them at once: the peer sees connection resets
  and keeps retrying, as it would against a host that is unreachable.
- ``cut(blackhole=True)`` keeps connections open but silently drops every byte in both directions (no
  FIN, no RST), as a network partition looks; only keepalives or timeouts notice it. ``heal()`` aborts
  the blackholed connections, since their byte streams have holes in them now.
- ``heal()`` relays again; ``close()`` stops listening, aborts everything and stops the thread.

Loopback only: the proxy never binds or connects anywhere but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future

HOST = "127.0.0.1"
CHUNK_BYTES = 256 * 1024
START_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 10.0


class ProxyLoop:
    """One event loop on a daemon thread that several FaultProxies share: a cluster's dozen proxies on a dozen
    threads of their own fought over the test process's GIL, and under load a relay stalled long enough for
    two healthy brokers to miss each other's heartbeats."""

    def __init__(self, name: str = "proxies") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def start(self) -> ProxyLoop:
        if not self._thread.is_alive():
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=CALL_TIMEOUT_S)
        if not self.loop.is_running():
            self.loop.close()


class FaultProxy:
    def __init__(self, listen_port: int, target_port: int, name: str = "", shared: ProxyLoop | None = None) -> None:
        """``shared``: run on that loop (started by whoever owns it) instead of a thread of this proxy's own."""
        self.listen_port = listen_port
        self.target_port = target_port
        self.name = name or f"proxy {listen_port}->{target_port}"
        self.address = f"{HOST}:{listen_port}"
        self.accepted = 0  # connections accepted in total, relayed or not
        self.relayed_bytes = 0
        self._mode = "open"  # "open", "reset" or "blackhole"
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._own_loop = ProxyLoop(self.name) if shared is None else None
        self._loop_owner = self._own_loop or shared
        assert self._loop_owner is not None
        self._loop = self._loop_owner.loop
        self._closed = False

    # ------------------------------------------------------------------ control (any thread)

    def start(self) -> FaultProxy:
        self._loop_owner.start()
        self._call(self._listen())
        return self

    @property
    def is_cut(self) -> bool:
        return self._mode != "open"

    def cut(self, blackhole: bool = False) -> None:
        """Drop all connections (or silently swallow their bytes) and refuse service to new ones."""
        self._call(self._set_mode("blackhole" if blackhole else "reset"))

    def heal(self) -> None:
        self._call(self._set_mode("open"))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop_owner.running:
            with contextlib.suppress(Exception):
                self._call(self._shutdown())
        if self._own_loop is not None:
            self._own_loop.stop()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: object) -> object:
        future: Future[object] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return future.result(CALL_TIMEOUT_S)

    # ------------------------------------------------------------------ the event loop side

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, HOST, self.listen_port, reuse_address=True)

    async def _set_mode(self, mode: str) -> None:
        previous, self._mode = self._mode, mode
        if mode == "reset" or (mode == "open" and previous == "blackhole"):
            self._abort_all()

    async def _shutdown(self) -> None:
        self._mode = "reset"
        if self._server is not None:
            self._server.close()
        self._abort_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._mode == "reset":
            writer.transport.abort()
            return
        self._writers.add(writer)
        if self._mode == "blackhole":
            await self._relay(reader, None)  # read and drop until the peer gives up or heal() aborts
            self._drop(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            self._drop(writer)
            return
        if self._mode == "reset":  # cut while we were connecting
            up_writer.transport.abort()
            self._drop(writer)
            return
        self._writers.add(up_writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.gather(self._relay(reader, up_writer), self._relay(up_reader, writer))
        finally:
            self._tasks.discard(task)
            self._drop(writer)
            self._drop(up_writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None) -> None:
        """Copy bytes until EOF or an error; in blackhole mode read them and drop them."""
        try:
            while True:
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    break
                if writer is None or self._mode != "open":
                    continue
                writer.write(data)
                self.relayed_bytes += len(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if writer is not None and self._mode == "open":
                # Half-close: pass the EOF on, so a clean close on one side is a clean close on the other.
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()

    def _drop(self, writer: asyncio.StreamWriter) -> None:
        self._writers.discard(writer)
        writer.transport.abort()
