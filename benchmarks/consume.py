"""Consumer benchmark: read N records from the beginning of a topic as fast as one client can.

    python -m benchmarks.consume --topic bench-consume --records 1000000 --prepare

With --prepare, a topic holding fewer than N records is first topped up (acks=1, not timed). The
fetch latency figures are the durations of poll() calls: the time the application waits for each
chunk of records, decoding included. Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from logbroker_client.consumer import DEFAULT_MAX_PARTITION_FETCH_BYTES
from logbroker_client.errors import LogbrokerError
from logbroker_client.progress import Progress

from benchmarks.common import add_connection_args, emit, ensure_topic, payloads, percentiles_ms, rounded, run_main

STALL_TIMEOUT_S = 30.0  # no record for this long means the run is stuck, not slow


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.consume", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_args(parser, "bench-consume")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--record-size", type=int, default=100, help="value bytes of records --prepare writes")
    parser.add_argument("--prepare", action="store_true",
                        help="create the topic if missing and produce records until it holds --records")
    parser.add_argument("--fetch-max-bytes", type=int, default=50 << 20)
    parser.add_argument("--max-partition-fetch-bytes", type=int, default=DEFAULT_MAX_PARTITION_FETCH_BYTES)
    parser.add_argument("--fetch-max-wait-ms", type=int, default=500)
    args = parser.parse_args(argv)
    if args.records < 1:
        parser.error("--records must be at least 1")
    return args


def topic_partitions(bootstrap: str | None, topic: str) -> list[Any]:
    from logbroker_client.admin import Admin
    from logbroker_client.types import TopicPartition

    with Admin(bootstrap) as admin:
        described = admin.describe_topics([topic])[0]
    return [TopicPartition(topic, p.partition) for p in described.partitions]


def prepare(args: argparse.Namespace, missing: int) -> None:
    """Produce the records the topic lacks (not part of the measurement)."""
    from logbroker_client.producer import Producer

    values = payloads(args.record_size)
    progress = Progress("prepare", total=missing, mode="tty")
    with Producer(args.bootstrap, acks="1") as producer:
        for i in range(missing):
            producer.send(args.topic, values[i % len(values)])
            if i % 1024 == 1023:
                progress.update(1024)
        producer.flush()
    progress.close()


def consume(consumer: Any, records: int, end: dict[Any, int]) -> tuple[int, int, float, list[float]]:
    """Poll until `records` arrive or every partition reaches `end` (offsets that are control batches
    hold no record); returns (records, value bytes, seconds, poll durations)."""
    durations: list[float] = []
    count = nbytes = 0
    clock = time.perf_counter
    progress = Progress("consume", total=records, mode="tty")
    started = last_data = clock()
    while count < records and not all(consumer.position(tp) >= offset for tp, offset in end.items()):
        before = clock()
        batch = consumer.poll(timeout=1.0, max_records=records - count)
        after = clock()
        durations.append(after - before)
        if batch:
            last_data = after
            count += len(batch)
            nbytes += sum(len(r.value) for r in batch if r.value is not None)
            progress.update(len(batch))
        elif after - last_data > STALL_TIMEOUT_S:
            raise LogbrokerError(f"no record arrived for {STALL_TIMEOUT_S:.0f}s after {count} of {records}")
    seconds = clock() - started
    progress.close()
    return count, nbytes, seconds, durations


def main(argv: list[str] | None = None) -> int:
    from logbroker_client.consumer import Consumer

    args = parse_args(argv)
    if args.prepare:
        ensure_topic(args.bootstrap, args.topic, args.partitions, args.replication_factor)
    tps = topic_partitions(args.bootstrap, args.topic)
    with Consumer(args.bootstrap, auto_offset_reset="earliest", fetch_max_bytes=args.fetch_max_bytes,
                  max_partition_fetch_bytes=args.max_partition_fetch_bytes,
                  fetch_max_wait_ms=args.fetch_max_wait_ms) as consumer:
        consumer.assign(tps)
        begin, end = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        available = sum(end[tp] - begin[tp] for tp in tps)
        if available < args.records:
            if not args.prepare:
                raise LogbrokerError(f"topic {args.topic!r} holds {available} records, fewer than --records "
                                     f"{args.records}; add --prepare to produce the rest first")
            prepare(args, args.records - available)
            end = consumer.end_offsets(tps)
        consumer.seek_to_beginning()
        count, nbytes, seconds, durations = consume(consumer, args.records, end)
    emit({
        "tool": "consume", "topic": args.topic, "partitions": len(tps),
        "fetch_max_bytes": args.fetch_max_bytes, "max_partition_fetch_bytes": args.max_partition_fetch_bytes,
        "records": count, "bytes": nbytes, "seconds": rounded(seconds),
        "records_per_s": rounded(count / seconds, 1), "mb_per_s": rounded(nbytes / seconds / 1e6),
        "polls": len(durations), "latency_ms": percentiles_ms(durations),
    })
    return 0


if __name__ == "__main__":
    run_main(main)
