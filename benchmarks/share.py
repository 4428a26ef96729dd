"""Share-group benchmark: consume-and-ack throughput of share consumers, and ack latency.

    python -m benchmarks.share                          # a temporary broker, 300,000 records of 100 bytes
    python -m benchmarks.share --bootstrap H:P          # an existing cluster (a fresh topic per run)
    python -m benchmarks.share --consumers 1,4 --max-records 5000

The topic is filled first (raw Produce of prebuilt batches, acks=1, not timed). Then, for each consumer
count, a fresh share group drains it: every consumer (a process of its own, speaking the raw Share gRPC
service) fetches up to --max-records records, decodes them, and acknowledges them all (ACCEPT) with its
next ShareFetch (pipelining: one request in flight, carrying the previous batch's acks); a last
ShareAcknowledge sends the final acks. The clock runs from the common start to the last consumer's last
confirmed ack, so every record counted is acknowledged.

- records_per_s: records / that time (the queues issue's goal for one consumer: 190,000).
- ack_latency_ms: per fetch, from the moment a batch's acks are ready (it is processed) to their
  confirmation, which comes with the next fetch's answer: p50, p99, p99.9, max.
- fetch_ms: the ShareFetch round trips (acks applied, records acquired, both committed).
Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as EventType
from typing import Any

import grpc
from logbroker_client import records as rec
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from benchmarks.common import TemporaryBroker, emit, ensure_topic, payloads, percentiles_ms, rounded, run_main

GOAL_RECORDS_PER_S = 190_000
PRELOAD_BATCH_RECORDS = 2_000
IDLE_STOP_S = 2.0  # a consumer that sees nothing for this long while records are missing gives up
RUN_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 30.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.share", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", default=None, help="an existing cluster's HOST:PORT (default: a temporary "
                                                          "broker)")
    parser.add_argument("--topic", default="", help="default: bench-share-<random>, created and filled")
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--record-size", type=int, default=100)
    parser.add_argument("--consumers", default="1,4", help="consumer counts to measure, comma-separated")
    parser.add_argument("--max-records", type=int, default=5_000, help="per ShareFetch")
    parser.add_argument("--max-wait-ms", type=int, default=200)
    args = parser.parse_args(argv)
    args.consumer_counts = [int(c) for c in args.consumers.split(",") if c]
    args.topic = args.topic or f"bench-share-{uuid.uuid4().hex[:8]}"
    if args.records < 1 or not args.consumer_counts or min(args.consumer_counts) < 1:
        parser.error("--records and every --consumers count must be at least 1")
    return args


# ------------------------------------------------------------------------------------------ preload


def leaders(bootstrap: str, topic: str) -> dict[int, str]:
    """partition -> its leader's address, from Metadata."""
    with grpc.insecure_channel(bootstrap.split(",")[0]) as channel:
        answer = pb_grpc.BrokerStub(channel).Metadata(pb.MetadataRequest(topics=[topic]), timeout=REQUEST_TIMEOUT_S)
    addresses = {b.node_id: f"{b.host}:{b.port}" for b in answer.brokers}
    return {p.partition: addresses[p.leader_id] for p in answer.topics[0].partitions}


