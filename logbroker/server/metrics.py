"""Prometheus metrics of one broker: a registry of its own, hooks for the hot path, and a collector that
reads the broker's state when scraped.

Every broker owns a CollectorRegistry (never the process-wide default one: tests run several brokers in one
process). What moves with traffic is counted on the event loop as it happens, at O(1) per request or per
batch, never per record: produce and fetch records and bytes (plain integers in dicts), request latencies and
fsync latencies (prometheus_client histograms, whose observe() is thread-safe: fsyncs run in the flush
threads). Everything else (offsets, sizes, leaderships, in-sync sets, offline partitions, consumer-group lag,
queue depths) is a gauge read from the broker's own structures by BrokerStateCollector.collect() at scrape
time, so the hot path does no work for it (share groups are described just before, in refresh_share_states).

Names: prefix logbroker_, units last (_seconds, _bytes, _total). Labels: topic and partition; group; protocol
("grpc", "data" for the data port, or "kafka") and api (the gRPC method or Kafka API name); error (an
ErrorCode name, or a gRPC status).
The alert rules (deploy/prometheus/alerts.yml) and the dashboard (deploy/grafana/) use these names; a test
checks that each of them appears in a real scrape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from logbroker_client import records as rec
from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from logbroker.server.broker import Broker

log = logging.getLogger("logbroker.metrics")

# No <name>_created series beside every counter and histogram: they double what a scrape carries and no alert
# or panel here uses them. (A process-wide switch of prometheus_client; the broker process is ours.)
disable_created_metrics()

PREFIX = "logbroker_"
# Request latency: from well under a millisecond (metadata, a produce with acks=1) to a long-polled fetch that
# waits out its max wait (up to max_fetch_wait_ms, 30 s).
REQUEST_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# How late the broker's Raft tick ran (the event loop held up): a tick is 50 ms, a peer's liveness timeout 400 ms.
LOOP_STALL_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 5.0)
FSYNC_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

TP = tuple[str, int]
# Asks a broker at an address for the high watermarks of topics it leads: {(topic, partition): offset}.
HighWatermarkSource = Callable[[str, Sequence[str]], Awaitable[dict[TP, int]]]


class BrokerMetrics:
    """The metrics of one broker. The hooks are called on the broker's event loop, except observe_fsync."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.registry = CollectorRegistry(auto_describe=False)
        self.request_seconds = Histogram(
            f"{PREFIX}request_duration_seconds", "Time to answer a request, from its arrival to its answer "
            "(a long-polled fetch includes its wait), per protocol and API", ["protocol", "api"],
            buckets=REQUEST_BUCKETS_S, registry=self.registry)
        self.fsync_seconds = Histogram(
            f"{PREFIX}fsync_duration_seconds", "Time to fsync a partition log (its segments, indexes and "
            "recovery checkpoint), per flush that made new data durable", buckets=FSYNC_BUCKETS_S,
            registry=self.registry)
        self.loop_stall_seconds = Histogram(
            f"{PREFIX}event_loop_stall_seconds", "How late each Raft tick ran, i.e. how long the event loop could "
            "not run it (Raft groups, liveness heartbeats and requests waited as long)",
            buckets=LOOP_STALL_BUCKETS_S, registry=self.registry)
        # (topic, partition) -> [records, bytes]; plain integers, bumped on the event loop.
        self.produced: dict[TP, list[int]] = {}
        self.fetched: dict[TP, list[int]] = {}
        self.leader_changes: dict[TP, int] = {}
        self.leaderships_won: dict[TP, int] = {}
        self.request_errors: dict[tuple[str, str, str], int] = {}  # (protocol, api, error) -> count
        # Filled before each scrape (metrics_server.py): high watermarks of partitions led by other brokers,
        # for the lag of the groups this broker coordinates.
        self.remote_high_watermarks: dict[TP, int] = {}
        # Also filled before each scrape: share groups' queue figures per partition led here, (group, topic,
        # partition) -> what `lb share describe` shows. Describing a partition reads its unread log headers, so
        # this is done partition by partition with the event loop let run in between (refresh_share_states).
        self.share_states: dict[tuple[str, str, int], dict[str, Any]] = {}
        self._timers: dict[tuple[str, str], Any] = {}
        self.registry.register(BrokerStateCollector(self))

    # ----------------------------------------------------------------------------- hot path hooks

    def record_produced(self, topic: str, partition: int, payloads: Sequence[tuple[bytes, int]]) -> None:
        """Batches appended to a partition: (batch bytes, record count) each."""
        counts = self.produced.get((topic, partition))
        if counts is None:
            counts = self.produced[(topic, partition)] = [0, 0]
        for payload, records in payloads:
            counts[0] += records
            counts[1] += len(payload)

    def record_fetched(self, topic: str, partition: int, data: bytes | memoryview) -> None:
        """Stored batches sent to a consumer: their records are counted from the batch headers (control
        batches, such as share-group state, are not records a consumer sees)."""
        if data:
            self.record_delivered(topic, partition, count_records(data), len(data))

    def record_delivered(self, topic: str, partition: int, records: int, nbytes: int) -> None:
        counts = self.fetched.get((topic, partition))
        if counts is None:
            counts = self.fetched[(topic, partition)] = [0, 0]
        counts[0] += records
        counts[1] += nbytes

    def record_leader_change(self, topic: str, partition: int, became_leader: bool) -> None:
        key = (topic, partition)
        self.leader_changes[key] = self.leader_changes.get(key, 0) + 1
        if became_leader:
            self.leaderships_won[key] = self.leaderships_won.get(key, 0) + 1

    def observe_fsync(self, seconds: float) -> None:
        """Called from the flush threads (prometheus_client's histograms are thread-safe)."""
        self.fsync_seconds.observe(seconds)

    def observe_loop_stall(self, seconds: float) -> None:
        self.loop_stall_seconds.observe(max(seconds, 0.0))

    def timer(self, protocol: str, api: str) -> Any:
        """The latency histogram of one API (its labelled child, looked up once)."""
        child = self._timers.get((protocol, api))
        if child is None:
            child = self._timers[(protocol, api)] = self.request_seconds.labels(protocol, api)
        return child

    def record_error(self, protocol: str, api: str, error: str) -> None:
        key = (protocol, api, error)
        self.request_errors[key] = self.request_errors.get(key, 0) + 1

    # -------------------------------------------------------------------------------- scraping

    def collect_now(self) -> list[Metric]:
        """Every metric family, read now (on the event loop, so the broker's state is consistent)."""
        return list(self.registry.collect())

    def forget_deleted_topics(self) -> None:
        """Counters of topics that no longer exist leave the scrape."""
        topics = self.broker.cluster.topics
        for table in (self.produced, self.fetched, self.leader_changes, self.leaderships_won,
                      self.remote_high_watermarks):
            for key in [k for k in table if k[0] not in topics]:
                del table[key]

    def partitions_needing_high_watermarks(self) -> dict[int, set[str]]:
        """leader node -> topics: partitions with offsets committed by a group this broker coordinates, whose
        leader is another broker (only the leader's high watermark is exact)."""
        broker = self.broker
        wanted: dict[int, set[str]] = {}
        for topic, partition in self._committed_partitions():
            replica = broker.replicas.local_replica(topic, partition)
            if replica is not None and replica.is_leader:
                continue
            leader = broker.replicas.known_leader(topic, partition) if topic in broker.cluster.topics else None
            if leader is not None and leader != broker.node_id and leader in broker.peers:
                wanted.setdefault(leader, set()).add(topic)
        return wanted

    def _committed_partitions(self) -> set[TP]:
        found: set[TP] = set()
        for group in self.coordinated_groups():
            found.update(group.offsets)
        return found

    def coordinated_groups(self) -> list[Any]:
        """Consumer groups whose coordinator is this broker now (it leads their __consumer_offsets partition)."""
        out: list[Any] = []
        for runtime in list(self.broker.group_runtimes.values()):
            if runtime.replica.is_leader:
                out.extend(g for g in runtime.shard.groups.values() if g.exists or g.offsets)
        return out

    async def refresh_share_states(self) -> None:
        """Describe every share group of every partition this broker leads (one partition per loop turn)."""
        states: dict[tuple[str, str, int], dict[str, Any]] = {}
        for (topic, partition), machine in list(self.broker.share_machines.items()):
            if not machine.replica.is_leader:
                continue
            for group_id in list(machine.groups):
                try:
                    state = machine.describe(group_id)
                except Exception as exc:  # a log being cut under it: the next scrape sees it again
                    log.debug("%s-%d: share group %s not described: %s", topic, partition, group_id, exc)
                    continue
                if state is not None:
                    states[(group_id, topic, partition)] = state
            await asyncio.sleep(0)
        self.share_states = states

    def high_watermark(self, topic: str, partition: int) -> int | None:
        """The partition's high watermark as its leader knows it, if this broker leads it or has asked."""
        replica = self.broker.replicas.local_replica(topic, partition)
        if replica is not None and replica.is_leader:
            return int(replica.high_watermark)
        return self.remote_high_watermarks.get((topic, partition))


