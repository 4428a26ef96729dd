"""Consume rate in a consumer group of one against plain assign(), on the same topic and records.

    python -m benchmarks.group_consume                       # a temporary broker, 500,000 records of 100 bytes
    python -m benchmarks.group_consume --bootstrap H:P       # an existing cluster (the topic is topped up)

Each round reads the whole topic from its beginning twice, once per way, alternating which goes first:
``assign`` (Consumer().assign(every partition), seek to the beginning) and ``group`` (Consumer(group_id=a
new group, auto_offset_reset="earliest").subscribe([topic]), auto-commit on as by default, so the
heartbeat thread and the commits are part of the price). Two rates per way: ``records_per_s`` from the
assign() or subscribe() call to the last record (the group's join included), and ``steady_records_per_s``
from the first record to the last. The medians over the rounds are compared: ``ratio`` is group / assign
(goal: at least 0.9, i.e. within 10%). Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from logbroker_client.admin import Admin
from logbroker_client.consumer import Consumer
from logbroker_client.errors import LogbrokerError
from logbroker_client.producer import Producer
from logbroker_client.types import TopicPartition

from benchmarks.common import TemporaryBroker, emit, ensure_topic, payloads, rounded, run_main

STALL_TIMEOUT_S = 30.0  # no record for this long means the run is stuck, not slow
GOAL_RATIO = 0.9
CONTROL_SLACK = 1000  # offsets beyond --records, for the ones that hold no record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.group_consume", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", default=None, help="an existing cluster (default: a temporary broker)")
    parser.add_argument("--topic", default="bench-group-consume")
    parser.add_argument("--partitions", type=int, default=4, help="partitions when the tool creates the topic")
    parser.add_argument("--records", type=int, default=500_000, help="records to read in each run")
    parser.add_argument("--record-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5, help="runs of each way (alternating)")
    args = parser.parse_args(argv)
    if args.records < 1 or args.rounds < 1:
        parser.error("--records and --rounds must be at least 1")
    return args


def topic_partitions(bootstrap: str, topic: str) -> list[TopicPartition]:
    with Admin(bootstrap) as admin:
        described = admin.describe_topics([topic])[0]
    return [TopicPartition(topic, p.partition) for p in described.partitions]


def top_up(bootstrap: str, topic: str, records: int, record_size: int) -> int:
    """Produce until the topic spans `records` offsets and CONTROL_SLACK more (some offsets hold a leader's no-op
    batch, not a record); returns the offsets it spans."""
    tps = topic_partitions(bootstrap, topic)
    with Consumer(bootstrap) as probe:
        begin, end = probe.beginning_offsets(tps), probe.end_offsets(tps)
    held = sum(end[tp] - begin[tp] for tp in tps)
    missing = records + CONTROL_SLACK - held
    if missing > 0:
        values = payloads(record_size)
        with Producer(bootstrap, acks="1") as producer:
            for i in range(missing):
                producer.send(topic, values[i % len(values)])
            failed = producer.flush()
        if failed:
            raise LogbrokerError(f"{failed} of the {missing} records written to top the topic up failed")
    return max(held, records + CONTROL_SLACK)


def read(consumer: Consumer, records: int) -> tuple[float, float]:
    """Poll until `records` records came; (seconds until the first, seconds until the last), from now."""
    clock = time.perf_counter
    started = last_data = clock()
    first: float | None = None
    count = 0
    while count < records:
        batch = consumer.poll(timeout=1.0, max_records=records - count)
        now = clock()
        if batch:
            if first is None:
                first = now
            last_data = now
            count += len(batch)
        elif now - last_data > STALL_TIMEOUT_S:
            raise LogbrokerError(f"no record arrived for {STALL_TIMEOUT_S:.0f}s after {count} of {records}")
    assert first is not None
    return first - started, clock() - started


def run_assign(bootstrap: str, topic: str, records: int) -> tuple[float, float]:
    tps = topic_partitions(bootstrap, topic)
    with Consumer(bootstrap, auto_offset_reset="earliest") as consumer:
        started = time.perf_counter()
        consumer.assign(tps)
        consumer.seek_to_beginning()
        setup = time.perf_counter() - started
        first, last = read(consumer, records)
    return setup + first, setup + last


def run_group(bootstrap: str, topic: str, records: int) -> tuple[float, float]:
    group_id = f"bench-consume-{uuid.uuid4().hex[:8]}"  # new each run: no committed offsets, so from the beginning
    with Consumer(bootstrap, group_id=group_id, auto_offset_reset="earliest") as consumer:
        started = time.perf_counter()
        consumer.subscribe([topic])
        setup = time.perf_counter() - started
        first, last = read(consumer, records)
    return setup + first, setup + last


def rates(runs: list[tuple[float, float]], records: int) -> dict[str, Any]:
    totals = [records / last for _, last in runs]
    steady = [records / (last - first) for first, last in runs if last > first]
    return {"records_per_s": rounded(statistics.median(totals), 1),
            "steady_records_per_s": rounded(statistics.median(steady), 1) if steady else None,
            "first_record_ms": rounded(statistics.median(first for first, _ in runs) * 1000, 1),
            "runs_records_per_s": [rounded(rate, 1) for rate in totals]}


def measure(bootstrap: str, topic: str, records: int, rounds: int) -> dict[str, Any]:
    ways: dict[str, Callable[[str, str, int], tuple[float, float]]] = {"assign": run_assign, "group": run_group}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for index in range(rounds):
        order = list(ways) if index % 2 == 0 else list(reversed(ways))
        for name in order:
            runs[name].append(ways[name](bootstrap, topic, records))
    result = {name: rates(found, records) for name, found in runs.items()}
    ratio = result["group"]["records_per_s"] / result["assign"]["records_per_s"]
    steady_ratio = None
    if result["group"]["steady_records_per_s"] and result["assign"]["steady_records_per_s"]:
        steady_ratio = rounded(result["group"]["steady_records_per_s"] / result["assign"]["steady_records_per_s"])
    return {**result, "ratio": rounded(ratio), "steady_ratio": steady_ratio, "goal_ratio": GOAL_RATIO,
            "within_goal": ratio >= GOAL_RATIO}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    broker = TemporaryBroker().start() if args.bootstrap is None else None
    try:
        bootstrap = args.bootstrap or (broker.address if broker is not None else "")
        ensure_topic(bootstrap, args.topic, args.partitions, None)
        held = top_up(bootstrap, args.topic, args.records, args.record_size)
        result = measure(bootstrap, args.topic, args.records, args.rounds)
        emit({"tool": "group_consume", "topic": args.topic, "partitions": len(topic_partitions(bootstrap, args.topic)),
              "records": args.records, "record_size": args.record_size, "topic_offsets": held,
              "rounds": args.rounds, **result})
    finally:
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    run_main(main)
