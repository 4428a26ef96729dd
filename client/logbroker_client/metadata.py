"""Cluster metadata as a client sees it: brokers, topics, partition leaders, and connections to them."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from logbroker_client.connection import (
    DEFAULT_REQUEST_TIMEOUT_MS,
    Connection,
    bootstrap_was_given,
    parse_bootstrap,
    rpc_code,
    service_name,
    translate_rpc_error,
    unreachable_reason,
)
from logbroker_client.data_channel import DataChannel
from logbroker_client.errors import (
    LogbrokerError,
    NoBrokerAnsweredError,
    PartitionOfflineError,
    RequestTimedOutError,
    error_for,
)
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.throttle import CLIENT_ID_METADATA_KEY

log = logging.getLogger("logbroker_client.metadata")

UNREACHABLE_PENALTY_S = 2.0
DATA_PORT_RETRY_S = 5.0  # a broker's data port that could not be reached is tried again after this long
METADATA_TIMEOUT_S = 2.0
PROBE_TIMEOUT_S = 2.0  # a broker's health service answers at once, unless the broker is stuck or overloaded
RETRY_BACKOFF_S = 0.2  # between whole-request retries while a controller moves
# Liveness of a broker, as its gRPC health service answers: SERVING, NOT_SERVING (running, but starting
# or without a controller majority), nothing in time (paused, overloaded, cut off), or a refusal (down).
# Only DOWN counts as gone: a broker that is merely slow may still lead, so nothing fails fast for it.
UP, NOT_READY, NO_ANSWER, DOWN = "up", "not ready", "no answer", "down"


class MetadataCache:
    """Brokers and partition leaders from the last Metadata answer (shared by sync and async clients)."""

    call_metadata: tuple[tuple[str, str], ...] = ()  # sent with produce and fetch calls: the client id (quotas)

    def __init__(self, bootstrap: str | Sequence[str] | None, request_timeout_ms: int) -> None:
        self.bootstrap = parse_bootstrap(bootstrap)
        self.bootstrap_given = bootstrap_was_given(bootstrap)
        self.request_timeout_s = request_timeout_ms / 1000
        self._lock = threading.Lock()
        self._brokers: dict[int, str] = {}
        self._partitions: dict[str, list[pb.PartitionMetadata]] = {}
        self._unreachable_until: dict[str, float] = {}
        self._leaderless_until: dict[str, float] = {}
        self._data_ports: dict[str, int] = {}  # broker address -> its data port, where Metadata names one
        self._data_port_failed_at: dict[str, float] = {}  # address -> when its data port last could not be used
        self._data_channels: dict[str, Any] = {}  # address -> its open DataChannel (AsyncDataChannel for asyncio)

    def addresses(self, for_metadata: bool = False) -> list[str]:
        """Known brokers first, then bootstrap addresses; any that just failed go last (and, when asking for
        metadata, any that just could not name a leader)."""
        candidates = list(dict.fromkeys([*self._brokers.values(), *self.bootstrap]))
        now = time.monotonic()

        def doubt(address: str) -> tuple[bool, bool]:
            unreachable = self._unreachable_until.get(address, 0.0) > now
            leaderless = for_metadata and self._leaderless_until.get(address, 0.0) > now
            return unreachable, leaderless

        return sorted(candidates, key=doubt)

    def mark_unreachable(self, address: str) -> None:
        """A call to address failed to connect: ask the others first for a while."""
        self._unreachable_until[address] = time.monotonic() + UNREACHABLE_PENALTY_S

    def is_unreachable(self, address: str) -> bool:
        return self._unreachable_until.get(address, 0.0) > time.monotonic()

    def mark_leaderless(self, address: str) -> None:
        """That broker could not name a partition's leader (it may be cut off from its peers): take metadata
        from the others first for a while, but keep sending to it if it is the only one that answers."""
        self._leaderless_until[address] = time.monotonic() + UNREACHABLE_PENALTY_S

    def apply(self, response: pb.MetadataResponse) -> None:
        with self._lock:
            self._brokers = {b.node_id: f"{b.host}:{b.port}" for b in response.brokers}
            self._data_ports = {f"{b.host}:{b.port}": b.data_port for b in response.brokers if b.data_port}
            for topic in response.topics:
                if topic.error_code:
                    self._partitions.pop(topic.name, None)
                else:
                    self._partitions[topic.name] = sorted(topic.partitions, key=lambda p: p.partition)

    @property
    def client_id(self) -> str:
        return dict(self.call_metadata).get(CLIENT_ID_METADATA_KEY, "")

    def data_channel_or_address(self, address: str) -> tuple[Any, tuple[str, int] | None]:
        """(the open data channel to the broker, None), else (None, the (host, port) to open one at) if Metadata
        names the broker's data port and it has not failed to connect within the last DATA_PORT_RETRY_S, else
        (None, None): use gRPC."""
        channel = self._data_channels.get(address)
        if channel is not None and not channel.closed:
            return channel, None
        return None, self._data_address_to_try(address)

    def _data_address_to_try(self, address: str) -> tuple[str, int] | None:
        port = self._data_ports.get(address)
        if port is None:
            return None
        failed_at = self._data_port_failed_at.get(address)
        if failed_at is not None and time.monotonic() - failed_at < DATA_PORT_RETRY_S:
            return None
        return address.rpartition(":")[0], port

    def data_port_failed(self, address: str, error: LogbrokerError) -> None:
        if address not in self._data_port_failed_at:
            log.warning("%s; using its gRPC port instead (trying the data port again every %.0f s)",
                        error, DATA_PORT_RETRY_S)
        self._data_port_failed_at[address] = time.monotonic()

    def data_port_reached(self, address: str, channel: Any) -> None:
        self._data_port_failed_at.pop(address, None)
        self._data_channels[address] = channel

    def close_data_channels(self) -> None:
        for channel in self._data_channels.values():
            channel.close()
        self._data_channels.clear()

    def retry_topic_after(self, response: pb.MetadataResponse, topic: str, deadline: float) -> float | None:
        """After a Metadata answer asked for `topic`: None when it names the topic, the seconds to wait before
        asking again when its error is retriable (a broker that has just started and is still loading the cluster
        metadata) and the deadline allows; otherwise raises that error (UnknownTopicOrPartitionError, ...)."""
        try:
            self.check_topic(response, topic)
            return None
        except LogbrokerError as exc:
            if not exc.retriable or time.monotonic() + RETRY_BACKOFF_S >= deadline:
                raise
        return RETRY_BACKOFF_S

    def fetched_count(self, topic: str) -> int:
        """The partition count a Metadata answer just gave for `topic`."""
        count = self.cached_count(topic)
        if count is None:
            raise LogbrokerError(f"broker returned no metadata for topic {topic!r}")
        return count

    def cached_count(self, topic: str) -> int | None:
        parts = self._partitions.get(topic)
        return None if parts is None else len(parts)

    @staticmethod
    def check_topic(response: pb.MetadataResponse, topic: str) -> None:
        for t in response.topics:
            if t.name == topic and t.error_code:
                raise error_for(t.error_code, t.error_message, topic)

    def leader_address(self, topic: str, partition: int) -> str | None:
        parts = self._partitions[topic]
        if not 0 <= partition < len(parts):
            raise error_for(
                pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                f"topic {topic!r} has partitions 0..{len(parts) - 1}; partition {partition} does not exist",
                topic, partition,
            )
        return self._brokers.get(parts[partition].leader_id)

    def invalidate(self, topic: str) -> None:
        with self._lock:
            self._partitions.pop(topic, None)

    def broker_addresses(self) -> dict[int, str]:
        return dict(self._brokers)

    def replicas_of(self, topic: str, partition: int) -> list[int]:
        parts = self._partitions.get(topic)
        return list(parts[partition].replicas) if parts and 0 <= partition < len(parts) else []

    def suspect_offline(self, topic: str, partition: int) -> bool:
        """Worth asking the replicas whether any is up: no leader is known, or the leader just did not answer."""
        parts = self._partitions.get(topic)
        if not parts or not 0 <= partition < len(parts):
            return False
        leader = self._brokers.get(parts[partition].leader_id)
        return leader is None or self.is_unreachable(leader)

    def offline_error(self, topic: str, partition: int, states: Mapping[int, str]) -> PartitionOfflineError | None:
        """The error for a partition none of whose replicas answers, or None while any of them does."""
        replicas = self.replicas_of(topic, partition)
        if not replicas or any(states.get(node, DOWN) != DOWN for node in replicas):
            return None
        where = ", ".join(f"{node} ({self._brokers.get(node, 'address unknown')})" for node in replicas)
        if len(replicas) == 1:
            what = f"its only replica is on broker {where}, which is down"
            until = f"broker {replicas[0]} is back"
        else:
            what = f"its replicas are on brokers {where}, and all of them are down"
            until = "a majority of them is back"
        return PartitionOfflineError(
            f"{topic}-{partition} is offline: {what}; nothing can be written to it or read from it until {until}. "
            "Start the broker again, then retry", topic, partition)

    def no_broker_answered(self, failures: Mapping[str, str]) -> NoBrokerAnsweredError:
        """The error when every address tried failed: names them, and says what to check."""
        reasons = set(failures.values())
        if len(reasons) == 1:
            tried = f"{', '.join(failures)} ({reasons.pop()})"
        else:
            tried = ", ".join(f"{address} ({why})" for address, why in failures.items())
        if all(is_loopback(address) for address in failures):
            hint = "is it running? `make run` (or `logbroker dev`) starts a local cluster"
        else:
            hint = "check that the brokers run and that this machine can reach them"
        if not self.bootstrap_given:
            hint += (f"; no broker was named, so the default {','.join(self.bootstrap)} was tried: "
                     "set LOGBROKER_BOOTSTRAP or pass --bootstrap HOST:PORT")
        return NoBrokerAnsweredError(f"cannot reach a broker at {tried}; {hint}")


def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def health_state(response: Any, error: grpc.RpcError | None) -> str:
    """UP, NOT_READY, NO_ANSWER or DOWN from a health Check's answer or error."""
    if error is not None:
        code = rpc_code(error)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return NO_ANSWER
        # A broker that answers with any status other than "unavailable" is running (it may lack the service).
        return DOWN if code == grpc.StatusCode.UNAVAILABLE else UP
    return UP if response.status == health_pb2.HealthCheckResponse.SERVING else NOT_READY


