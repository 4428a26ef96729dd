"""Producer benchmark: throughput and send-to-ack latency of one client process.

    python -m benchmarks.produce --records 1000000 --record-size 100 --acks 1 --create-topic

Throughput mode sends as fast as the producer takes records and samples every k-th record's latency
(time from send() to its acknowledgement, measured in a done-callback). --one-at-a-time sends one
record, waits for its acknowledgement, and paces sends to --rate; its latency is measured from the
moment the record was due, so a stall shows up as latency instead of silently lowering the rate
(service_ms has the plain send-to-ack time of each record). Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from logbroker_client.progress import Progress

from benchmarks.common import add_connection_args, emit, ensure_topic, payloads, percentiles_ms, rounded, run_main

PROGRESS_EVERY = 1024  # records between progress updates: update() reads the clock
DEFAULT_BATCH_SIZE = 1 << 20  # the producer's default

Outcome = tuple[float, list[float], int, int]  # seconds, latency samples, failed samples, records sent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.produce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_args(parser, "bench-produce")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--record-size", type=int, default=100, help="value bytes per record (keys are null)")
    parser.add_argument("--acks", choices=("all", "1", "0"), default="1")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="producer batch bytes")
    parser.add_argument("--linger-ms", type=float, default=None,
                        help="producer linger (default 5, or 0 with --one-at-a-time)")
    parser.add_argument("--compression", choices=("none", "zstd"), default="none")
    parser.add_argument("--create-topic", action="store_true", help="create the topic first if it is missing")
    parser.add_argument("--sample-every", type=int, default=8, help="measure the latency of every k-th record")
    parser.add_argument("--one-at-a-time", action="store_true", help="wait for each record's ack before the next")
    parser.add_argument("--paced", action="store_true",
                        help="send records one by one at --rate without waiting for acks (linger 0): the latency "
                             "of individual records at a steady rate, as a service sending events would see it")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="records/s target for --one-at-a-time and --paced (0: no pacing)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="--one-at-a-time: stop sending after this long even if records remain")
    parser.add_argument("--flush-each", action="store_true",
                        help="--one-at-a-time: call flush() after each send instead of only waiting for the ack")
    args = parser.parse_args(argv)
    if args.records < 1 or args.record_size < 0 or args.sample_every < 1:
        parser.error("--records and --sample-every must be at least 1, --record-size at least 0")
    if args.linger_ms is None:
        # A lone record should not wait for company that never comes.
        args.linger_ms = 0.0 if args.one_at_a_time or args.paced else 5.0
    if args.paced and args.rate <= 0:
        parser.error("--paced needs --rate")
    return args


def run_throughput(producer: Any, args: argparse.Namespace, values: list[bytes]) -> Outcome:
    """Send every record as fast as possible."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    clock = time.perf_counter

    def on_ack(sent_at: float) -> Any:
        def callback(future: Any) -> None:
            error = future.exception(0)
            if error is None:
                latencies.append(clock() - sent_at)  # list.append is atomic: no lock on the ack thread
            else:
                errors.append(error)
        return callback

    send, topic, pool, every = producer.send, args.topic, len(values), args.sample_every
    progress = Progress("produce", total=args.records, mode="tty")
    started = clock()
    for i in range(args.records):
        if i % every:
            send(topic, values[i % pool])
        else:
            sent_at = clock()
            send(topic, values[i % pool]).add_done_callback(on_ack(sent_at))
        if not i % PROGRESS_EVERY:
            progress.update(PROGRESS_EVERY if i else 1, 0)
    producer.flush()
    seconds = clock() - started
    progress.close()
    if errors:
        warn_failed(len(errors), errors[0])
    return seconds, latencies, len(errors), args.records


