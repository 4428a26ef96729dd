"""Brokers for tests: in-process (a thread with its own event loop) or a real subprocess."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from logbroker.server.app import BrokerServer
from logbroker.server.config import BrokerConfig

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0  # a stop waits out the gRPC grace period (5 s) and hands leadership over (a few s)
TEST_RAFT_TICK_MS = 10  # elections within 100-200 ms keep tests quick
REPO_ROOT = Path(__file__).resolve().parents[2]


LOWEST_TEST_PORT = 10_000
_handed_out: set[int] = set()  # ports given to a test already: each goes to one listener only


def ephemeral_port_low() -> int:
    """Where the kernel's range for outgoing connections starts: a port below it is never taken by a client's
    socket between the moment a test picks it and the moment its broker binds it (a port the kernel handed us
    from that range was, now and then, and the broker failed to start)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now, below the ephemeral range, and not handed out before in this test run."""
    high = ephemeral_port_low()
    for _ in range(1_000):
        port = random.randrange(LOWEST_TEST_PORT, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise AssertionError(f"no free port between {LOWEST_TEST_PORT} and {high} on {host}")


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.02) -> None:
    """Poll a condition until it holds; fail with `what` after the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def is_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        except grpc.RpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


class InProcessBroker:
    """A broker on its own event loop thread: fast to start, and tests can reach its internals."""

    def __init__(self, data_dir: Path, log_defaults: dict[str, str] | None = None, **settings: object) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        settings.setdefault("raft_tick_ms", TEST_RAFT_TICK_MS)
        settings.setdefault("data_listen", f"127.0.0.1:{free_port()}")  # the default, port + 400, may be taken
        self.config = BrokerConfig(data_dir=data_dir, listen=self.address, log_defaults=log_defaults or {},
                                   **settings)  # type: ignore[arg-type]
        self.loop = asyncio.new_event_loop()
        self.server: BrokerServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-broker", daemon=True)

    def start(self) -> InProcessBroker:
        self._thread.start()
        self.server = BrokerServer(self.config)
        self.run(self.server.start())
        wait_until(lambda: is_serving(self.address), STARTUP_TIMEOUT_S, f"broker on {self.address} to serve")
        return self

    def run(self, coro: object, timeout_s: float = 30.0) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)  # type: ignore[arg-type]

    def call(self, fn: Callable[[], object]) -> object:
        async def wrapper() -> object:
            return fn()
        return self.run(wrapper())

    def stop(self) -> None:
        if self.server is not None:
            try:
                self.run(self.server.stop(), STOP_TIMEOUT_S)
            except TimeoutError:
                raise AssertionError(f"broker on {self.address} did not stop within {STOP_TIMEOUT_S}s; "
                                     f"what its loop was doing:\n{self.loop_state()}") from None
            self.server = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


    def loop_state(self) -> str:
        """Every task of the broker's loop and the loop thread's stack: what a stop that overran waits on."""
        lines: list[str] = []
        for task in asyncio.all_tasks(self.loop):
            lines.append(f"task {task.get_name()}: {task.get_coro()!r}")
            lines.extend("    " + "".join(traceback.format_stack(frame, 1)).strip().replace("\n", " ")
                         for frame in task.get_stack())
        frame = sys._current_frames().get(self._thread.ident or -1)
        if frame is not None:
            lines.append("loop thread:\n" + "".join(traceback.format_stack(frame)))
        return "\n".join(lines)


class BrokerProcess:
    """`logbroker serve` as a subprocess, for crash tests (SIGKILL, SIGTERM)."""

    def __init__(self, data_dir: Path, port: int | None = None, extra_args: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"broker-{self.port}.log"

    def start(self) -> BrokerProcess:
        data_port = [] if "--data-listen" in self.extra_args else ["--data-listen", f"127.0.0.1:{free_port()}"]
        cmd = [sys.executable, "-m", "logbroker.server.cli", "serve", "--data-dir", str(self.data_dir),
               "--listen", self.address, "--raft-tick-ms", str(TEST_RAFT_TICK_MS), *data_port, *self.extra_args]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        wait_until(lambda: self._exited_early() or is_serving(self.address), STARTUP_TIMEOUT_S,
                   f"broker on {self.address} to serve")
        if self._exited_early():
            raise AssertionError(f"broker exited at start-up:\n{self.log_path.read_text()}")
        return self

    def _exited_early(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""