def _health_of(call: Any) -> str:
    try:
        return health_state(call.result(), None)
    except grpc.RpcError as exc:
        return health_state(None, exc)


class ClusterMetadata(MetadataCache):
    """Thread-safe: the producer's sender thread and the caller's thread both ask for leaders."""

    def __init__(self, bootstrap: str | Sequence[str] | None, request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS):
        super().__init__(bootstrap, request_timeout_ms)
        self._connections: dict[str, Connection] = {}

    def data_channel(self, address: str) -> DataChannel | None:
        """A connection to the broker's data port, or None: the broker names none, or it could not be reached
        lately (the caller then uses gRPC; a warning says why, once per broker)."""
        with self._lock:
            channel, data_address = self.data_channel_or_address(address)
            if data_address is None:
                return channel
            try:
                channel = DataChannel(address, data_address, self.client_id)
            except LogbrokerError as exc:
                self.data_port_failed(address, exc)
                return None
            self.data_port_reached(address, channel)
            return channel

    def connection(self, address: str) -> Connection:
        with self._lock:
            conn = self._connections.get(address)
            if conn is None:
                conn = self._connections[address] = Connection(address)
            return conn

    def any_connection(self) -> Connection:
        """A connection to the broker most likely to answer (one that has not just failed)."""
        return self.connection(self.addresses()[0])

    def call(self, method: str, request: Any, *, admin: bool = False, attempt_timeout_s: float | None = None,
             check: Callable[[Any], None] | None = None, service: str = "") -> Any:
        """A whole request to the first broker that answers, trying every known address in turn. An answer that
        `check` finds retriable (a controller that is moving) is asked again until the request timeout."""
        deadline = time.monotonic() + self.request_timeout_s
        while True:
            try:
                response = self._first_answer(method, request, service_name(admin, service), attempt_timeout_s,
                                              deadline)
                if check is not None:
                    check(response)
                return response
            except LogbrokerError as exc:
                if (not exc.retriable or isinstance(exc, NoBrokerAnsweredError)
                        or time.monotonic() + RETRY_BACKOFF_S >= deadline):
                    raise
                log.info("%s: %s; retrying in %.0f ms", method, exc, RETRY_BACKOFF_S * 1000)
                time.sleep(RETRY_BACKOFF_S)

    def _first_answer(self, method: str, request: Any, service: str, attempt_timeout_s: float | None,
                      deadline: float) -> Any:
        failures: dict[str, str] = {}
        candidates = self.addresses(for_metadata=True)
        for address in candidates:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            timeout_s = remaining if attempt_timeout_s is None else min(remaining, attempt_timeout_s)
            conn = self.connection(address)
            try:
                return getattr(getattr(conn, service), method)(request, timeout=timeout_s)
            except grpc.RpcError as exc:
                code = rpc_code(exc)
                # A capped attempt that ran out of time: that broker is stuck, another may answer.
                stuck = code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout_s < remaining
                if code != grpc.StatusCode.UNAVAILABLE and not stuck:
                    raise translate_rpc_error(exc, address) from None
                self.mark_unreachable(address)
                failures[address] = unreachable_reason(exc)
        if len(failures) == len(candidates):
            raise self.no_broker_answered(failures)
        raise RequestTimedOutError(f"{method}: no broker answered within {self.request_timeout_s:g}s "
                                   f"(tried {', '.join(failures) or 'none'})")

    def refresh(self, topics: Sequence[str] = ()) -> pb.MetadataResponse:
        """Ask each broker in turn until one answers; a dead or paused one costs at most a short timeout."""
        response: pb.MetadataResponse = self.call("Metadata", pb.MetadataRequest(topics=list(topics)),
                                                  attempt_timeout_s=min(self.request_timeout_s, METADATA_TIMEOUT_S))
        self.apply(response)
        return response

    def probe(self, addresses: Sequence[str], timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, str]:
        """Ask every address's health service at once: UP, NOT_READY, NO_ANSWER or DOWN each."""
        calls = {address: self.connection(address).health.Check.future(health_pb2.HealthCheckRequest(),
                                                                        timeout=timeout_s)
                 for address in dict.fromkeys(addresses)}
        return {address: _health_of(call) for address, call in calls.items()}

    def brokers(self) -> dict[int, str]:
        """node id -> HOST:PORT of every broker, as the last Metadata answer (or a new one) lists them."""
        if not self._brokers:
            self.refresh()
        return self.broker_addresses()

    def broker_states(self) -> dict[int, str]:
        """Each broker of the cluster (as Metadata lists them) and whether it answers now."""
        brokers = self.brokers()
        states = self.probe(list(brokers.values()))
        return {node: states[address] for node, address in brokers.items()}

    def raise_if_offline(self, topic: str, partition: int) -> None:
        """Fail at once, naming the replicas, when the partition has no leader and none of its replicas answers."""
        if not self.suspect_offline(topic, partition):
            return
        brokers = self.broker_addresses()
        replicas = {node: brokers[node] for node in self.replicas_of(topic, partition) if node in brokers}
        states = self.probe(list(replicas.values()))
        error = self.offline_error(topic, partition, {node: states[a] for node, a in replicas.items()})
        if error is not None:
            raise error

    def partitions_for(self, topic: str) -> int:
        """Number of partitions; raises UnknownTopicOrPartitionError with the broker's message (see
        MetadataCache.retry_topic_after: a retriable answer is asked again within the request timeout)."""
        count = self.cached_count(topic)
        if count is None:
            deadline = time.monotonic() + self.request_timeout_s
            while (wait_s := self.retry_topic_after(self.refresh([topic]), topic, deadline)) is not None:
                time.sleep(wait_s)
            count = self.fetched_count(topic)
        return count

    def leader_connection(self, topic: str, partition: int) -> Connection:
        if partition >= self.partitions_for(topic):
            self.refresh([topic])  # partitions added since the last refresh (a group may hand them out first)
        address = self.leader_address(topic, partition)
        return self.any_connection() if address is None else self.connection(address)

    def close(self) -> None:
        with self._lock:
            for conn in self._connections.values():
                conn.close()
            self._connections.clear()
            self.close_data_channels()