def run_one_at_a_time(producer: Any, args: argparse.Namespace, values: list[bytes]) -> Outcome:
    """Send, wait for the ack, repeat at --rate; latency counts from when each record was due."""
    latencies: list[float] = []
    service: list[float] = []  # send to ack of each record alone, not counting time spent behind schedule
    failures = 0
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    clock = time.perf_counter
    progress = Progress("produce", total=args.records, mode="tty")
    started = clock()
    stop_at = started + args.max_seconds if args.max_seconds else float("inf")
    sent = 0
    while sent < args.records and clock() < stop_at:
        due = started + sent * interval if interval else clock()
        delay = due - clock()
        if delay > 0:
            time.sleep(delay)
        sent_at = clock()
        future = producer.send(args.topic, values[sent % len(values)])
        if args.flush_each:
            producer.flush()
        error = future.exception()
        if error is None:
            acked = clock()
            latencies.append(acked - due)  # from when it was due: a late send counts as latency
            service.append(acked - sent_at)
        else:
            failures += 1
            if failures == 1:
                warn_failed(1, error)
        sent += 1
        progress.update()
    seconds = clock() - started
    progress.close()
    args.service_ms = percentiles_ms(service)
    return seconds, latencies, failures, sent


def run_paced(producer: Any, args: argparse.Namespace, values: list[bytes]) -> Outcome:
    """Send each record on its own schedule at --rate, never waiting; every record's latency counts from when
    it was due to its acknowledgement."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    clock = time.perf_counter
    interval = 1.0 / args.rate

    def on_ack(due: float) -> Any:
        def callback(future: Any) -> None:
            error = future.exception(0)
            if error is None:
                latencies.append(clock() - due)
            else:
                errors.append(error)
        return callback

    progress = Progress("produce", total=args.records, mode="tty")
    started = clock()
    stop_at = started + args.max_seconds if args.max_seconds else float("inf")
    sent = 0
    while sent < args.records and clock() < stop_at:
        due = started + sent * interval
        delay = due - clock()
        if delay > 0:
            time.sleep(delay)
        producer.send(args.topic, values[sent % len(values)]).add_done_callback(on_ack(due))
        sent += 1
        progress.update()
    producer.flush()
    seconds = clock() - started
    progress.close()
    if errors:
        warn_failed(len(errors), errors[0])
    return seconds, latencies, len(errors), sent


def warn_failed(count: int, first: BaseException) -> None:
    print(f"produce: {count} sampled record(s) failed; the first with: {first}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from logbroker_client.producer import Producer

    args = parse_args(argv)
    if args.create_topic:
        ensure_topic(args.bootstrap, args.topic, args.partitions, args.replication_factor)
    values = payloads(args.record_size)
    with Producer(args.bootstrap, acks=args.acks, batch_size=args.batch_size, linger_ms=args.linger_ms,
                  compression=args.compression) as producer:
        producer.send(args.topic, b"warm-up").result()  # metadata and channel set up outside the clock
        runner = run_paced if args.paced else run_one_at_a_time if args.one_at_a_time else run_throughput
        seconds, latencies, failures, sent = runner(producer, args, values)
    emit(report(args, seconds, latencies, failures, sent))
    return 1 if failures else 0


def report(args: argparse.Namespace, seconds: float, latencies: list[float], failures: int,
           sent: int) -> dict[str, Any]:
    return {
        "tool": "produce",
        "mode": "paced" if args.paced else "one-at-a-time" if args.one_at_a_time else "throughput",
        "topic": args.topic, "acks": args.acks, "record_size": args.record_size,
        "batch_size": args.batch_size, "linger_ms": args.linger_ms, "compression": args.compression,
        "rate_target": args.rate if args.one_at_a_time or args.paced else None, "flush_each": args.flush_each,
        "records": sent, "records_planned": args.records, "seconds": rounded(seconds),
        "records_per_s": rounded(sent / seconds, 1),
        "mb_per_s": rounded(sent * args.record_size / seconds / 1e6),
        "latency_samples": len(latencies), "failed_samples": failures,
        "latency_ms": percentiles_ms(latencies),
        **({"service_ms": args.service_ms} if args.one_at_a_time else {}),
    }


if __name__ == "__main__":
    run_main(main)
