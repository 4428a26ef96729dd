"""The fastest a Python replicated append can answer on this machine: a floor to read the broker's figures against.

Starts three processes laid out as an RF3 partition is (a leader and two followers, each a uvloop event loop on
127.0.0.1) and a client in this process, and does nothing but the hops a replicated, fsynced produce cannot avoid:

    client --frame--> leader --frame--> follower x2: append to a file, fdatasync, --ack--> leader
                      leader: append to its own file, fdatasync
    leader, once its own fdatasync and one follower's ack are in --answer--> client

No Raft, no record batches, no metadata, no checks: each frame is an 8-byte id and a 100-byte value, length
prefixed. The client sends each record alone at its due time (start + i / rate), without waiting for earlier
answers, and measures from when it was due to its answer, as `benchmarks.produce --paced` does. Whatever
logbroker adds on top of these figures is its own code; what is below them no Python broker on this machine
can reach.

    python -m benchmarks.latency_floor [--records 10000] [--rate 2000] [--fsync thread|native|inline|off]

--fsync thread runs each record's write and fdatasync as a job of asyncio's default thread pool; native writes
on the event loop and hands the fdatasync to the broker's native fsync threads (logbroker.cluster.fsync_threads,
what the broker does with a small append); inline runs both on the event loop; off writes without fdatasync.
The JSON line gives latency_ms (from due) and the three servers' CPU as a percentage of one core over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from benchmarks.common import emit, free_port, percentiles_ms, rounded, run_main
from logbroker.cluster.fsync_threads import FsyncThreads
from logbroker.storage.files import OS_FILES

FRAME_HEADER = struct.Struct(">I")  # the frame's length, then the frame
RECORD_ID = struct.Struct(">Q")
START_TIMEOUT_S = 20.0
ANSWER_TIMEOUT_S = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency_floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=2000.0, help="records/s, each sent alone on its schedule")
    parser.add_argument("--record-size", type=int, default=100)
    parser.add_argument("--fsync", choices=("thread", "native", "inline", "off"), default="thread")
    parser.add_argument("--warmup", type=int, default=200, help="records sent first and not measured")
    # A server process's own options (the tool starts them; not for the command line).
    parser.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--follower-ports", default="", help=argparse.SUPPRESS)
    parser.add_argument("--data-file", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class FrameReader(asyncio.Protocol, ABC):
    """Splits a connection's bytes into frames and hands each to on_frame, which each kind of end defines."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= FRAME_HEADER.size:
            (length,) = FRAME_HEADER.unpack_from(self._buffer)
            end = FRAME_HEADER.size + length
            if len(self._buffer) < end:
                return
            frame = bytes(self._buffer[FRAME_HEADER.size:end])
            del self._buffer[:end]
            self.on_frame(frame)

    @abstractmethod
    def on_frame(self, frame: bytes) -> None: ...


def framed(payload: bytes) -> bytes:
    return FRAME_HEADER.pack(len(payload)) + payload


class Disk:
    """One append-only file, written and fdatasynced as the --fsync mode says; done(record_id) runs on the loop."""

    def __init__(self, path: str, mode: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._mode = mode
        self._threads: FsyncThreads | None = None

    def _native_threads(self) -> FsyncThreads:
        if self._threads is None:
            self._threads = FsyncThreads.start(1)
            if self._threads is None:
                raise SystemExit("latency_floor --fsync native: the native fsync threads are not built")
        return self._threads

    def _write(self, data: bytes) -> None:
        os.write(self._fd, data)
        if self._mode != "off":
            os.fdatasync(self._fd)

    async def append(self, data: bytes) -> None:
        if self._mode == "native":
            os.write(self._fd, data)
            await self._native_threads().fdatasync(OS_FILES, self._fd)
            return
        if self._mode == "thread":
            await asyncio.get_running_loop().run_in_executor(None, self._write, data)
        else:
            self._write(data)


class FollowerSide(FrameReader):
    def __init__(self, disk: Disk) -> None:
        super().__init__()
        self._disk = disk

    def on_frame(self, frame: bytes) -> None:
        asyncio.get_running_loop().create_task(self._persist_and_ack(frame))

    async def _persist_and_ack(self, frame: bytes) -> None:
        await self._disk.append(frame)
        assert self.transport is not None
        self.transport.write(framed(frame[:RECORD_ID.size]))


class LeaderSide(FrameReader):
    """A client's connection to the leader: each frame goes to the followers, then to the leader's disk."""

    def __init__(self, disk: Disk, followers: list[FollowerLink]) -> None:
        super().__init__()
        self._disk = disk
        self._followers = followers
        self._waiting: dict[bytes, list[int]] = {}  # record id -> [own fsync done (0/1), follower acks]

    def on_frame(self, frame: bytes) -> None:
        record_id = frame[:RECORD_ID.size]
        self._waiting[record_id] = [0, 0]
        message = framed(frame)
        for follower in self._followers:
            follower.send(message, self)
        asyncio.get_running_loop().create_task(self._persist(frame, record_id))

    async def _persist(self, frame: bytes, record_id: bytes) -> None:
        await self._disk.append(frame)
        self._note(record_id, own=True)

    def follower_acked(self, record_id: bytes) -> None:
        self._note(record_id, own=False)

    def _note(self, record_id: bytes, own: bool) -> None:
        state = self._waiting.get(record_id)
        if state is None:
            return  # answered already (the second follower's ack)
        state[0 if own else 1] += 1
        if state[0] and state[1]:  # a majority of three: the leader and one follower
            del self._waiting[record_id]
            assert self.transport is not None
            self.transport.write(framed(record_id))


class FollowerLink(FrameReader):
    """The leader's connection to one follower; acks go back to the client connection that sent the record."""

    def __init__(self) -> None:
        super().__init__()
        self._owner: LeaderSide | None = None

    def send(self, message: bytes, owner: LeaderSide) -> None:
        self._owner = owner
        assert self.transport is not None
        self.transport.write(message)

    def on_frame(self, frame: bytes) -> None:
        if self._owner is not None:
            self._owner.follower_acked(frame[:RECORD_ID.size])


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    disk = Disk(args.data_file, args.fsync)
    links: list[FollowerLink] = []
    for port in filter(None, args.follower_ports.split(",")):
        _, link = await loop.create_connection(FollowerLink, "127.0.0.1", int(port))
        links.append(link)
    factory: Any = (lambda: LeaderSide(disk, links)) if links else (lambda: FollowerSide(disk))
    server = await loop.create_server(factory, "127.0.0.1", args.serve_port)
    print("serving", flush=True)
    async with server:
        await server.serve_forever()


def run_server(args: argparse.Namespace) -> int:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args))
    return 0


