"""`logbroker dev`: a local cluster of broker processes, supervised.

Each broker is its own `logbroker serve` process, writing its log to <data-dir>/broker-N.log. When one
dies the supervisor says which, how (exit status or signal) and where its log is, and the others keep
serving; a broker that crashed or was killed is started again after a pause, at most MAX_RESTARTS times
in RESTART_WINDOW_S, so a broker that cannot start does not loop forever. A broker that exits cleanly
(someone stopped it on purpose) is left down, with the command that starts it by hand. Ctrl-C, SIGTERM
or SIGHUP stops every broker: each gets SIGTERM and hands its leaderships over before it exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from logbroker_client.data_wire import DEFAULT_DATA_PORT_OFFSET

from logbroker.server.config import DEFAULT_RAFT_PORT_OFFSET

RESTART_DELAY_S = 1.0
MAX_RESTARTS = 3
RESTART_WINDOW_S = 60.0
POLL_INTERVAL_S = 0.2
HEALTH_TIMEOUT_S = 0.3
STOP_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 8
# The supervisor asks a restarted broker often whether it serves yet; gRPC's default reconnect backoff
# (up to 120 s) would hide a broker that is back.
HEALTH_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
PR_SET_PDEATHSIG = 1
RUN_MARKER = "---- "  # begins the line written to a broker's log before each start
KAFKA_PORT_OFFSET = 100  # broker n: gRPC on base port + n - 1, Kafka clients on that + 100
METRICS_PORT_OFFSET = 200  # ... and Prometheus metrics (HTTP) on that + 200 (and the Raft port on + 300)


@dataclass
class DevBroker:
    """One supervised broker: how to start it, and what has happened to it."""

    node_id: int
    address: str
    data_dir: Path
    log_path: Path
    command: list[str]
    proc: subprocess.Popen[bytes] | None = None
    serving: bool = False
    exit_seen: bool = False  # this process's exit has been reported
    died_at: float | None = None  # the first death of a run of failed starts; cleared once it serves
    restart_at: float | None = None  # a dead broker due to start again at this time.monotonic()
    restarts: deque[float] = field(default_factory=deque)  # when it was restarted, within the window
    given_up: bool = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def left_down(self) -> bool:
        """Its exit has been reported and no restart is planned."""
        return self.exit_seen and self.restart_at is None

    @property
    def hand_command(self) -> str:
        return shlex.join(self.command)


def broker_launcher() -> list[str]:
    """The `logbroker` script beside this interpreter (what a user would type), else `python -m`."""
    script = Path(sys.executable).with_name("logbroker")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "logbroker.server.cli"]


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-returncode} ({name})"
    return f"exited with status {returncode}"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last lines the broker's latest run wrote (the log file keeps every run, each after a marker)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 16384))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    run = text.splitlines()
    starts = [i for i, line in enumerate(run) if line.startswith(RUN_MARKER)]
    return run[starts[-1] + 1 if starts else 0:][-lines:]


def parent_death_signal() -> Callable[[], None] | None:
    """On Linux, a child hook that makes the kernel send the broker SIGTERM when the supervisor dies, so no
    broker outlives `logbroker dev` (brokers run in their own session, out of reach of the terminal's Ctrl-C).
    prctl is looked up here, before any fork: the hook itself only makes one C call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook


class DevCluster:
    def __init__(self, brokers: list[DevBroker], restart: bool, out: TextIO = sys.stdout) -> None:
        self.brokers = brokers
        self.restart = restart
        self.out = out
        self.stopping = False
        self._started_at = time.monotonic()
        self._all_serving_reported = False
        self._child_hook = parent_death_signal()
        self._channels: dict[int, grpc.Channel] = {}

    def say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    # ------------------------------------------------------------------------------ lifecycle

    def launch(self, broker: DevBroker) -> None:
        broker.data_dir.mkdir(parents=True, exist_ok=True)
        with open(broker.log_path, "ab") as log_file:
            log_file.write(f"{RUN_MARKER}{time.strftime('%Y-%m-%d %H:%M:%S')} logbroker dev starts: "
                           f"{broker.hand_command}\n".encode())
            log_file.flush()
            broker.proc = subprocess.Popen(broker.command, stdout=log_file, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True,
                                           preexec_fn=self._child_hook)
        broker.serving = False
        broker.exit_seen = False

    def start_all(self) -> None:
        for broker in self.brokers:
            self.launch(broker)
            assert broker.proc is not None
            self.say(f"broker {broker.node_id}: {broker.address}, pid {broker.proc.pid}, data in {broker.data_dir}, "
                     f"log in {broker.log_path}")
        self.say("each broker's own command, to run one by hand (for one that `logbroker dev` reports it has "
                 "left down):")
        for broker in self.brokers:
            self.say(f"  {broker.hand_command}")
        bootstrap = ",".join(b.address for b in self.brokers)
        self.say(f"export LOGBROKER_BOOTSTRAP={bootstrap}   # Ctrl-C stops the cluster")
        kafka = ",".join(kafka_address(b.address) for b in self.brokers)
        self.say(f"Kafka clients: bootstrap.servers={kafka}")
        metrics = " ".join(f"http://{metrics_address(b.address)}/metrics" for b in self.brokers)
        self.say(f"Prometheus metrics: {metrics}")
        data_ports = " ".join(str(int(b.address.rpartition(":")[2]) + DEFAULT_DATA_PORT_OFFSET) for b in self.brokers)
        self.say(f"data ports (clients' records; the Python clients find them in Metadata): {data_ports}")

    def run(self) -> int:
        """Supervise until asked to stop (0), or until no broker is left and none will be restarted (1)."""
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_stop_signal)
        self.start_all()
        try:
            while not self.stopping:
                self.check(time.monotonic())
                if all(b.left_down for b in self.brokers):
                    self.say("no broker is running and none will be restarted; `logbroker dev` stops (see the "
                             "logs above for why each one stopped)")
                    return 1
                time.sleep(POLL_INTERVAL_S)
        finally:
            self.stop_all()
        return 0

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def stop_all(self) -> None:
        """SIGTERM every running broker (each hands its leaderships over), SIGKILL any still there later."""
        running = [b for b in self.brokers if b.running]
        if running:
            self.say(f"stopping {len(running)} broker(s)...")
        for broker in running:
            assert broker.proc is not None
            with contextlib.suppress(ProcessLookupError):
                broker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for broker in running:
            assert broker.proc is not None
            try:
                broker.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                broker.proc.kill()
                broker.proc.wait()
                self.say(f"broker {broker.node_id} did not stop within {STOP_TIMEOUT_S:g}s; killed it "
                         f"(log: {broker.log_path})")
        for channel in self._channels.values():
            channel.close()
        if running:
            self.say("all brokers stopped")

    # ---------------------------------------------------------------------------- supervision

    def check(self, now: float) -> None:
        for broker in self.brokers:
            if broker.restart_at is not None:
                if now >= broker.restart_at:
                    self.restart_broker(broker, now)
            elif broker.proc is not None and not broker.exit_seen and broker.proc.poll() is not None:
                self.on_death(broker, now)
            elif broker.running and not broker.serving and self.is_serving(broker):
                self.on_serving(broker, now)

    def on_death(self, broker: DevBroker, now: float) -> None:
        assert broker.proc is not None
        code = broker.proc.returncode
        broker.exit_seen = True
        broker.died_at = broker.died_at if broker.died_at is not None else now
        broker.serving = False
        self.say(f"broker {broker.node_id} (pid {broker.proc.pid}, {broker.address}) {describe_exit(code)}; "
                 f"its log: {broker.log_path}")
        if code > 0:
            for line in log_tail(broker.log_path):
                self.say(f"  | {line}")
        self.say(f"  {self.survivors_note()}")
        self.plan_restart(broker, now, code)

    def survivors_note(self) -> str:
        """What the brokers still running can do: a cluster serves while a majority of its brokers runs."""
        running = [str(b.node_id) for b in self.brokers if b.running]
        if not running:
            return "no broker is running"
        who = f"broker {running[0]} is" if len(running) == 1 else f"brokers {', '.join(running)} are"
        if len(running) > len(self.brokers) // 2:
            return (f"{who} still running and keep serving: partitions with a replica on them carry on "
                    "(replication factor 3 loses nothing acknowledged with acks=all)")
        return (f"{who} still running, but the cluster needs a majority of its {len(self.brokers)} brokers to "
                "serve: start the others")

    def plan_restart(self, broker: DevBroker, now: float, code: int) -> None:
        while broker.restarts and now - broker.restarts[0] > RESTART_WINDOW_S:
            broker.restarts.popleft()
        if code == 0:
            reason = "it exited cleanly, so someone stopped it on purpose; it stays down"
        elif not self.restart:
            reason = "--no-restart is set"
        elif len(broker.restarts) >= MAX_RESTARTS:
            broker.given_up = True
            reason = (f"it died {MAX_RESTARTS + 1} times within {RESTART_WINDOW_S:g}s, so something stops it from "
                      "running: fix what its log says")
        else:
            broker.restart_at = now + RESTART_DELAY_S
            self.say(f"  restarting broker {broker.node_id} in {RESTART_DELAY_S:g}s (restart {len(broker.restarts) + 1}"
                     f" of at most {MAX_RESTARTS} in {RESTART_WINDOW_S:g}s)")
            return
        self.say(f"  not restarting broker {broker.node_id}: {reason}. To start it by hand:")
        self.say(f"    {broker.hand_command}")

    def restart_broker(self, broker: DevBroker, now: float) -> None:
        broker.restart_at = None
        broker.restarts.append(now)
        self.launch(broker)
        assert broker.proc is not None
        self.say(f"broker {broker.node_id}: restarted, pid {broker.proc.pid}")

    def on_serving(self, broker: DevBroker, now: float) -> None:
        broker.serving = True
        if broker.died_at is not None:
            self.say(f"broker {broker.node_id} is serving again, {now - broker.died_at:.1f}s after it stopped")
            broker.died_at = None
        if not self._all_serving_reported and all(b.serving for b in self.brokers):
            self._all_serving_reported = True
            self.say(f"cluster serving: all {len(self.brokers)} brokers up after {now - self._started_at:.1f}s")

    def is_serving(self, broker: DevBroker) -> bool:
        channel = self._channels.get(broker.node_id)
        if channel is None:
            channel = self._channels[broker.node_id] = grpc.insecure_channel(broker.address,
                                                                             options=HEALTH_CHANNEL_OPTIONS)
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=HEALTH_TIMEOUT_S)
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def kafka_address(address: str) -> str:
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + KAFKA_PORT_OFFSET}"