def preload(bootstrap: str, topic: str, records: int, record_size: int) -> None:
    """records values of record_size bytes, spread over the partitions, written as prebuilt batches."""
    by_partition = leaders(bootstrap, topic)
    values = payloads(record_size)
    channels = {address: grpc.insecure_channel(address, options=CHANNEL_OPTIONS) for address in by_partition.values()}
    try:
        written = 0
        while written < records:
            count = min(PRELOAD_BATCH_RECORDS, records - written)
            partition = (written // PRELOAD_BATCH_RECORDS) % len(by_partition)
            batch = build_batch([values[(written + i) % len(values)] for i in range(count)])
            produce(channels[by_partition[partition]], topic, partition, batch)
            written += count
    finally:
        for channel in channels.values():
            channel.close()


def build_batch(values: list[bytes]) -> bytes:
    builder = rec.BatchBuilder()
    now_ms = time.time_ns() // 1_000_000
    for value in values:
        builder.append(now_ms, None, value, [])
    return builder.build()


def produce(channel: grpc.Channel, topic: str, partition: int, batch: bytes) -> None:
    answer = pb_grpc.BrokerStub(channel).Produce(pb.ProduceRequest(acks=1, timeout_ms=30_000, partitions=[
        pb.PartitionRecords(topic=topic, partition=partition, records=batch)]), timeout=REQUEST_TIMEOUT_S)
    if answer.results[0].error_code:
        raise RuntimeError(f"preload of {topic}-{partition}: {answer.results[0].error_message}")


# ----------------------------------------------------------------------------------------- consumer


@dataclass
class ConsumerJob:
    bootstrap: str
    topic: str
    group: str
    member: str
    total_records: int
    max_records: int
    max_wait_ms: int


@dataclass
class ConsumerOutcome:
    records: int = 0
    fetches: int = 0
    finished_at: float = 0.0  # time.time() of the last confirmed ack
    ack_latencies_s: list[float] = field(default_factory=list)
    fetch_latencies_s: list[float] = field(default_factory=list)
    ack_errors: int = 0
    error: str = ""


@dataclass
class InFlight:
    future: Any  # grpc.Future of a ShareFetchResponse
    sent_at: float
    acks_ready_at: float | None  # when the acks it carries were ready; None when it carries none


class ShareConsumerLoop:
    """One member on every partition of the topic: fetch, decode, accept with the next fetch."""

    def __init__(self, job: ConsumerJob, consumed: Any) -> None:
        self.job = job
        self.consumed = consumed  # a multiprocessing.Value shared by the consumers: records acquired in all
        self.partition_leaders = leaders(job.bootstrap, job.topic)
        self.stubs = {address: pb_grpc.ShareStub(grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
                      for address in set(self.partition_leaders.values())}
        self.pending: dict[int, list[pb.AckRange]] = {}
        self.pending_since = 0.0
        self.in_flight: list[InFlight] = []
        self.outcome = ConsumerOutcome()

    def run(self) -> ConsumerOutcome:
        idle_since = time.monotonic()
        while not self._everything_taken():
            if self._fetch_round():
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > IDLE_STOP_S:
                break  # the rest is somebody else's, or gone: the record count will tell
        for sent in self.in_flight:  # the last round's answers: records to process and ack too
            self._receive(sent)
        self._flush_acks()
        self.outcome.finished_at = time.time()
        return self.outcome

    def _everything_taken(self) -> bool:
        return bool(self.consumed.value >= self.job.total_records)

    def _fetch_round(self) -> bool:
        """Send the next fetch of every leader (with the acks ready so far), then process the answers of the
        fetches sent last round: two fetches per leader in flight, so decoding overlaps the broker's work."""
        previous, self.in_flight = self.in_flight, [self._send(address) for address in self.stubs]
        return sum(self._receive(sent) for sent in previous) > 0 or not previous

    def _send(self, address: str) -> InFlight:
        partitions = [p for p, leader in self.partition_leaders.items() if leader == address]
        acks = {p: self.pending.pop(p, []) for p in partitions}
        request = pb.ShareFetchRequest(group_id=self.job.group, member_id=self.job.member,
                                       max_wait_ms=self.job.max_wait_ms, max_records=self.job.max_records,
                                       partitions=[pb.SharePartitionFetch(topic=self.job.topic, partition=p,
                                                                          acks=acks[p]) for p in partitions])
        acks_ready_at = self.pending_since if any(acks.values()) else None
        return InFlight(self.stubs[address].ShareFetch.future(request, timeout=REQUEST_TIMEOUT_S), time.monotonic(),
                        acks_ready_at)

    def _receive(self, sent: InFlight) -> int:
        answer = sent.future.result()
        received = time.monotonic()
        self.outcome.fetches += 1
        self.outcome.fetch_latencies_s.append(received - sent.sent_at)
        if sent.acks_ready_at is not None:
            self.outcome.ack_latencies_s.append(received - sent.acks_ready_at)
        taken = sum(self._take(part) for part in answer.partitions)
        self.pending_since = time.monotonic()
        return taken

    def _take(self, part: pb.SharePartitionData) -> int:
        if part.error_code:
            raise RuntimeError(f"share fetch of {part.topic}-{part.partition}: {part.error_message}")
        self.outcome.ack_errors += sum(1 for result in part.ack_results if result.error_code)
        mine = [(a.first_offset, a.last_offset) for a in part.acquired]
        taken = sum(last - first + 1 for first, last in mine)
        if not taken:
            return 0
        decoded = sum(1 for header, records in rec.iter_batches(part.records) if not header.is_control
                      for record in records if any(first <= record.offset <= last for first, last in mine))
        with self.consumed.get_lock():
            self.consumed.value += taken
        self.outcome.records += decoded
        self.pending.setdefault(part.partition, []).extend(
            pb.AckRange(first_offset=first, last_offset=last, type=pb.AckType.ACCEPT) for first, last in mine)
        return taken

    def _flush_acks(self) -> None:
        for address, stub in self.stubs.items():
            partitions = [p for p, leader in self.partition_leaders.items()
                          if leader == address and self.pending.get(p)]
            if not partitions:
                continue
            answer = stub.ShareAcknowledge(pb.ShareAcknowledgeRequest(
                group_id=self.job.group, member_id=self.job.member, partitions=[
                    pb.SharePartitionFetch(topic=self.job.topic, partition=p, acks=self.pending.pop(p))
                    for p in partitions]), timeout=REQUEST_TIMEOUT_S)
            self.outcome.ack_latencies_s.append(time.monotonic() - self.pending_since)
            self.outcome.ack_errors += sum(1 for part in answer.partitions for r in part.ack_results if r.error_code)


def consumer_process(job: ConsumerJob, consumed: Any, ready: Any, start: EventType, results: Any) -> None:
    """A consumer's process: connect, say ready, wait for the common start, drain, report."""
    try:
        loop = ShareConsumerLoop(job, consumed)
        ready.put(job.member)
        start.wait()
        results.put(loop.run())
    except Exception as exc:  # reported by the parent, which must not wait for a result that never comes
        results.put(ConsumerOutcome(error=f"{type(exc).__name__}: {exc}"))


# -------------------------------------------------------------------------------------------- a run


def measure(bootstrap: str, topic: str, consumers: int, args: argparse.Namespace) -> dict[str, Any]:
    """A fresh group of `consumers` processes drains the topic; records/s and latencies."""
    context = multiprocessing.get_context("spawn")
    consumed, ready, results, start = context.Value("q", 0), context.Queue(), context.Queue(), context.Event()
    group = f"bench-{consumers}-{uuid.uuid4().hex[:6]}"
    jobs = [ConsumerJob(bootstrap, topic, group, f"{group}-m{i}", args.records, args.max_records, args.max_wait_ms)
            for i in range(consumers)]
    processes = [context.Process(target=consumer_process, args=(job, consumed, ready, start, results))
                 for job in jobs]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            ready.get(timeout=RUN_TIMEOUT_S)
        started_at = time.time()
        start.set()
        outcomes: list[ConsumerOutcome] = [results.get(timeout=RUN_TIMEOUT_S) for _ in processes]
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
    return summarize(consumers, outcomes, started_at)


def summarize(consumers: int, outcomes: list[ConsumerOutcome], started_at: float) -> dict[str, Any]:
    errors = [o.error for o in outcomes if o.error]
    if errors:
        raise RuntimeError(f"a consumer failed: {errors[0]}")
    records = sum(o.records for o in outcomes)
    seconds = max(o.finished_at for o in outcomes) - started_at
    return {"consumers": consumers, "records": records, "seconds": rounded(seconds),
            "records_per_s": rounded(records / seconds, 1), "fetches": sum(o.fetches for o in outcomes),
            "records_per_fetch": rounded(records / max(1, sum(o.fetches for o in outcomes)), 1),
            "ack_errors": sum(o.ack_errors for o in outcomes),
            "ack_latency_ms": percentiles_ms([s for o in outcomes for s in o.ack_latencies_s]),
            "fetch_ms": percentiles_ms([s for o in outcomes for s in o.fetch_latencies_s])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    broker = TemporaryBroker().start() if args.bootstrap is None else None
    try:
        bootstrap = args.bootstrap or (broker.address if broker else "")
        ensure_topic(bootstrap, args.topic, args.partitions, None)
        preload(bootstrap, args.topic, args.records, args.record_size)
        runs = [measure(bootstrap, args.topic, count, args) for count in args.consumer_counts]
        emit({"tool": "share", "topic": args.topic, "partitions": args.partitions, "record_size": args.record_size,
              "max_records": args.max_records, "goal_records_per_s": GOAL_RECORDS_PER_S, "runs": runs})
    finally:
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    run_main(main)
