"""Broker configuration: defaults as named constants, a TOML file, and flags that win over it."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from logbroker_client.data_wire import DEFAULT_DATA_PORT_OFFSET

from logbroker.cluster.peer_auth import ClusterSecretError, check_secret
from logbroker.cluster.raft_storage import DEFAULT_RAFT_ENTRY_CACHE_BYTES

DEFAULT_LISTEN = "127.0.0.1:9092"
DEFAULT_NODE_ID = 1
DEFAULT_PARTITIONS = 1
# 0: min(3, live brokers) at creation time, as a serious deployment wants (Kafka's
# default.replication.factor, which a cluster of three sets to 3).
DEFAULT_REPLICATION_FACTOR = 0
# The largest request a broker takes, in bytes. gRPC copies a request on the event loop thread before any
# handler runs, and that cost grows faster than the size (measured: 16 MiB ~40 ms, 32 MiB ~90 ms, 64 MiB
# ~300 ms); a broker whose loop stalls past the liveness timeout loses its leaderships. Producers send at
# most 16 MiB per request by default.
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
# Fetch answers: the broker's caps over whatever a request asks for (a first batch larger than the cap
# still goes alone, so a consumer is never stuck behind it).
DEFAULT_MAX_FETCH_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PARTITION_FETCH_BYTES = 4 * 1024 * 1024
# HTTP/2 streams (concurrent requests) one client connection may hold open; a client that wants more
# waits for a free one, so a few connections cannot pin thousands of half-sent requests.
DEFAULT_MAX_CONCURRENT_STREAMS = 100
DEFAULT_MAX_FETCH_WAIT_MS = 30_000
DEFAULT_RETENTION_CHECK_INTERVAL_MS = 60_000
DEFAULT_LEADER_BALANCE_INTERVAL_MS = 10_000
DEFAULT_SHUTDOWN_GRACE_MS = 5_000
DEFAULT_FLUSH_THREADS = 8  # fsyncs of different partitions proceed in parallel on the device
# One tick drives every Raft group on the broker. Busy groups heartbeat every 2 ticks and elect after
# 10-20 silent ticks; idle groups go quiet, and a broker silent for 8 ticks (400 ms) is declared down,
# which starts the elections of the groups it led at once.
DEFAULT_RAFT_TICK_MS = 50
DEFAULT_RAFT_ELECTION_TICKS = 10
DEFAULT_RAFT_HEARTBEAT_TICKS = 2
DEFAULT_LIVENESS_TIMEOUT_TICKS = 8
CLUSTER_SECRET_ENV = "LOGBROKER_CLUSTER_SECRET"
# Consumer groups: __consumer_offsets is created on first use with this many partitions (Kafka: 50; a
# Python broker runs a Raft group per partition, so fewer). The session timeout is Kafka's default; members
# heartbeat every 500 ms (Kafka: 5 s), so a join or a leave settles in well under a second.
DEFAULT_OFFSETS_TOPIC_PARTITIONS = 8
DEFAULT_GROUP_SESSION_TIMEOUT_MS = 45_000
DEFAULT_GROUP_HEARTBEAT_INTERVAL_MS = 500
DEFAULT_OFFSETS_RETENTION_MINUTES = 7 * 24 * 60
# The offsets log is kept bounded by snapshots: once this much was written since the last one (and twice the
# live state), the coordinator writes a snapshot and the segments below it are deleted.
DEFAULT_OFFSETS_SNAPSHOT_TRIGGER_BYTES = 2 << 20
DEFAULT_OFFSETS_SEGMENT_BYTES = 1 << 20
# Backpressure (see logbroker/server/quotas.py): the produce requests a broker handles at once hold at most this
# many bytes; past it a request waits up to DEFAULT_PRODUCE_BACKPRESSURE_WAIT_MS for room, then is answered
# "retry" with a throttle time. 128 MiB is eight of the largest requests (max_request_bytes).
DEFAULT_MAX_INFLIGHT_PRODUCE_BYTES = 128 * 1024 * 1024
DEFAULT_PRODUCE_BACKPRESSURE_WAIT_MS = 5_000
# A produce is refused while the data directory's disk has less free space than this (0: no floor), so the
# disk never fills half-way through a write.
DEFAULT_MIN_FREE_DISK_BYTES = 100 * 1024 * 1024
# A broker's Raft port (for the other brokers) is its client port plus this, unless --raft-listen says otherwise.
DEFAULT_RAFT_PORT_OFFSET = 300
MAX_PORT = 65535
DATA_PORT_OFF = "off"  # --data-listen off: no data port (clients use gRPC for everything)


class BrokerConfigError(ValueError):
    """A setting is missing or wrong; the message names it and says what is allowed."""


@dataclass
class BrokerConfig:
    data_dir: Path = Path("./data")
    listen: str = DEFAULT_LISTEN
    node_id: int = DEFAULT_NODE_ID
    default_partitions: int = DEFAULT_PARTITIONS
    default_replication_factor: int = DEFAULT_REPLICATION_FACTOR
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_fetch_bytes: int = DEFAULT_MAX_FETCH_BYTES
    max_partition_fetch_bytes: int = DEFAULT_MAX_PARTITION_FETCH_BYTES
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS
    raft_entry_cache_bytes: int = DEFAULT_RAFT_ENTRY_CACHE_BYTES
    max_fetch_wait_ms: int = DEFAULT_MAX_FETCH_WAIT_MS
    retention_check_interval_ms: int = DEFAULT_RETENTION_CHECK_INTERVAL_MS
    leader_balance_interval_ms: int = DEFAULT_LEADER_BALANCE_INTERVAL_MS
    shutdown_grace_ms: int = DEFAULT_SHUTDOWN_GRACE_MS
    flush_threads: int = DEFAULT_FLUSH_THREADS
    # Small appends' fsyncs in native threads (cluster/fsync_threads.py) when the C extension was built; false:
    # every write and fsync in the Python flush pool, as brokers without the extension do.
    native_fsync: bool = True
    # The brokers of the cluster, node id -> HOST:PORT, this one included; empty means a cluster of one.
    peers: dict[int, str] = field(default_factory=dict)
    # The Raft port, for the other brokers only (cluster/raft_wire.py): HOST:PORT, by default the --listen host
    # and port plus DEFAULT_RAFT_PORT_OFFSET. Every broker's Raft port is its --peers port plus the same offset,
    # unless raft_peers names each broker's Raft address (node id -> HOST:PORT, e.g. behind a proxy or NAT).
    raft_listen: str = ""
    raft_peers: dict[int, str] = field(default_factory=dict)
    # What clients are told to use for each broker (Metadata, a NOT_LEADER's hint, a group's coordinator), node
    # id -> HOST:PORT, as Kafka's advertised listeners: by default --peers. For brokers that reach each other at
    # other addresses than clients reach them (a proxy or NAT between brokers, a network of their own).
    advertised_peers: dict[int, str] = field(default_factory=dict)
    # The data port, for clients' Produce, Fetch and ListOffsets as plain frames (logbroker_client/data_wire.py):
    # HOST:PORT, by default the --listen host and port plus DEFAULT_DATA_PORT_OFFSET; "off" for none (clients then
    # use gRPC for everything). Every broker's data port is its --peers port plus the same offset: brokers name
    # each other's data ports in Metadata from that.
    data_listen: str = ""
    raft_tick_ms: int = DEFAULT_RAFT_TICK_MS
    raft_election_ticks: int = DEFAULT_RAFT_ELECTION_TICKS
    raft_heartbeat_ticks: int = DEFAULT_RAFT_HEARTBEAT_TICKS
    liveness_timeout_ticks: int = DEFAULT_LIVENESS_TIMEOUT_TICKS
    # Defaults for every topic's log, in Kafka's key spelling ("segment.bytes", "flush", ...).
    log_defaults: dict[str, str] = field(default_factory=dict)
    offsets_topic_partitions: int = DEFAULT_OFFSETS_TOPIC_PARTITIONS
    group_session_timeout_ms: int = DEFAULT_GROUP_SESSION_TIMEOUT_MS
    group_heartbeat_interval_ms: int = DEFAULT_GROUP_HEARTBEAT_INTERVAL_MS
    offsets_retention_minutes: int = DEFAULT_OFFSETS_RETENTION_MINUTES
    offsets_snapshot_trigger_bytes: int = DEFAULT_OFFSETS_SNAPSHOT_TRIGGER_BYTES
    offsets_segment_bytes: int = DEFAULT_OFFSETS_SEGMENT_BYTES
    # Shared by every broker of a cluster; peer RPCs without it are refused (see cluster/peer_auth.py).
    # Set through cluster_secret_file (or --cluster-secret-file) or $LOGBROKER_CLUSTER_SECRET.
    cluster_secret: str = field(default="", repr=False)
    cluster_secret_file: Path | None = None
    # Kafka's wire protocol (logbroker.kafka): HOST:PORT, empty for none. Every broker's Kafka port must be its
    # gRPC port plus the same offset: brokers name each other's Kafka endpoints in Metadata from that.
    kafka_listen: str = ""
    kafka_auto_create_topics: bool = False  # Metadata for an unknown topic creates it (Kafka's auto.create)
    # Prometheus metrics over HTTP (GET /metrics): HOST:PORT, empty for none.
    metrics_listen: str = ""
    max_inflight_produce_bytes: int = DEFAULT_MAX_INFLIGHT_PRODUCE_BYTES
    produce_backpressure_wait_ms: int = DEFAULT_PRODUCE_BACKPRESSURE_WAIT_MS
    min_free_disk_bytes: int = DEFAULT_MIN_FREE_DISK_BYTES
    # Byte-rate quotas per client id, per broker (Kafka's client quotas); 0 is unlimited. The defaults apply to
    # every client id without its own entry in client_quotas: {client id: {"produce_bytes_per_s": N,
    # "fetch_bytes_per_s": N}} (a [client_quotas."ID"] table in the TOML file, or --client-quota flags).
    quota_produce_bytes_per_s: int = 0
    quota_fetch_bytes_per_s: int = 0
    client_quotas: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.listen)[1]

    def peer_addresses(self) -> dict[int, str]:
        return dict(self.peers) if self.peers else {self.node_id: self.listen}

    def client_addresses(self) -> dict[int, str]:
        """Each broker's address as clients are to reach it: advertised_peers, else the --peers addresses."""
        return dict(self.advertised_peers) if self.advertised_peers else self.peer_addresses()

    def raft_listen_address(self) -> tuple[str, int]:
        if self.raft_listen:
            return split_host_port(self.raft_listen)
        host, port = split_host_port(self.listen)
        return host, port + DEFAULT_RAFT_PORT_OFFSET

    def data_listen_address(self) -> tuple[str, int] | None:
        if self.data_listen == DATA_PORT_OFF:
            return None
        if self.data_listen:
            return split_host_port(self.data_listen)
        host, port = split_host_port(self.listen)
        if port + DEFAULT_DATA_PORT_OFFSET > MAX_PORT:  # a high client port: no data port unless one is named
            return None
        return host, port + DEFAULT_DATA_PORT_OFFSET

    def data_port_of(self, peer_address: str) -> int:
        """The data port of the broker at peer_address (this one's offset applied), 0 for none."""
        offset = self.data_port_offset()
        port = 0 if offset is None else split_host_port(peer_address)[1] + offset
        return port if 0 < port <= MAX_PORT else 0

    def data_port_offset(self) -> int | None:
        """What to add to a broker's --peers port for its data port (None: no data ports in this cluster)."""
        address = self.data_listen_address()
        return None if address is None else address[1] - self.port

    def raft_peer_addresses(self) -> dict[int, str]:
        """Every broker's Raft port, node id -> HOST:PORT: raft_peers, else each --peers port plus this broker's
        offset between its Raft port and its --listen port (the same on every broker, as Kafka ports are)."""
        if self.raft_peers:
            return dict(self.raft_peers)
        offset = self.raft_listen_address()[1] - self.port
        addresses = {}
        for node, address in self.peer_addresses().items():
            host, port = split_host_port(address)
            addresses[node] = f"{host}:{port + offset}"
        return addresses

    def _check_raft_addresses(self) -> None:
        if len(self.peers) < 2:
            return  # a cluster of one has no peers to talk Raft with: no Raft port
        if self.raft_peers and set(self.raft_peers) != set(self.peers):
            raise BrokerConfigError(f"raft_peers names nodes {sorted(self.raft_peers)} but --peers names "
                                    f"{sorted(self.peers)}; give every broker's Raft address, or none")
        for address in [self.raft_listen or f"{self.host}:{self.raft_listen_address()[1]}",
                        *self.raft_peer_addresses().values()]:
            host, sep, port = address.rpartition(":")
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise BrokerConfigError(
                    f"the Raft address {address} is not a usable port (Raft ports default to each broker's port "
                    f"plus {DEFAULT_RAFT_PORT_OFFSET}); set --raft-listen HOST:PORT (and --raft-peers if the "
                    "brokers' offsets differ)")

    def validate(self) -> BrokerConfig:
        split_host_port(self.listen)
        if self.kafka_listen:
            split_host_port(self.kafka_listen)
        if self.metrics_listen:
            split_host_port(self.metrics_listen)
        check_peer_addresses(self.peers, "peers")
        check_peer_addresses(self.raft_peers, "raft_peers")
        check_peer_addresses(self.advertised_peers, "advertised_peers")
        if self.advertised_peers and set(self.advertised_peers) != set(self.peer_addresses()):
            raise BrokerConfigError(f"advertised_peers names nodes {sorted(self.advertised_peers)} but --peers names "
                                    f"{sorted(self.peer_addresses())}; name every broker for clients, or none")
        self._check_raft_addresses()
        if self.data_listen and self.data_listen != DATA_PORT_OFF:
            split_host_port(self.data_listen)
        if self.peers and self.node_id not in self.peers:
            raise BrokerConfigError(
                f"node id {self.node_id} is not among the peers {sorted(self.peers)}; "
                "--peers must list every broker, this one included")
        if self.raft_election_ticks <= self.raft_heartbeat_ticks:
            raise BrokerConfigError("raft_election_ticks must exceed raft_heartbeat_ticks")
        self._load_secret()
        if self.default_replication_factor < 0:
            raise BrokerConfigError("default_replication_factor must be 0 (min(3, live brokers)) or more, got "
                                    f"{self.default_replication_factor}")
        for name in ("default_partitions", "max_request_bytes", "max_fetch_bytes", "max_partition_fetch_bytes",
                     "max_concurrent_streams", "raft_entry_cache_bytes", "flush_threads",
                     "offsets_topic_partitions", "group_session_timeout_ms", "group_heartbeat_interval_ms",
                     "offsets_retention_minutes", "offsets_snapshot_trigger_bytes", "offsets_segment_bytes"):
            if getattr(self, name) < 1:
                raise BrokerConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not isinstance(self.native_fsync, bool):
            raise BrokerConfigError(f"native_fsync must be true or false, got {self.native_fsync!r}")
        self._check_backpressure()
        return self

    def _check_backpressure(self) -> None:
        for name in ("max_inflight_produce_bytes", "produce_backpressure_wait_ms"):
            if getattr(self, name) < 1:
                raise BrokerConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("min_free_disk_bytes", "quota_produce_bytes_per_s", "quota_fetch_bytes_per_s"):
            if getattr(self, name) < 0:
                raise BrokerConfigError(f"{name} must be 0 (none) or more, got {getattr(self, name)}")
        for client_id, rates in self.client_quotas.items():
            unknown = sorted(set(rates) - set(CLIENT_QUOTA_KEYS))
            if unknown or any(not isinstance(v, int) or v < 0 for v in rates.values()):
                raise BrokerConfigError(
                    f"client_quotas for {client_id!r}: {rates} is not a table of {' and '.join(CLIENT_QUOTA_KEYS)} "
                    "(bytes per second, 0 for unlimited)")


    def _load_secret(self) -> None:
        if self.cluster_secret_file is not None:
            try:
                self.cluster_secret = Path(self.cluster_secret_file).read_text()
            except OSError as exc:
                raise BrokerConfigError(f"cannot read the cluster secret file {self.cluster_secret_file}: "
                                        f"{exc.strerror}") from None
        elif not self.cluster_secret:
            self.cluster_secret = os.environ.get(CLUSTER_SECRET_ENV, "")
        if self.cluster_secret:
            try:
                self.cluster_secret = check_secret(self.cluster_secret)
            except ClusterSecretError as exc:
                raise BrokerConfigError(str(exc)) from None
        elif len(self.peers) > 1:
            raise BrokerConfigError(
                f"a cluster of {len(self.peers)} brokers needs a shared secret, so that only its brokers can speak "
                f"as brokers: put the same secret in a file on every broker and pass --cluster-secret-file FILE "
                f"(or set ${CLUSTER_SECRET_ENV}); `logbroker dev` does this itself")