def metrics_address(address: str) -> str:
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + METRICS_PORT_OFFSET}"


def dev_brokers(count: int, base_port: int, host: str, data_dir: Path, secret_file: Path,
                log_level: str | None) -> list[DevBroker]:
    """The brokers of a local cluster on consecutive ports, each with the command that runs it."""
    peers = ",".join(f"{n}={host}:{base_port + n - 1}" for n in range(1, count + 1))
    launcher = broker_launcher()
    if log_level:
        launcher = [*launcher, "--log-level", log_level]
    brokers = []
    for node_id in range(1, count + 1):
        address = f"{host}:{base_port + node_id - 1}"
        broker_dir = data_dir / f"broker-{node_id}"
        command = [*launcher, "serve", "--node-id", str(node_id), "--data-dir", str(broker_dir),
                   "--listen", address, "--peers", peers, "--cluster-secret-file", str(secret_file),
                   "--kafka-listen", f"{host}:{base_port + KAFKA_PORT_OFFSET + node_id - 1}",
                   "--metrics-listen", f"{host}:{base_port + METRICS_PORT_OFFSET + node_id - 1}",
                   # Named, not left to the default (the same port), so that each printed command says it.
                   "--raft-listen", f"{host}:{base_port + DEFAULT_RAFT_PORT_OFFSET + node_id - 1}"]
        brokers.append(DevBroker(node_id, address, broker_dir, data_dir / f"broker-{node_id}.log", command))
    return brokers
