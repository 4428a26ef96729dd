"""Pieces the benchmark tools share: percentiles, payloads, JSON output, topics, a temporary broker."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PAYLOAD_POOL = 1024  # distinct values cycled through, so the producer does not just resend one buffer
BROKER_START_TIMEOUT_S = 30.0
BROKER_STOP_TIMEOUT_S = 20.0


def percentiles_ms(samples_s: Sequence[float]) -> dict[str, float | None]:
    """p50, p99, p99.9 and max in milliseconds (nearest rank); None for each when there are no samples."""
    if not samples_s:
        return {"p50": None, "p99": None, "p999": None, "max": None}
    ordered = sorted(samples_s)
    last = len(ordered) - 1

    def rank(q: float) -> float:
        return round(ordered[min(last, int(q * len(ordered)))] * 1000, 3)

    return {"p50": rank(0.50), "p99": rank(0.99), "p999": rank(0.999), "max": round(ordered[last] * 1000, 3)}


def payloads(size: int, count: int = PAYLOAD_POOL, seed: int = 42) -> list[bytes]:
    """Values of random letters and digits: about as compressible as text, unlike os.urandom bytes."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits
    return ["".join(rng.choices(alphabet, k=size)).encode() for _ in range(count)]


def emit(result: dict[str, Any]) -> None:
    """The one JSON line a tool prints on stdout (everything else goes to stderr)."""
    sys.stdout.write(json.dumps(result, separators=(", ", ": ")) + "\n")
    sys.stdout.flush()


def rounded(value: float, digits: int = 3) -> float:
    return round(value, digits)


def add_connection_args(parser: argparse.ArgumentParser, default_topic: str) -> None:
    parser.add_argument("--bootstrap", default=None,
                        help="HOST:PORT[,HOST:PORT] (default: $LOGBROKER_BOOTSTRAP, else 127.0.0.1:9092)")
    parser.add_argument("--topic", default=default_topic)
    parser.add_argument("--partitions", type=int, default=1, help="partitions when the tool creates the topic")
    parser.add_argument("--replication-factor", type=int, default=None,
                        help="replication factor when the tool creates the topic (default: the broker's)")


def ensure_topic(bootstrap: str | None, topic: str, partitions: int, replication_factor: int | None) -> None:
    """Create the topic unless it exists already (then its partition count is whatever it has)."""
    from logbroker_client.admin import Admin
    from logbroker_client.errors import TopicAlreadyExistsError

    with Admin(bootstrap) as admin, contextlib.suppress(TopicAlreadyExistsError):
        admin.create_topic(topic, partitions=partitions, replication_factor=replication_factor or 0)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port_offset(ports: list[int], host: str = "127.0.0.1", avoid: frozenset[int] = frozenset()) -> int:
    """An offset that puts every port + offset on a free port outside `avoid` (ports handed out but not bound
    yet): a cluster's Kafka ports, and its data ports, are each broker's port plus one offset (the defaults,
    +100 and +400, may be taken where ports are random)."""
    for _ in range(200):
        offset = random.randrange(1000, 20000) * random.choice((1, -1))
        candidates = [port + offset for port in ports]
        if (all(1024 < c < 65536 and c not in avoid for c in candidates)
                and all(port_is_free(c, host) for c in candidates)):
            return offset
    raise AssertionError(f"no offset puts every one of the ports {ports} on a free port")


def is_serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


class TemporaryBroker:
    """`logbroker serve` in a subprocess on a free loopback port, with its data in a temporary directory.

    The broker runs with its defaults (flush = "always"), so the figures include the fsyncs a real
    deployment pays for durability.
    """

    def __init__(self, extra_args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.workdir = Path(tempfile.mkdtemp(prefix="logbroker-bench-"))
        self.log_path = self.workdir / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> TemporaryBroker:
        data_port = [] if "--data-listen" in self.extra_args else ["--data-listen", f"127.0.0.1:{free_port()}"]
        cmd = [sys.executable, "-m", "logbroker.server.cli", "--log-level", "warning", "serve",
               "--data-dir", str(self.workdir / "data"), "--listen", self.address, *data_port, *self.extra_args]
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while not is_serving(self.address):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the benchmark broker did not start; its log:\n{self.log_text()}")
            time.sleep(0.1)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(BROKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TemporaryBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_main(main: Any) -> None:
    """Run a tool's main(): a LogbrokerError is one line on stderr and exit 1, not a traceback."""
    from logbroker_client.errors import LogbrokerError

    try:
        code = main()
    except LogbrokerError as exc:
        print(f"{os.path.basename(sys.argv[0])}: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