CLIENT_QUOTA_KEYS = ("produce_bytes_per_s", "fetch_bytes_per_s")


def parse_client_quota(text: str) -> tuple[str, dict[str, int]]:
    """'ID:produce=N,fetch=N' (bytes per second; either may be left out) -> (ID, {"produce_bytes_per_s": N, ...})."""
    client_id, sep, rates = text.rpartition(":")
    parsed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in rates.split(","))):
        direction, eq, value = item.partition("=")
        key = f"{direction.strip()}_bytes_per_s"
        if not eq or key not in CLIENT_QUOTA_KEYS or not value.strip().isdigit():
            parsed = {}
            break
        parsed[key] = int(value)
    if not sep or not client_id or not parsed:
        raise BrokerConfigError(f"client quota {text!r} is not CLIENT_ID:produce=BYTES_PER_S,fetch=BYTES_PER_S "
                                "(for example billing:produce=1048576)")
    return client_id, parsed


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise BrokerConfigError(f"address {address!r} is not HOST:PORT (for example 127.0.0.1:9092)")
    return host, int(port)


def check_peer_addresses(peers: dict[int, str], what: str) -> None:
    """Each broker's address in a map of them: HOST:PORT with a port of 1-65535 and a host, not a URL; no two
    brokers at one address (a client, or a peer, sent to one would reach the other)."""
    at: dict[str, int] = {}
    for node, address in peers.items():
        host, port = split_host_port(address)
        if port == 0 or "/" in host:
            raise BrokerConfigError(f"{what}: broker {node}'s address {address!r} is not HOST:PORT with a port of "
                                    "1-65535 (for example 10.0.0.2:9092)")
        if address in at:
            raise BrokerConfigError(f"{what}: brokers {at[address]} and {node} are both at {address}; each broker "
                                    "needs an address of its own")
        at[address] = node


