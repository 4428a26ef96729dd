"""Soak: one producer writes as fast as it can to a topic whose consumer (a consumer-group member) reads ten times
slower, on a real three-broker cluster. The brokers' memory stays flat (RSS growth under 50 MB once warmed up)
and nothing acknowledged is lost (everything is read back and checked at the end).

The default suite runs it for SHORT_SOAK_S; `make test-slow` for LOGBROKER_BACKPRESSURE_SOAK_S (default three
minutes). The measured figures are printed (run pytest with -s to see them)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from logbroker_client import Admin, Consumer

from tests.support.checker import AckLog, ProducerLoad, assert_clean, read_log
from tests.support.cluster import BrokerCluster, running_cluster
from tests.support.rss import peak_rss, rss_mb

TOPIC = "firehose"
PARTITIONS = 3
VALUE_BYTES = 1000
SLOWDOWN = 10  # the consumer reads one record for every ten acknowledged
WARM_UP_S = 10.0  # caches and buffers fill; the RSS baseline is taken after it
SHORT_WARM_UP_S = 5.0
SHORT_SOAK_S = 15.0
LONG_SOAK_S = float(os.environ.get("LOGBROKER_BACKPRESSURE_SOAK_S", "180"))
RSS_GROWTH_LIMIT_MB = 50
MAX_UNACKNOWLEDGED = 20_000  # the producer's own bound: past it, it waits for acknowledgements


class SlowGroupReader:
    """A consumer-group member that keeps its count of records read at a tenth of those acknowledged."""

    def __init__(self, bootstrap: str, acks: AckLog) -> None:
        self.bootstrap = bootstrap
        self.acks = acks
        self.read = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-reader", daemon=True)

    def start(self) -> SlowGroupReader:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with Consumer(self.bootstrap, group_id="slow-readers", auto_offset_reset="earliest",
                          client_id="slow-reader") as consumer:
                consumer.subscribe([TOPIC])
                while not self._stop.is_set():
                    if self.read * SLOWDOWN >= self.acks.count():
                        self._stop.wait(0.01)
                        continue
                    self.read += len(consumer.poll(timeout=0.2, max_records=100))
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the slow reader did not stop within 60 s"
        if self.error is not None:
            raise AssertionError(f"the slow reader failed: {self.error!r}") from self.error


def soak(root: Path, duration_s: float, warm_up_s: float = WARM_UP_S) -> None:
    with running_cluster(root) as cluster:
        Admin(cluster.bootstrap).create_topic(TOPIC, partitions=PARTITIONS, replication_factor=3)
        acks = AckLog()
        load = ProducerLoad(cluster.bootstrap, TOPIC, PARTITIONS, acks, value_size=VALUE_BYTES,
                            max_outstanding=MAX_UNACKNOWLEDGED, rate_per_s=float("inf"),
                            producer_args={"linger_ms": 5, "batch_size": 256 * 1024, "request_timeout_ms": 30_000,
                                           "delivery_timeout_ms": 120_000, "client_id": "firehose"}).start()
        reader = SlowGroupReader(cluster.bootstrap, acks).start()
        pids = dict(cluster.pids())
        try:
            time.sleep(warm_up_s)  # a fixed warm-up of load, not a wait for a condition
            baseline_mb = {node: rss_mb(pid) for node, pid in pids.items()}
            acked_at_baseline = acks.count()
            with peak_rss(pids.values()) as rss:
                deadline = time.monotonic() + duration_s
                while time.monotonic() < deadline and load.error is None and reader.error is None:
                    time.sleep(0.5)
            final_mb = {node: rss_mb(pid) for node, pid in pids.items()}
        finally:
            load.stop(timeout_s=180)
            reader.stop()
        report(cluster, baseline_mb, final_mb, {n: rss.peak_mb[p] for n, p in pids.items()}, acks,
               acks.count() - acked_at_baseline, duration_s, reader.read, warm_up_s)
        assert acks.failed == 0, acks.summary()
        assert reader.read * SLOWDOWN <= acks.count() + SLOWDOWN * 100  # it really was ten times slower
        for node in pids:
            assert final_mb[node] - baseline_mb[node] < RSS_GROWTH_LIMIT_MB, (node, baseline_mb, final_mb)
        assert_clean(acks.snapshot(), read_log(cluster.bootstrap, TOPIC, range(PARTITIONS), timeout_s=600))


def report(cluster: BrokerCluster, baseline_mb: dict[int, int], final_mb: dict[int, int], peak_mb: dict[int, int],
           acks: AckLog, acked_in_window: int, duration_s: float, read: int, warm_up_s: float) -> None:
    rate = acked_in_window * VALUE_BYTES / duration_s / 1e6
    print(f"\nbackpressure soak, {duration_s:.0f} s after a {warm_up_s:.0f} s warm-up: {acks.count()} records "
          f"acknowledged ({rate:.1f} MB/s in the window), {read} read by the slow group member, "
          f"{acks.failed} failed")
    for node in sorted(baseline_mb):
        print(f"  broker {node}: RSS {baseline_mb[node]} MB after warm-up, {final_mb[node]} MB at the end "
              f"(growth {final_mb[node] - baseline_mb[node]:+d} MB, peak {peak_mb[node]} MB)")


@pytest.mark.slow  # 30 s: with make test-slow, beside the three-minute soak; keeps the default suite under 10 min
def test_a_fast_producer_and_a_ten_times_slower_group_keep_broker_memory_flat_briefly(tmp_path: Path) -> None:
    soak(tmp_path, SHORT_SOAK_S, SHORT_WARM_UP_S)


@pytest.mark.slow
def test_a_fast_producer_and_a_ten_times_slower_group_keep_broker_memory_flat_for_minutes(tmp_path: Path) -> None:
    soak(tmp_path, LONG_SOAK_S)
