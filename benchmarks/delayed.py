"""Delayed delivery benchmark: a million records parked at once, and how late due records arrive.

    python -m benchmarks.delayed                       # a temporary broker; 1,000,000 parked, 2,000 probes
    python -m benchmarks.delayed --pending 100000 --probes 500
    python -m benchmarks.delayed --bootstrap H:P       # an existing cluster (no RSS figures then)

1. Park: --pending records of --record-size bytes are produced with a delivery time --horizon-s ahead
   (the ``lb.deliver.at.ms`` header a producer's ``send(..., delay_ms=...)`` sets), and a share group reads
   them all into its delay index. The broker's resident memory is read before and after (/proc, temporary
   broker only): the index keeps spans and a bounded cache, not a Python object per record.
2. Probe: under light load, --probes records are produced at --probe-rate per second, each with a delay
   drawn from --min-delay-ms..--max-delay-ms, while one share consumer long-polls and acknowledges.
   lateness = the moment a record reaches the consumer minus its delivery time (the queues issue's goal:
   within 100 ms under light load). A record that arrives before its time is counted in ``early``
   (it must be 0).
Prints one JSON line on stdout; progress goes to stderr on a terminal.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from logbroker_client import records as rec
from logbroker_client.progress import Progress
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from benchmarks.common import TemporaryBroker, emit, ensure_topic, payloads, percentiles_ms, rounded, run_main

DELIVER_AT_HEADER = "lb.deliver.at.ms"
BATCH_RECORDS = 2_000
PARK_FETCH_RECORDS = 5_000
PARK_TIMEOUT_S = 600.0
PROBE_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 60.0
LATENESS_GOAL_MS = 100
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.delayed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", default=None, help="an existing cluster's HOST:PORT (default: a temporary "
                                                          "broker)")
    parser.add_argument("--pending", type=int, default=1_000_000, help="records parked at once")
    parser.add_argument("--horizon-s", type=int, default=3_600, help="how far ahead the parked records are due")
    parser.add_argument("--record-size", type=int, default=100)
    parser.add_argument("--probes", type=int, default=2_000)
    parser.add_argument("--probe-rate", type=float, default=200.0, help="probe records per second")
    parser.add_argument("--min-delay-ms", type=int, default=200)
    parser.add_argument("--max-delay-ms", type=int, default=3_000)
    args = parser.parse_args(argv)
    if args.pending < 0 or args.probes < 1 or args.probe_rate <= 0 or args.min_delay_ms > args.max_delay_ms:
        parser.error("--pending >= 0, --probes >= 1, --probe-rate > 0 and --min-delay-ms <= --max-delay-ms")
    return args


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


class Queue:
    """Raw gRPC access to one single-partition topic: produce delayed batches, share-fetch, describe."""

    def __init__(self, address: str, topic: str, group: str) -> None:
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.broker = pb_grpc.BrokerStub(self.channel)
        self.share = pb_grpc.ShareStub(self.channel)
        self.topic = topic
        self.group = group

    def produce(self, values: list[bytes], deliver_at_ms: list[int]) -> None:
        builder = rec.BatchBuilder()
        stamp = now_ms()
        for value, due_ms in zip(values, deliver_at_ms, strict=True):
            builder.append(stamp, None, value, [(DELIVER_AT_HEADER, str(due_ms).encode())])
        answer = self.broker.Produce(pb.ProduceRequest(acks=1, timeout_ms=30_000, partitions=[
            pb.PartitionRecords(topic=self.topic, partition=0, records=builder.build())]), timeout=REQUEST_TIMEOUT_S)
        if answer.results[0].error_code:
            raise RuntimeError(f"produce to {self.topic}-0: {answer.results[0].error_message}")

    def fetch(self, member: str, acks: list[pb.AckRange], max_records: int, max_wait_ms: int) -> pb.SharePartitionData:
        answer = self.share.ShareFetch(pb.ShareFetchRequest(
            group_id=self.group, member_id=member, max_wait_ms=max_wait_ms, max_records=max_records,
            partitions=[pb.SharePartitionFetch(topic=self.topic, partition=0, acks=acks)]), timeout=REQUEST_TIMEOUT_S)
        part = answer.partitions[0]
        if part.error_code:
            raise RuntimeError(f"share fetch of {self.topic}-0: {part.error_message}")
        return part

    def describe(self) -> pb.SharePartitionDescription:
        answer = self.share.DescribeSharePartitions(pb.DescribeSharePartitionsRequest(
            group_id=self.group, partitions=[pb.TopicPartitions(topic=self.topic, partitions=[0])]),
            timeout=REQUEST_TIMEOUT_S)
        return answer.partitions[0]

    def close(self) -> None:
        self.channel.close()


def park(queue: Queue, args: argparse.Namespace, broker_pid: int | None) -> dict[str, Any]:
    """Produce --pending far-future records and let the group read them all into its delay index."""
    values = payloads(args.record_size)
    due_base_ms = now_ms() + args.horizon_s * 1000
    with Progress("producing delayed records", total=args.pending, mode="tty") as progress:
        for first in range(0, args.pending, BATCH_RECORDS):
            count = min(BATCH_RECORDS, args.pending - first)
            queue.produce([values[(first + i) % len(values)] for i in range(count)],
                          [due_base_ms + (first + i) % 60_000 for i in range(count)])
            progress.update(count)
    queue.fetch("parker", [], 1, 0)  # joins the group and reads from the log's start
    rss_before = rss_bytes(broker_pid)
    started = time.monotonic()
    with Progress("parking", total=args.pending, mode="tty") as progress:
        while True:
            part = queue.fetch("parker", [], PARK_FETCH_RECORDS, 0)
            if part.acquired:
                raise RuntimeError(f"records due in {args.horizon_s} s were delivered at once")
            delayed = queue.describe().delayed
            progress.update(delayed - progress.count)
            if delayed >= args.pending:
                break
            if time.monotonic() - started > PARK_TIMEOUT_S:
                raise RuntimeError(f"only {delayed} of {args.pending} records parked in {PARK_TIMEOUT_S} s")
    park_s = time.monotonic() - started
    rss_after = rss_bytes(broker_pid)
    return {"pending": args.pending, "park_seconds": rounded(park_s),
            "parked_per_s": rounded(args.pending / park_s, 1) if park_s else None,
            "broker_rss_mb_before": _mb(rss_before), "broker_rss_mb_after": _mb(rss_after),
            "broker_rss_growth_mb": _mb(rss_after - rss_before) if rss_before and rss_after else None}


def probe(queue: Queue, args: argparse.Namespace) -> dict[str, Any]:
    """Produce delayed probes at a light pace while one consumer takes and acknowledges them."""
    rng = random.Random(7)
    due_by_offset: dict[int, int] = {}
    lateness_s: list[float] = []
    early = 0
    done = threading.Event()

    def produce_probes() -> None:
        values = payloads(args.record_size)
        for i in range(args.probes):
            queue.produce([values[i % len(values)]], [now_ms() + rng.randint(args.min_delay_ms, args.max_delay_ms)])
            time.sleep(1 / args.probe_rate)
        done.set()

    producer = threading.Thread(target=produce_probes, daemon=True)
    producer.start()
    acks: list[pb.AckRange] = []
    deadline = time.monotonic() + PROBE_TIMEOUT_S + args.probes / args.probe_rate + args.max_delay_ms / 1000
    with Progress("probing", total=args.probes, mode="tty") as progress:
        while len(lateness_s) + early < args.probes and time.monotonic() < deadline:
            part = queue.fetch("worker", acks, 500, 500)
            arrived_ms = time.time_ns() / 1e6
            acks = [pb.AckRange(first_offset=a.first_offset, last_offset=a.last_offset, type=pb.AckType.ACCEPT)
                    for a in part.acquired]
            _note_due_times(part.records, due_by_offset)
            for offset in (o for a in part.acquired for o in range(a.first_offset, a.last_offset + 1)):
                late_ms = arrived_ms - due_by_offset[offset]
                if late_ms < 0:
                    early += 1
                else:
                    lateness_s.append(late_ms / 1000)
                progress.update(1)
    if acks:
        queue.fetch("worker", acks, 0, 0)
    producer.join(timeout=5)
    return {"probes": args.probes, "received": len(lateness_s) + early, "early": early,
            "lateness_ms": percentiles_ms(lateness_s), "lateness_goal_ms": LATENESS_GOAL_MS}


def _note_due_times(records: bytes, due_by_offset: dict[int, int]) -> None:
    for header, batch_records in rec.iter_batches(records):
        if header.is_control:
            continue
        for record in batch_records:
            for key, value in record.headers:
                if key == DELIVER_AT_HEADER and value:
                    due_by_offset[record.offset] = int(value)


def _mb(value: int | None) -> float | None:
    return rounded(value / (1 << 20), 1) if value is not None else None


def run(bootstrap: str, args: argparse.Namespace, broker_pid: int | None) -> dict[str, Any]:
    """Both phases on one topic and one group: the probes share the delay index with the parked million."""
    result: dict[str, Any] = {"tool": "delayed", "record_size": args.record_size}
    topic = f"bench-delayed-{uuid.uuid4().hex[:8]}"
    ensure_topic(bootstrap, topic, 1, None)
    queue = Queue(bootstrap.split(",")[0], topic, f"bench-delayed-{uuid.uuid4().hex[:8]}")
    try:
        if args.pending:
            result["park"] = park(queue, args, broker_pid)
        else:
            queue.fetch("worker", [], 1, 0)  # the group exists before the probes are sent
        result["probe"] = probe(queue, args)
        result["broker_rss_mb_end"] = _mb(rss_bytes(broker_pid))
    finally:
        queue.close()
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.bootstrap:
        emit(run(args.bootstrap, args, None))
        return
    with TemporaryBroker() as broker:
        emit(run(broker.address, args, broker.proc.pid if broker.proc else None))


if __name__ == "__main__":
    run_main(main)
