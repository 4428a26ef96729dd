"""The standard benchmark set (`make bench`): each tool in its own process, then a comparison table.

    python -m benchmarks.suite                 # a temporary broker on a free port, data in a temp dir
    python -m benchmarks.suite --quick         # smaller runs, for a smoke test
    python -m benchmarks.suite --bootstrap a:9092,b:9092,c:9092   # an existing cluster

Every tool runs as a separate process (one client process each, as a real producer or consumer
would be), prints its JSON line, and the suite prints that line as it arrives and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.common import TemporaryBroker


@dataclass
class Run:
    name: str
    module: str
    args: list[str]


def standard_runs(records: int, one_at_a_time_s: float, partitions: int, replication: int | None,
                  tag: str) -> list[Run]:
    topic_args = ["--partitions", str(partitions), "--create-topic"]
    if replication:
        topic_args += ["--replication-factor", str(replication)]
    common = ["--records", str(records), "--record-size", "100", *topic_args]
    acks1_topic = f"bench-acks1-{tag}"
    paced_records = max(1, int(2000 * one_at_a_time_s))
    return [
        Run("produce acks=1", "benchmarks.produce", ["--topic", acks1_topic, "--acks", "1", *common]),
        Run("produce acks=all", "benchmarks.produce", ["--topic", f"bench-acksall-{tag}", "--acks", "all", *common]),
        Run("produce acks=1 zstd", "benchmarks.produce",
            ["--topic", f"bench-zstd-{tag}", "--acks", "1", "--compression", "zstd", *common]),
        # Reads what the first run wrote (--prepare tops it up if that run was skipped or failed).
        Run("consume from beginning", "benchmarks.consume",
            ["--topic", acks1_topic, "--records", str(records), "--partitions", str(partitions), "--prepare"]),
        Run("paced acks=all 2000/s", "benchmarks.produce",
            ["--topic", f"bench-paced-{tag}", "--acks", "all", "--paced", "--rate", "2000",
             "--records", str(paced_records), "--max-seconds", str(one_at_a_time_s * 3),
             "--record-size", "100", *topic_args]),
    ]


def run_one(run: Run, bootstrap: str) -> dict[str, Any] | None:
    """Run one tool; its stderr (progress, errors) passes through, its stdout is the JSON line."""
    cmd = [sys.executable, "-m", run.module, "--bootstrap", bootstrap, *run.args]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"suite: {run.name} failed (exit {done.returncode})", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(lines[-1])
    print(lines[-1], flush=True)
    return result


def figure(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_table(results: list[tuple[Run, dict[str, Any] | None]]) -> None:
    headers = ("benchmark", "records", "records/s", "MB/s", "p50 ms", "p99 ms", "p99.9 ms")
    rows = []
    for run, result in results:
        if result is None:
            rows.append((run.name, "failed", "-", "-", "-", "-", "-"))
            continue
        latency = result.get("latency_ms", {})
        rows.append((run.name, f"{result['records']:,}", figure(result["records_per_s"], 0),
                     figure(result["mb_per_s"]), figure(latency.get("p50"), 2), figure(latency.get("p99"), 2),
                     figure(latency.get("p999"), 2)))
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    print()
    for row in [headers, *rows]:
        cells = [str(row[0]).ljust(widths[0])] + [str(c).rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        print("  ".join(cells))
    print("latency: produce = send to acknowledgement (every 8th record); paced = each record sent alone at "
          "2000/s, from when it was due to its acknowledgement; consume = duration of each poll() call")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", help="run against this cluster instead of a temporary broker")
    parser.add_argument("--quick", action="store_true", help="100,000 records and 1 s of paced sends")
    parser.add_argument("--records", type=int, help="records per throughput run (default 1,000,000)")
    parser.add_argument("--partitions", type=int, default=1, help="partitions of each benchmark topic")
    parser.add_argument("--replication-factor", type=int, help="of each benchmark topic (default: the broker's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    records = args.records or (100_000 if args.quick else 1_000_000)
    runs = standard_runs(records, 1.0 if args.quick else 5.0, args.partitions, args.replication_factor,
                         tag=time.strftime("%Y%m%d-%H%M%S"))
    broker = None if args.bootstrap else TemporaryBroker().start()
    bootstrap = args.bootstrap or broker.address  # type: ignore[union-attr]
    where = args.bootstrap or f"a temporary broker on {bootstrap} (flush=always)"
    print(f"suite: {len(runs)} runs against {where}", file=sys.stderr, flush=True)
    try:
        results = [(run, run_one(run, bootstrap)) for run in runs]
    finally:
        if broker is not None:
            broker.stop()
    print_table(results)
    return 0 if all(result is not None for _, result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
