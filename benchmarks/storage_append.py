"""Micro benchmark of the storage engine alone: PartitionLog.append, flush and read on a temp directory.

    python -m benchmarks.storage_append [--batches 20000] [--records 10] [--value-bytes 100]

Prints one JSON line. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from logbroker_client.records import build_batch

from logbroker.storage.config import LogConfig
from logbroker.storage.log import PartitionLog


def run(batches: int, records: int, value_bytes: int, flush_every: int) -> dict[str, object]:
    template = build_batch([(1_700_000_000_000 + i, None, b"x" * value_bytes, []) for i in range(records)])
    with tempfile.TemporaryDirectory() as tmp:
        log = PartitionLog.open(Path(tmp) / "bench-0", LogConfig(segment_bytes=256 << 20), "bench", 0)
        started = time.perf_counter()
        for i in range(batches):
            log.append(bytearray(template), 1, 1_700_000_000_000)
            if flush_every and i % flush_every == flush_every - 1:
                log.flush()
        log.flush()
        append_s = time.perf_counter() - started

        started = time.perf_counter()
        offset, read_bytes = 0, 0
        while offset < log.log_end_offset:
            data = log.read(offset, 1 << 20)
            read_bytes += len(data)
            offset += (len(data) // len(template)) * records
        read_s = time.perf_counter() - started
        log.close()
    total_bytes = batches * len(template)
    return {
        "benchmark": "storage_append",
        "batches": batches,
        "records_per_batch": records,
        "batch_bytes": len(template),
        "flush_every_batches": flush_every,
        "append_batches_per_s": round(batches / append_s),
        "append_records_per_s": round(batches * records / append_s),
        "append_mb_per_s": round(total_bytes / append_s / 1e6, 1),
        "append_us_per_batch": round(append_s / batches * 1e6, 2),
        "read_mb_per_s": round(read_bytes / read_s / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batches", type=int, default=20_000)
    parser.add_argument("--records", type=int, default=10)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--flush-every", type=int, default=100, help="flush() after this many appends (0: end only)")
    args = parser.parse_args()
    print(json.dumps(run(args.batches, args.records, args.value_bytes, args.flush_every)))


if __name__ == "__main__":
    main()