def start_server(port: int, follower_ports: list[int], data_file: Path, fsync: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.latency_floor", "--serve-port", str(port), "--follower-ports",
         ",".join(map(str, follower_ports)), "--data-file", str(data_file), "--fsync", fsync],
        stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until the server listens (or dies: an empty line)
    if line.strip() != "serving":
        process.kill()
        raise RuntimeError(f"a latency_floor server on port {port} did not start (exit {process.wait()})")
    return process


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def send_paced(sock: socket.socket, args: argparse.Namespace) -> list[float]:
    """Each record at its due time, whether or not earlier ones are answered (as `benchmarks.produce --paced`
    sends); each one's latency runs from its due time to its answer."""
    value = b"v" * args.record_size
    interval_s = 1.0 / args.rate
    total = args.warmup + args.records
    latencies_s: list[float] = []
    answers = bytearray()
    answer_bytes = FRAME_HEADER.size + RECORD_ID.size
    seen = bytearray(total)  # the leader's worker threads may finish records out of order
    next_index = answered = 0
    start = time.perf_counter()
    while answered < total:
        now = time.perf_counter()
        while next_index < total and start + next_index * interval_s <= now:
            sock.sendall(framed(RECORD_ID.pack(next_index) + value))
            next_index += 1
        wait_s = start + next_index * interval_s - now if next_index < total else ANSWER_TIMEOUT_S
        readable, _, _ = select.select([sock], [], [], max(0.0, wait_s))
        if not readable:
            if next_index >= total:
                raise TimeoutError(f"no answer from the leader in {ANSWER_TIMEOUT_S} s")
            continue
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the leader closed the connection")
        answers += chunk
        received_at = time.perf_counter()
        while len(answers) >= answer_bytes:
            (index,) = RECORD_ID.unpack_from(answers, FRAME_HEADER.size)
            del answers[:answer_bytes]
            assert index < next_index and not seen[index], (index, next_index)  # each sent record answered once
            seen[index] = 1
            answered += 1
            if index >= args.warmup:
                latencies_s.append(received_at - (start + index * interval_s))
    return latencies_s


def run_client(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="latency-floor-") as data_dir:
        ports = [free_port() for _ in range(3)]
        servers = []
        try:
            servers.append(start_server(ports[1], [], Path(data_dir) / "follower-1", args.fsync))
            servers.append(start_server(ports[2], [], Path(data_dir) / "follower-2", args.fsync))
            servers.append(start_server(ports[0], ports[1:], Path(data_dir) / "leader", args.fsync))
            sock = socket.create_connection(("127.0.0.1", ports[0]), timeout=ANSWER_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cpu_before = sum(cpu_s(server.pid) for server in servers)
            started = time.perf_counter()
            latencies_s = send_paced(sock, args)
            elapsed_s = time.perf_counter() - started
            cpu_used = sum(cpu_s(server.pid) for server in servers) - cpu_before
            sock.close()
        finally:
            for server in servers:
                server.kill()
                server.wait()
    emit({"tool": "latency_floor", "fsync": args.fsync, "rate_target": args.rate, "records": args.records,
          "record_size": args.record_size, "latency_ms": percentiles_ms(latencies_s),
          "servers_cpu_percent_of_a_core": rounded(100 * cpu_used / elapsed_s, 1)})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_port is not None:
        return run_server(args)
    return run_client(args)


if __name__ == "__main__":
    run_main(main)