def parse_peers(text: str) -> dict[int, str]:
    """'1=host:port,2=host:port' -> {1: 'host:port', 2: 'host:port'}."""
    peers: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        node, sep, address = item.partition("=")
        if not sep or not node.strip().isdigit():
            raise BrokerConfigError(f"peer {item!r} is not ID=HOST:PORT (for example 1=127.0.0.1:9092)")
        split_host_port(address.strip())
        if int(node) in peers:
            raise BrokerConfigError(f"node {int(node)} is named twice in {text!r}")
        peers[int(node)] = address.strip()
    return peers


def _peer_table(key: str, value: object) -> dict[int, str]:
    """A peer map from the TOML file: a table of node id = "HOST:PORT", or a string like "1=HOST:PORT,2=..."."""
    if isinstance(value, str):
        return parse_peers(value)
    if not isinstance(value, dict):
        raise BrokerConfigError(f"{key} must be a table of node id = \"HOST:PORT\" or a string \"1=HOST:PORT,...\", "
                                f"not {type(value).__name__}")
    table: dict[int, str] = {}
    for node, address in value.items():
        if not str(node).strip().isdigit() or not isinstance(address, str):
            raise BrokerConfigError(f"{key}: {node!r} = {address!r} is not a node id = \"HOST:PORT\"")
        table[int(node)] = address
    return table


def load_config(path: Path | None, overrides: dict[str, Any]) -> BrokerConfig:
    """Read the TOML file (if any), then apply flag overrides that were given (not None)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise BrokerConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise BrokerConfigError(f"config file {path} is not valid TOML: {exc}") from None
    known = {f.name for f in fields(BrokerConfig)}
    log_table = values.pop("log", {})
    unknown = sorted(set(values) - known)
    if unknown:
        raise BrokerConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}; known: {sorted(known)}")
    file_quotas = values.get("client_quotas", {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["client_quotas"] = {str(k): dict(v) for k, v in {**file_quotas, **(overrides.get("client_quotas") or {})
                                                              }.items()}  # a flag's client wins over the file's
    for key in ("peers", "raft_peers", "advertised_peers"):
        if values.get(key) is not None:
            values[key] = _peer_table(key, values[key])
    if "data_dir" in values:
        values["data_dir"] = Path(values["data_dir"])
    if values.get("cluster_secret_file") is not None:
        values["cluster_secret_file"] = Path(values["cluster_secret_file"])
    values["log_defaults"] = {str(k): str(v) for k, v in {**log_table, **values.get("log_defaults", {})}.items()}
    return BrokerConfig(**values).validate()
