"""A cluster of real broker processes on 127.0.0.1, for fault tests: kill, pause, cut off, restart.

``BrokerCluster(tmp_path, size=3, raft_tick_ms=20)`` starts ``size`` ``logbroker serve`` subprocesses,
each a voter of the controller group, with node ids 1..size. Each broker listens for clients on its own
real port (``cluster.bootstrap`` lists them). With ``proxied=True`` the brokers reach each other only
through ``FaultProxy`` instances, three per ordered pair (i -> j: j's client port, j's Raft port and j's data
port, at the client port's proxy plus the cluster's data port offset), so a test
can cut any link, or every link of one broker (``isolate``), without touching the processes.

Caveat of the proxied set-up: a broker has one address per peer (``--peers``) and advertises exactly those
addresses in Metadata and NOT_LEADER hints, so clients that follow those hints also go through broker i's
proxies (the gRPC and the data port alike). Cutting a broker off therefore also cuts the clients that were sent
to it by another broker, which
is what a real partition does too.

The cluster writes each broker's stdout/stderr to ``<root>/broker-<id>.log``; ``log_tails()`` gives the
end of each, and the ``cluster`` fixture of the tests prints them when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from logbroker_client import Admin
from logbroker_client import records as rec
from logbroker_client.connection import Connection
from logbroker_client.errors import LogbrokerError
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.types import PartitionInfo

from benchmarks.common import free_port_offset, port_is_free
from logbroker.storage.config import LogConfig
from logbroker.storage.filenames import partition_dir_name
from logbroker.storage.log import PartitionLog
from tests.support.brokers import REPO_ROOT, STARTUP_TIMEOUT_S, BrokerProcess, free_port, is_serving, wait_until
from tests.support.checker import Stored
from tests.support.disk import SizeLimitedDir
from tests.support.proxy import FaultProxy, ProxyLoop

HOST = "127.0.0.1"
STOP_TIMEOUT_S = 20.0
DESCRIBE_TIMEOUT_MS = 1500
LOG_TAIL_LINES = 40
CLUSTER_SECRET_FILE = "cluster.secret"


@dataclass(frozen=True)
class ReplicaView:
    """One broker's answer about its own replica of a partition (DescribeTopics with local_only)."""

    node: int
    partition: int
    leader_id: int
    leader_epoch: int
    replicas: list[int]
    isr: list[int]  # the leader's in-sync set when `node` leads; otherwise just the assignment
    log_start_offset: int
    high_watermark: int
    log_end_offset: int
    local_replica: bool  # False when `node` holds no replica: the offsets are then meaningless
    topic_id: str
    catching_up: bool = False  # it lost its state and does not vote yet (RaftNode.wait_to_catch_up)