# batchLength (at 8), attributes (at 21) and lastOffsetDelta (at 23) of a RecordBatch header, read at once.
_BATCH_FIELDS = struct.Struct(">8xi9xhi")


def count_records(data: bytes | memoryview) -> int:
    """Records in concatenated stored batches, control batches left out, from their headers alone (one unpack
    per batch: a fetch of a megabyte of small batches is walked in about a millisecond)."""
    records = 0
    pos = 0
    size = len(data)
    end = size - rec.HEADER_SIZE
    unpack = _BATCH_FIELDS.unpack_from
    while pos <= end:
        length, attributes, last_delta = unpack(data, pos)
        if length < rec.HEADER_SIZE - rec.LOG_OVERHEAD or pos + length + rec.LOG_OVERHEAD > size:
            break  # not a batch, or a partial one at the end
        if not attributes & rec.CONTROL_FLAG:
            records += last_delta + 1
        pos += length + rec.LOG_OVERHEAD
    return records


def _family(cls: type, name: str, doc: str, labels: Sequence[str]) -> Any:
    return cls(f"{PREFIX}{name}", doc, labels=list(labels))


PARTITION = ("topic", "partition")
GROUP_PARTITION = ("group", "topic", "partition")


class BrokerStateCollector:
    """Gauges (and the counters kept as plain integers) read from the broker when scraped."""

    def __init__(self, metrics: BrokerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        broker = metrics.broker
        metrics.forget_deleted_topics()
        yield from self._counters()
        yield from self._partitions(broker)
        yield from self._controller(broker)
        yield from self._groups()
        yield from self._share_groups(broker)

    def _counters(self) -> Iterator[Metric]:
        m = self.metrics
        for table, what, doc in ((m.produced, "produced", "appended to the partition by produce requests"),
                                 (m.fetched, "fetched", "sent to consumers (fetches and share-group deliveries)")):
            records = _family(CounterMetricFamily, f"partition_{what}_records", f"Records {doc}", PARTITION)
            nbytes = _family(CounterMetricFamily, f"partition_{what}_bytes", f"Bytes of record batches {doc}",
                             PARTITION)
            for (topic, partition), (count, size) in sorted(table.items()):
                records.add_metric([topic, str(partition)], count)
                nbytes.add_metric([topic, str(partition)], size)
            yield records
            yield nbytes
        changes = _family(CounterMetricFamily, "partition_leader_changes", "Leader changes (elections, hand-overs) "
                          "this broker's replica has seen", PARTITION)
        for (topic, partition), count in sorted(m.leader_changes.items()):
            changes.add_metric([topic, str(partition)], count)
        yield changes
        won = _family(CounterMetricFamily, "partition_leader_elections_won", "Times this broker became the "
                      "partition's leader; summed over brokers, the partition's elections", PARTITION)
        for (topic, partition), count in sorted(m.leaderships_won.items()):
            won.add_metric([topic, str(partition)], count)
        yield won
        errors = _family(CounterMetricFamily, "request_errors", "Errors answered, per protocol, API and error code "
                         "(per partition for per-partition errors)", ("protocol", "api", "error"))
        for labels, count in sorted(m.request_errors.items()):
            errors.add_metric(list(labels), count)
        yield errors
        yield from self._native_fsyncs(self.metrics.broker)

    @staticmethod
    def _native_fsyncs(broker: Broker) -> Iterator[Metric]:
        """Whether small appends are fsynced by the native threads (0 threads: not built, or native_fsync is off,
        and every fsync runs in the Python thread pool), and how many they ran."""
        threads = broker.fsync_threads
        running = GaugeMetricFamily(f"{PREFIX}native_fsync_threads", "Native threads that fsync small appends "
                                    "(0: not built at install, or native_fsync = false; the thread pool does it all)")
        running.add_metric([], broker.config.flush_threads if threads is not None else 0)
        yield running
        done = CounterMetricFamily(f"{PREFIX}native_fsyncs", "fsyncs of small appends run by the native threads, by "
                                   "result (a failed one takes its replica out until it is reopened)",
                                   labels=["result"])
        done.add_metric(["ok"], threads.completed - threads.failed if threads is not None else 0)
        done.add_metric(["failed"], threads.failed if threads is not None else 0)
        yield done

    def _partitions(self, broker: Broker) -> Iterator[Metric]:
        gauges = {name: _family(GaugeMetricFamily, name, doc, PARTITION) for name, doc in (
            ("partition_high_watermark", "The partition's high watermark on this broker's replica (the leader's "
                                         "is exact; a follower's may lag a little)"),
            ("partition_log_end_offset", "The next offset this broker's replica will write"),
            ("partition_log_start_offset", "The oldest offset this broker's replica keeps"),
            ("partition_log_size_bytes", "Bytes of this broker's replica on disk (its segment files)"),
            ("partition_log_segments", "Segments of this broker's replica"),
            ("partition_leader", "1 if this broker leads the partition, else 0"),
        )}
        led = {name: _family(GaugeMetricFamily, name, doc, PARTITION) for name, doc in (
            ("partition_under_replicated", "1 if the partition's in-sync set is smaller than its replica set "
                                           "(reported by its leader)"),
            ("partition_replicas", "Replicas assigned to the partition (reported by its leader)"),
            ("partition_in_sync_replicas", "Replicas in sync with the leader (reported by its leader)"),
        )}
        leaders = 0
        for (topic, partition), replica in broker.replicas.local_partitions():
            if replica.closed:
                continue
            labels = [topic, str(partition)]
            plog = replica.log
            is_leader = replica.is_leader
            gauges["partition_high_watermark"].add_metric(labels, replica.high_watermark)
            gauges["partition_log_end_offset"].add_metric(labels, plog.log_end_offset)
            gauges["partition_log_start_offset"].add_metric(labels, plog.log_start_offset)
            gauges["partition_log_size_bytes"].add_metric(labels, plog.size_bytes)
            gauges["partition_log_segments"].add_metric(labels, plog.segment_count)
            gauges["partition_leader"].add_metric(labels, 1 if is_leader else 0)
            spec = broker.cluster.topics.get(topic)
            if not is_leader or spec is None or partition >= len(spec.assignment):
                continue
            leaders += 1
            assignment = spec.assignment[partition]
            isr = broker.replicas.in_sync_replicas(replica, assignment)
            led["partition_under_replicated"].add_metric(labels, 1 if len(isr) < len(assignment) else 0)
            led["partition_replicas"].add_metric(labels, len(assignment))
            led["partition_in_sync_replicas"].add_metric(labels, len(isr))
        yield from gauges.values()
        yield from led.values()
        yield GaugeMetricFamily(f"{PREFIX}partitions_led", "Partitions this broker leads now", value=leaders)

    def _controller(self, broker: Broker) -> Iterator[Metric]:
        controller = broker.controller
        active = controller is not None and controller.is_leader
        yield GaugeMetricFamily(f"{PREFIX}controller_active", "1 if this broker leads the controller (the cluster "
                                "metadata), which alone reports partition_offline", value=1 if active else 0)
        offline = _family(GaugeMetricFamily, "partition_offline", "1 if the partition has no live leader, as the "
                          "controller sees it (reported by the controller leader only)", PARTITION)
        brokers_up = GaugeMetricFamily(f"{PREFIX}brokers_alive", "Brokers this broker hears from, itself included")
        brokers_up.add_metric([], sum(1 for node in broker.peers if broker.liveness.is_alive(node)))
        if active:
            for topic in broker.controller_client.topics():
                for partition in range(topic.partitions):
                    offline.add_metric([topic.name, str(partition)],
                                       1 if broker.replicas.known_leader(topic.name, partition) is None else 0)
        yield offline
        yield brokers_up

    def _groups(self) -> Iterator[Metric]:
        m = self.metrics
        committed = _family(GaugeMetricFamily, "group_committed_offset", "The next offset the consumer group reads "
                            "(its committed offset), reported by the group's coordinator", GROUP_PARTITION)
        lag = _family(GaugeMetricFamily, "group_lag_records", "Records between the group's committed offset and "
                      "the partition's high watermark, reported by the group's coordinator", GROUP_PARTITION)
        members = _family(GaugeMetricFamily, "group_members", "Members of the consumer group, reported by its "
                          "coordinator", ("group",))
        for group in m.coordinated_groups():
            members.add_metric([group.group_id], len(group.members))
            for (topic, partition), offset in sorted(group.offsets.items()):
                labels = [group.group_id, topic, str(partition)]
                committed.add_metric(labels, offset.offset)
                end = m.high_watermark(topic, partition)
                if end is not None:
                    lag.add_metric(labels, max(0, end - offset.offset))
        yield committed
        yield lag
        yield members

    def _share_groups(self, broker: Broker) -> Iterator[Metric]:
        """From the states described just before the scrape (BrokerMetrics.refresh_share_states)."""
        families = {name: _family(GaugeMetricFamily, name, doc, GROUP_PARTITION) for name, doc in (
            ("share_available_records", "Records a share group can take now (the queue depth: unread and "
                                        "released records), reported by the partition's leader"),
            ("share_in_flight_records", "Records locked to a share-group member, not yet acknowledged"),
            ("share_delayed_records", "Released or delayed records not deliverable yet (backoff, deliver-at)"),
            ("share_oldest_available_age_seconds", "How long the oldest available record has waited"),
        )}
        dead = _family(CounterMetricFamily, "share_dead_lettered_records", "Records the share group sent to its "
                       "dead-letter topic", GROUP_PARTITION)
        for (group_id, topic, partition), state in sorted(self.metrics.share_states.items()):
            machine = broker.share_machines.get((topic, partition))
            if machine is None or not machine.replica.is_leader:
                continue  # led elsewhere since the refresh: its new leader reports it
            labels = [group_id, topic, str(partition)]
            families["share_available_records"].add_metric(labels, state["available"])
            families["share_in_flight_records"].add_metric(labels, state["in_flight"])
            families["share_delayed_records"].add_metric(labels, state["delayed"])
            families["share_oldest_available_age_seconds"].add_metric(labels, state["oldest_available_age_ms"] / 1000)
            dead.add_metric(labels, state["dead_lettered"])
        yield from families.values()
        yield dead


# ------------------------------------------------------------------------------- gRPC timing

def instrument_servicer(servicer: Any, service: Any, metrics: BrokerMetrics, protocol: str = "grpc") -> Any:
    """Wrap the unary methods of a servicer (before it is added to the server) so that each call is timed in
    logbroker_request_duration_seconds{protocol=<protocol>,api=<method>} and its errors are counted: a call that
    fails as a whole by its gRPC status, and each per-partition (or per-group) error of its answer by its
    ErrorCode name. Streaming methods, if any, are left alone: they live as long as a connection."""
    for method in service.methods:
        if method.client_streaming or method.server_streaming:
            continue
        handler = getattr(servicer, method.name, None)
        if handler is not None:
            setattr(servicer, method.name, _timed(handler, method.name, metrics, protocol))
    return servicer


def _timed(handler: Callable[..., Awaitable[Any]], api: str, metrics: BrokerMetrics,
           protocol: str) -> Callable[..., Awaitable[Any]]:
    timer = metrics.timer(protocol, api)

    @functools.wraps(handler)
    async def timed(request: Any, context: Any) -> Any:
        started = time.perf_counter()
        try:
            response = await handler(request, context)
        except asyncio.CancelledError:
            raise  # the client went away (a consumer closing during a long poll): neither an error nor a latency
        except BaseException:
            timer.observe(time.perf_counter() - started)
            metrics.record_error(protocol, api, _status_name(context))
            raise
        timer.observe(time.perf_counter() - started)
        for code in response_error_codes(response):
            metrics.record_error(protocol, api, _error_name(code))
        return response

    return timed


def _status_name(context: Any) -> str:
    try:
        code = context.code()
    except Exception:
        code = None
    return code.name if code is not None and hasattr(code, "name") else "CANCELLED_OR_FAILED"


@functools.cache
def _error_name(code: int) -> str:
    from logbroker_client.proto import logbroker_pb2 as pb

    try:
        return str(pb.ErrorCode.Name(code))
    except ValueError:
        return f"ERROR_{code}"


@functools.cache
def _error_fields(descriptor: Any) -> tuple[bool, tuple[str, ...]]:
    """(whether the message has an error_code, its repeated message fields whose items have one)."""
    nested = tuple(f.name for f in descriptor.fields
                   if f.message_type is not None and f.is_repeated
                   and "error_code" in f.message_type.fields_by_name)
    return "error_code" in descriptor.fields_by_name, nested


def response_error_codes(response: Any) -> Iterable[int]:
    """The error codes of an answer: its own, and those of the items of its repeated fields (one level: the
    results of a Produce, the partitions of a Fetch, the groups of a DescribeGroups...)."""
    descriptor = getattr(response, "DESCRIPTOR", None)
    if descriptor is None:
        return ()
    own, nested = _error_fields(descriptor)
    codes = []
    if own and response.error_code:
        codes.append(response.error_code)
    for name in nested:
        codes.extend(item.error_code for item in getattr(response, name) if item.error_code)
    return codes


# ------------------------------------------------------------------------------- Kafka timing

_KAFKA_FIELDS: dict[type, tuple[str, ...]] = {}


def _kafka_fields(cls: type) -> tuple[str, ...]:
    found = _KAFKA_FIELDS.get(cls)
    if found is None:
        found = _KAFKA_FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls)) \
            if dataclasses.is_dataclass(cls) else ()
    return found


def kafka_error_names(response: Any, depth: int = 0) -> Iterator[str]:
    """The non-zero error codes in a Kafka answer and its nested entries (topics, then partitions)."""
    for name in _kafka_fields(type(response)):
        value = getattr(response, name)
        if name == "error_code":
            if value is not None and int(value) != 0:
                yield getattr(value, "name", str(value)).upper()
        elif depth < 2 and isinstance(value, tuple) and value and _kafka_fields(type(value[0])):
            for item in value:
                yield from kafka_error_names(item, depth + 1)