class ClusterBroker(BrokerProcess):
    """One broker of a cluster: BrokerProcess plus a node id, a peers map and pause/resume.

    ``launch()`` starts the process without waiting: with three voters, no broker reports SERVING until
    a majority runs, so the cluster starts every process first and waits for health afterwards.
    """

    def __init__(self, node_id: int, root: Path, port: int, raft_tick_ms: int, log_level: str = "info") -> None:
        super().__init__(root / f"broker-{node_id}", port=port)
        self.secret_file = root / CLUSTER_SECRET_FILE
        self.node_id = node_id
        self.raft_tick_ms = raft_tick_ms
        self.log_level = log_level
        self.peers: dict[int, str] = {}
        self.raft_port = free_port()  # the Raft port (--raft-listen); peers reach it directly or through a proxy
        self.raft_peers: dict[int, str] = {}
        # Where clients reach each broker (--advertised-peers), when that is not where this broker does.
        self.advertised_peers: dict[int, str] = {}
        self.log_path = root / f"broker-{node_id}.log"
        self.paused = False
        self.extra_args: list[str] = []
        self.kafka_port: int | None = None  # set by BrokerCluster(kafka=True)
        self.metrics_port: int | None = None  # set by BrokerCluster(metrics=True)
        self.data_port = 0  # set by BrokerCluster: this broker's port plus the cluster's data port offset

    @property
    def metrics_url(self) -> str:
        assert self.metrics_port is not None, "the cluster was started without metrics=True"
        return f"http://{HOST}:{self.metrics_port}/metrics"

    @property
    def kafka_address(self) -> str:
        assert self.kafka_port is not None, "the cluster was started without kafka=True"
        return f"{HOST}:{self.kafka_port}"

    def command(self) -> list[str]:
        peers = ",".join(f"{node}={address}" for node, address in sorted(self.peers.items()))
        raft_peers = ",".join(f"{node}={address}" for node, address in sorted(self.raft_peers.items()))
        return [sys.executable, "-m", "logbroker.server.cli", "--log-level", self.log_level, "serve",
                "--node-id", str(self.node_id), "--data-dir", str(self.data_dir), "--listen", self.address,
                "--peers", peers, "--raft-tick-ms", str(self.raft_tick_ms),
                "--raft-listen", f"{HOST}:{self.raft_port}", "--raft-peers", raft_peers,
                "--data-listen", f"{HOST}:{self.data_port}",
                *(["--advertised-peers", ",".join(f"{node}={address}" for node, address
                                                  in sorted(self.advertised_peers.items()))]
                  if self.advertised_peers else []),
                "--cluster-secret-file", str(self.secret_file),
                *(["--kafka-listen", self.kafka_address] if self.kafka_port is not None else []),
                *(["--metrics-listen", f"{HOST}:{self.metrics_port}"] if self.metrics_port is not None else []),
                *self.extra_args]

    def launch(self) -> None:
        assert not self.running, f"broker {self.node_id} is already running"
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"---- start {time.strftime('%H:%M:%S')}: {' '.join(self.command())}\n".encode())
            log_file.flush()
            self.proc = subprocess.Popen(self.command(), stdout=log_file, stderr=subprocess.STDOUT, env=env)
        self.paused = False

    def start(self) -> ClusterBroker:
        self.launch()
        self.wait_serving()
        return self

    def wait_serving(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        wait_until(lambda: self._exited_early() or is_serving(self.address), timeout_s,
                   f"broker {self.node_id} on {self.address} to serve")
        if self._exited_early():
            assert self.proc is not None
            raise AssertionError(f"broker {self.node_id} exited at start-up with code {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        if self.paused:
            self.resume()
        super().kill()

    def terminate(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        if self.paused:
            self.resume()
        return super().terminate(timeout_s)

    def stop(self) -> None:
        """Whatever state it is in: continue it if paused, SIGKILL it, reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.paused = False

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_size(self) -> int:
        """The log file's size in bytes: a mark to read what it logs from then on (log_since)."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, mark: int) -> str:
        """What it logged past byte `mark` of its log (log_size)."""
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace")

    def replace_disk(self) -> None:
        """The operator replaces the broker's disk: SIGKILL, then an empty data directory (not started again)."""
        self.kill()
        shutil.rmtree(self.data_dir)
        self.data_dir.mkdir()


class BrokerCluster:
    def __init__(self, root: Path, size: int = 3, raft_tick_ms: int = 20, proxied: bool = False,
                 log_level: str = "info", broker_config: Mapping[str, int | str | bool] | None = None,
                 kafka: bool = False, metrics: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / CLUSTER_SECRET_FILE).exists():  # shared by every broker of this cluster
            (self.root / CLUSTER_SECRET_FILE).write_text(secrets.token_hex(32))
        self.size = size
        self.raft_tick_ms = raft_tick_ms
        self.brokers: dict[int, ClusterBroker] = {
            node: ClusterBroker(node, self.root, free_port(), raft_tick_ms, log_level) for node in range(1, size + 1)
        }
        self.proxies: dict[tuple[int, int], FaultProxy] = {}  # (from, to) -> the proxy of to's client port
        self.raft_proxies: dict[tuple[int, int], FaultProxy] = {}  # (from, to) -> the proxy of to's Raft port
        # (from, to) -> the proxy of to's data port: at the client port's proxy plus the data port offset, as
        # brokers name each other's data ports from the --peers addresses (which are the proxies).
        self.data_proxies: dict[tuple[int, int], FaultProxy] = {}
        handed_out = frozenset(p for b in self.brokers.values() for p in (b.port, b.raft_port))
        self.data_port_offset = free_port_offset([b.port for b in self.brokers.values()], avoid=handed_out)
        for broker in self.brokers.values():
            broker.data_port = broker.port + self.data_port_offset
        self.proxy_loop = ProxyLoop("cluster proxies")  # one loop relays for every proxy of the cluster
        if kafka:  # Kafka ports: every broker's gRPC port plus one offset (how brokers name each other's)
            assert not proxied, "Kafka endpoints are derived from peer addresses, which proxies would change"
            offset = free_port_offset([b.port for b in self.brokers.values()], avoid=handed_out | {
                b.data_port for b in self.brokers.values()})
            for broker in self.brokers.values():
                broker.kafka_port = broker.port + offset
        if metrics:  # Prometheus metrics over HTTP, on a free port of each broker's own
            taken = handed_out | {p for b in self.brokers.values() for p in (b.data_port, b.kafka_port) if p}
            for broker in self.brokers.values():
                broker.metrics_port = next(p for p in iter(free_port, 0) if p not in taken)
        self.disks: dict[int, SizeLimitedDir] = {}  # set by fixtures that put data on size-limited disks
        if broker_config:  # settings for every broker, as a TOML file (e.g. lower group timeouts)
            config_path = self.root / "broker.toml"
            config_path.write_text("".join(f"{key} = {value!r}\n" if isinstance(value, str) else
                                           f"{key} = {str(value).lower()}\n" if isinstance(value, bool) else
                                           f"{key} = {value}\n" for key, value in broker_config.items()))
            for broker in self.brokers.values():
                broker.extra_args += ["--config", str(config_path)]
        for node, broker in self.brokers.items():
            for peer, other in self.brokers.items():
                if peer == node:
                    broker.peers[peer] = broker.address
                    broker.raft_peers[peer] = f"{HOST}:{broker.raft_port}"
                elif proxied:
                    # Brokers reach each other through the proxies, clients reach every broker directly, as
                    # they would across a network cut between brokers only: a client that took its metadata
                    # from a broker cut off from the others must not be sent through that broker's proxies.
                    broker.advertised_peers = {n: b.address for n, b in self.brokers.items()}
                    proxy_port = self._proxy_port_with_free_data_port()
                    proxy = FaultProxy(proxy_port, other.port, name=f"proxy {node}->{peer}", shared=self.proxy_loop)
                    self.proxies[(node, peer)] = proxy
                    self.data_proxies[(node, peer)] = FaultProxy(
                        proxy_port + self.data_port_offset, other.data_port, name=f"data proxy {node}->{peer}",
                        shared=self.proxy_loop)
                    broker.peers[peer] = proxy.address
                    raft_proxy = FaultProxy(free_port(), other.raft_port, name=f"raft proxy {node}->{peer}",
                                            shared=self.proxy_loop)
                    self.raft_proxies[(node, peer)] = raft_proxy
                    broker.raft_peers[peer] = raft_proxy.address
                else:
                    broker.peers[peer] = other.address
                    broker.raft_peers[peer] = f"{HOST}:{other.raft_port}"

    def _proxy_port_with_free_data_port(self) -> int:
        taken = {p.listen_port for p in [*self.proxies.values(), *self.data_proxies.values()]} | {
            p for b in self.brokers.values() for p in (b.port, b.raft_port, b.data_port)}
        for _ in range(200):
            port = free_port()
            data_port = port + self.data_port_offset
            if 1024 < data_port < 65536 and port_is_free(data_port) and not {port, data_port} & taken:
                return port
        raise AssertionError(f"no free pair of ports {self.data_port_offset} apart for a proxy and its data proxy")

    # ------------------------------------------------------------------------------ lifecycle

    @property
    def kafka_bootstrap(self) -> str:
        return ",".join(b.kafka_address for b in self.brokers.values())

    @property
    def bootstrap(self) -> str:
        return ",".join(b.address for b in self.brokers.values())

    def bootstrap_of(self, *nodes: int) -> str:
        return ",".join(self.brokers[n].address for n in nodes)

    def address(self, node: int) -> str:
        return self.brokers[node].address

    def all_proxies(self) -> list[tuple[tuple[int, int], FaultProxy]]:
        return [*self.proxies.items(), *self.raft_proxies.items(), *self.data_proxies.items()]

    def start(self) -> BrokerCluster:
        for _, proxy in self.all_proxies():
            proxy.start()
        for broker in self.brokers.values():
            broker.launch()
        self.wait_serving()
        return self

    def wait_serving(self, *nodes: int, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        for node in nodes or tuple(self.brokers):
            self.brokers[node].wait_serving(timeout_s)

    def kill(self, node: int) -> None:
        self.brokers[node].kill()

    def pause(self, node: int) -> None:
        self.brokers[node].pause()

    def resume(self, node: int) -> None:
        self.brokers[node].resume()

    def terminate(self, node: int, timeout_s: float = STOP_TIMEOUT_S) -> int:
        return self.brokers[node].terminate(timeout_s)

    def restart(self, node: int, wait: bool = True) -> None:
        """Start a stopped broker again on the same port with the same data directory."""
        broker = self.brokers[node]
        broker.stop()
        broker.launch()
        if wait:
            broker.wait_serving()

    def stop_all(self) -> None:
        for broker in self.brokers.values():
            broker.stop()
        for _, proxy in self.all_proxies():
            proxy.close()
        self.proxy_loop.stop()

    def __enter__(self) -> BrokerCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def live(self) -> list[int]:
        """Nodes whose process runs and is not paused."""
        return [n for n, b in self.brokers.items() if b.running and not b.paused]

    # -------------------------------------------------------------------------- network faults

    def cut_link(self, from_node: int, to_node: int, blackhole: bool = False) -> None:
        self.proxies[(from_node, to_node)].cut(blackhole)
        self.raft_proxies[(from_node, to_node)].cut(blackhole)
        self.data_proxies[(from_node, to_node)].cut(blackhole)

    def isolate(self, node: int, blackhole: bool = False) -> None:
        """Cut every link to and from `node` (needs proxied=True)."""
        assert self.proxies, "isolate() needs BrokerCluster(..., proxied=True)"
        for (a, b), proxy in self.all_proxies():
            if node in (a, b):
                proxy.cut(blackhole)

    def heal(self) -> None:
        for _, proxy in self.all_proxies():
            proxy.heal()

    # ------------------------------------------------------------------------------ metadata

    def describe(self, node: int, topic: str) -> list[PartitionInfo] | None:
        """The partitions of `topic` as a client asking broker `node` sees them, None if the call fails."""
        try:
            with Admin(self.brokers[node].address, request_timeout_ms=DESCRIBE_TIMEOUT_MS) as admin:
                return admin.describe_topics([topic])[0].partitions
        except LogbrokerError:
            return None

    def partition_view(self, node: int, topic: str, partition: int) -> ReplicaView | None:
        """What broker `node` knows of its own replica of the partition, asked of that broker alone (never
        the leader's numbers relayed): its leader, term, log end and high watermark; None if it fails."""
        conn = Connection(self.brokers[node].address)
        try:
            response = conn.admin.DescribeTopics(pb.DescribeTopicsRequest(names=[topic], local_only=True),
                                                 timeout=DESCRIBE_TIMEOUT_MS / 1000)
        except grpc.RpcError:
            return None
        finally:
            conn.close()
        if not response.topics or response.topics[0].error_code or partition >= len(response.topics[0].partitions):
            return None
        part = response.topics[0].partitions[partition]
        return ReplicaView(node, part.partition, part.leader_id, part.leader_epoch, list(part.replicas),
                           list(part.isr), part.log_start_offset, part.high_watermark, part.log_end_offset,
                           part.local_replica, response.topics[0].topic_id, part.catching_up)

    def views(self, topic: str, partition: int, nodes: list[int] | None = None) -> dict[int, ReplicaView]:
        out = {}
        for node in nodes if nodes is not None else self.live():
            view = self.partition_view(node, topic, partition)
            if view is not None:
                out[node] = view
        return out

    def metadata_view(self, node: int, topic: str, partition: int) -> tuple[int, int] | None:
        """(leader id, leader epoch = Raft term) of the partition as broker `node` reports it in Metadata."""
        conn = Connection(self.brokers[node].address)
        try:
            response = conn.broker.Metadata(pb.MetadataRequest(topics=[topic]), timeout=DESCRIBE_TIMEOUT_MS / 1000)
        except grpc.RpcError:
            return None
        finally:
            conn.close()
        parts = response.topics[0].partitions if response.topics else []
        if partition >= len(parts):
            return None
        return int(parts[partition].leader_id), int(parts[partition].leader_epoch)

    def current_leader(self, topic: str, partition: int) -> int | None:
        """The leader that the live brokers agree on, if a majority of all brokers agree and it is live."""
        views = self.views(topic, partition)
        votes: dict[int, int] = {}
        for view in views.values():
            if view.leader_id > 0:
                votes[view.leader_id] = votes.get(view.leader_id, 0) + 1
        for leader, count in votes.items():
            leader_view = views.get(leader)
            if count > self.size // 2 and leader_view is not None and leader_view.leader_id == leader:
                return leader
        return None

    def leader_of(self, topic: str, partition: int, timeout_s: float = 20.0, exclude: tuple[int, ...] = ()) -> int:
        """Wait until a majority agrees on a live leader (not in `exclude`) and return its node id."""
        found: list[int] = []

        def agreed() -> bool:
            leader = self.current_leader(topic, partition)
            if leader is None or leader in exclude:
                return False
            found.append(leader)
            return True

        wait_until(agreed, timeout_s, f"a leader of {topic}-{partition} (not in {exclude})", interval_s=0.05)
        return found[-1]

    def wait_high_watermark(self, topic: str, partition: int, node: int, offset: int, timeout_s: float = 30.0) -> None:
        """Wait until broker `node`'s own replica holds the log up to `offset` and knows it is committed."""
        def reached() -> bool:
            view = self.partition_view(node, topic, partition)
            return (view is not None and view.local_replica and view.high_watermark >= offset
                    and view.log_end_offset >= offset)

        wait_until(reached, timeout_s, f"broker {node} to reach high watermark {offset} on {topic}-{partition}",
                   interval_s=0.1)

    def wait_caught_up(self, topic: str, partition: int, nodes: list[int] | None = None,
                       timeout_s: float = 30.0) -> dict[int, ReplicaView]:
        """Wait until every given (default: every) broker's own replica holds the leader's whole log, knows
        the leader's high watermark, follows the leader and votes again (a replica that lost its state waits
        for a leader's heartbeat after it caught up), each asked of that broker itself."""
        nodes = nodes if nodes is not None else list(self.brokers)
        last: dict[int, ReplicaView] = {}

        def caught_up() -> bool:
            last.clear()
            leader = self.current_leader(topic, partition)
            if leader is None:
                return False
            last.update(self.views(topic, partition, sorted({*nodes, leader})))
            if leader not in last or any(n not in last or not last[n].local_replica for n in nodes):
                return False
            ahead = last[leader]
            return all(last[n].high_watermark == ahead.high_watermark and last[n].leader_id == leader
                       and last[n].log_end_offset == ahead.log_end_offset and not last[n].catching_up
                       for n in nodes)

        try:
            wait_until(caught_up, timeout_s, f"brokers {nodes} to catch up on {topic}-{partition}", interval_s=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last views: {last}") from None
        return dict(last)

    def leaders_of_all(self, topics: Mapping[str, int], timeout_s: float = 30.0,
                       exclude: tuple[int, ...] = ()) -> dict[tuple[str, int], int]:
        """Every partition of every topic (name -> partition count) gets a live leader a majority agrees on, all
        within one deadline; (topic, partition) -> leader."""
        deadline = time.monotonic() + timeout_s
        return {(topic, partition): self.leader_of(topic, partition, max(deadline - time.monotonic(), 0.5), exclude)
                for topic, count in topics.items() for partition in range(count)}

    def wait_all_caught_up(self, topics: Mapping[str, int], nodes: list[int] | None = None,
                           timeout_s: float = 45.0) -> None:
        """wait_caught_up for every partition of every topic, all within one deadline."""
        deadline = time.monotonic() + timeout_s
        for topic, count in topics.items():
            for partition in range(count):
                self.wait_caught_up(topic, partition, nodes, timeout_s=max(deadline - time.monotonic(), 0.5))

    def read_local_partition(self, node: int, topic: str, partition: int, high_watermark: int) -> list[Stored]:
        """The data records below high_watermark in a stopped broker's own segment files."""
        assert not self.brokers[node].running, f"broker {node} must be stopped to read its files"
        directory = self.brokers[node].data_dir / partition_dir_name(topic, partition)
        plog = PartitionLog.open(directory, LogConfig(), topic, partition)
        out: list[Stored] = []
        try:
            offset = plog.log_start_offset
            while offset < high_watermark:
                data = plog.read(offset, 1 << 20, max_offset=high_watermark)
                if not data:
                    break
                for header, batch_records in rec.iter_batches(data):
                    offset = header.base_offset + header.last_offset_delta + 1
                    if not header.is_control:
                        out.extend(Stored(r.offset, r.value or b"") for r in batch_records if r.offset < high_watermark)
        finally:
            plog.close()
        return out

    # ---------------------------------------------------------------------------------- logs

    def log_tails(self, lines: int = LOG_TAIL_LINES) -> str:
        parts = []
        for node, broker in self.brokers.items():
            state = "running" if broker.running else f"exited {broker.proc.returncode}" if broker.proc else "never run"
            parts.append(f"===== broker {node} ({broker.address}, {state}, pid "
                         f"{broker.proc.pid if broker.proc else '-'}) {broker.log_path}\n{broker.log_tail(lines)}")
        return "\n".join(parts)

    def pids(self) -> Mapping[int, int]:
        return {n: b.pid for n, b in self.brokers.items() if b.running}


@contextlib.contextmanager
def running_cluster(root: Path, **kwargs: object) -> Iterator[BrokerCluster]:
    """A started cluster, always stopped afterwards (also when starting it fails half-way)."""
    cluster = BrokerCluster(root, **kwargs)  # type: ignore[arg-type]
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop_all()
