"""Backpressure and quotas over real broker processes: a producer pushing past the broker's bound on produce
bytes in flight is throttled (throttle_time_ms > 0) and loses nothing; a client id with a quota is held near
its rate while another is not; retention.bytes keeps a partition's disk use bounded; the free-space floor
refuses produce requests with a clear error."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from logbroker_client import Admin, Consumer, Producer, TopicPartition
from logbroker_client import records as rec
from logbroker_client.errors import StorageError
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from tests.support.brokers import BrokerProcess, wait_until
from tests.support.checker import AckLog, assert_clean, make_value, read_log
from tests.support.disk import bytes_of_files

INFLIGHT_BOUND_BYTES = 256 * 1024
CONCURRENT_REQUESTS = 32
REQUEST_VALUE_BYTES = 100_000
QUOTA_BYTES_PER_S = 200_000
RECORD_BYTES = 1000
WARM_UP_S = 1.5  # the quota's one-second burst is spent before the window measured
WINDOW_S = 2.0
RATE_BAND = (0.5, 1.6)  # a behaviour band around the quota, not a benchmark
UNTHROTTLED_FACTOR = 3  # the client without a quota must do at least this many times the quota


@contextlib.contextmanager
def broker_with(tmp_path: Path, *flags: str) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(tmp_path / "data", extra_args=list(flags)).start()
    try:
        yield broker
    finally:
        broker.kill()


# ------------------------------------------------------------------------------------ in-flight bound

async def produce_concurrently(address: str, topic: str, requests: int) -> list[pb.ProduceResponse]:
    batch = rec.build_batch([(int(time.time() * 1000), None, os.urandom(REQUEST_VALUE_BYTES), [])])
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.BrokerStub(channel)
        calls = [stub.Produce(pb.ProduceRequest(acks=-1, timeout_ms=30_000, partitions=[
            pb.PartitionRecords(topic=topic, partition=n % 4, records=batch)]),
            timeout=60, metadata=(("client-id", "pusher"),)) for n in range(requests)]
        return list(await asyncio.gather(*calls))


def test_requests_past_the_in_flight_bound_wait_and_are_answered_with_a_throttle_time(tmp_path: Path) -> None:
    with broker_with(tmp_path, "--max-inflight-produce-bytes", str(INFLIGHT_BOUND_BYTES)) as broker:
        Admin(broker.address).create_topic("pushed", partitions=4)
        answers = asyncio.run(produce_concurrently(broker.address, "pushed", CONCURRENT_REQUESTS))
        errors = [r.error_message for a in answers for r in a.results if r.error_code]
        assert not errors, errors[:3]  # they waited for room rather than failing
        throttled = [a.throttle_time_ms for a in answers if a.throttle_time_ms > 0]
        # 32 requests of 100 kB against a 256 kB bound: at most two run at once, the others queue.
        assert len(throttled) >= CONCURRENT_REQUESTS // 2, [a.throttle_time_ms for a in answers]
        stored = read_log(broker.address, "pushed", range(4))
        assert sum(len(records) for records in stored.values()) == CONCURRENT_REQUESTS  # every one written once
        print(f"\nin-flight bound {INFLIGHT_BOUND_BYTES} B: {len(throttled)}/{CONCURRENT_REQUESTS} answers "
              f"throttled, longest {max(throttled)} ms")


def test_a_producer_past_the_in_flight_bound_is_slowed_and_loses_nothing(tmp_path: Path) -> None:
    with broker_with(tmp_path, "--max-inflight-produce-bytes", str(INFLIGHT_BOUND_BYTES)) as broker:
        Admin(broker.address).create_topic("steady", partitions=6)
        acks = AckLog()
        # Six partitions with up to 16 batches of 64 kB each in flight: far past the 256 kB bound.
        with Producer(broker.address, linger_ms=20, batch_size=64 * 1024, client_id="steady") as producer:
            for seq in range(6000):
                value = make_value(seq, 500)
                producer.send("steady", value).add_done_callback(acks.callback(value))
            assert producer.flush(timeout=120) == 0
        assert acks.count() == 6000, acks.summary()
        assert_clean(acks.snapshot(), read_log(broker.address, "steady", range(6)))


# ------------------------------------------------------------------------------------------ quotas

class AckedBytes:
    """Bytes acknowledged (or consumed) over time, from callbacks of any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[tuple[float, int]] = []

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.events.append((time.monotonic(), nbytes))

    def rate_bytes_per_s(self, start: float, end: float) -> float:
        with self._lock:
            return sum(n for at, n in self.events if start <= at < end) / (end - start)


def produce_flat_out(address: str, client_id: str, until: float, counted: AckedBytes) -> None:
    value = b"v" * RECORD_BYTES
    # Small requests, so the throttle comes in small steps rather than one long pause per large request.
    with Producer(address, client_id=client_id, linger_ms=2, batch_size=8 * 1024, max_request_bytes=32 * 1024,
                  buffer_memory=256 * 1024) as producer:
        while time.monotonic() < until:
            producer.send("quota", value, partition=0).add_done_callback(
                lambda f: counted.add(RECORD_BYTES) if f.exception() is None else None)


def consume_flat_out(address: str, client_id: str, until: float, counted: AckedBytes) -> None:
    with Consumer(address, client_id=client_id, auto_offset_reset="earliest", fetch_max_bytes=16 * 1024,
                  max_partition_fetch_bytes=16 * 1024) as consumer:
        consumer.assign([TopicPartition("quota", 0)])
        while time.monotonic() < until:
            for record in consumer.poll(timeout=0.2):
                counted.add(len(record.value or b""))


def measure(work: Callable[[str, str, float, AckedBytes], None], address: str) -> tuple[float, float]:
    """Run work for the quota'd client id and an unthrottled one at once: the first one's rate over the window
    after its warm-up, and the second one's over the whole run (it may finish early: a fetch of what is there)."""
    began = time.monotonic()
    until = began + WARM_UP_S + WINDOW_S
    slow, fast = AckedBytes(), AckedBytes()
    threads = [threading.Thread(target=work, args=(address, "slow", until, slow)),
               threading.Thread(target=work, args=(address, "fast", until, fast))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    start = began + WARM_UP_S
    return slow.rate_bytes_per_s(start, start + WINDOW_S), fast.rate_bytes_per_s(began, until)


@pytest.mark.slow  # 9 s (it produces at a quota for seconds): make test-slow
def test_a_client_id_with_a_quota_is_held_near_its_rate_while_another_is_not(tmp_path: Path) -> None:
    quota = f"slow:produce={QUOTA_BYTES_PER_S},fetch={QUOTA_BYTES_PER_S}"
    with broker_with(tmp_path, "--client-quota", quota) as broker:
        Admin(broker.address).create_topic("quota", partitions=1)
        produced = measure(produce_flat_out, broker.address)
        consumed = measure(consume_flat_out, broker.address)
    print(f"\nquota {QUOTA_BYTES_PER_S} B/s: produce slow {produced[0]:.0f} B/s, fast {produced[1]:.0f} B/s; "
          f"fetch slow {consumed[0]:.0f} B/s, fast {consumed[1]:.0f} B/s")
    low, high = RATE_BAND
    for slow, fast in (produced, consumed):
        assert low * QUOTA_BYTES_PER_S <= slow <= high * QUOTA_BYTES_PER_S, (produced, consumed)
        assert fast >= UNTHROTTLED_FACTOR * QUOTA_BYTES_PER_S, (produced, consumed)


# ------------------------------------------------------------------------------------- disk use

def directory_bytes(path: Path) -> int:
    return bytes_of_files(path.rglob("*.log"))


def test_retention_bytes_keeps_a_partition_bounded_on_disk(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text("retention_check_interval_ms = 200\n")
    with broker_with(tmp_path, "--config", str(config)) as broker:
        segment_bytes, retention_bytes = 64 * 1024, 256 * 1024
        Admin(broker.address).create_topic("bounded", partitions=1, configs={
            "segment.bytes": str(segment_bytes), "retention.bytes": str(retention_bytes)})
        with Producer(broker.address, linger_ms=5, batch_size=16 * 1024) as producer:
            for seq in range(4000):  # 2 MB: eight times what retention keeps
                producer.send("bounded", make_value(seq, 500))
            assert producer.flush(timeout=60) == 0
        partition_dir = next(p for p in (tmp_path / "data").rglob("bounded-0*") if p.is_dir())
        # What retention keeps: at least retention.bytes, plus the active segment and one it cannot split.
        kept_bound = retention_bytes + 2 * segment_bytes
        wait_until(lambda: directory_bytes(partition_dir) <= kept_bound, 20,
                   f"retention to cut {partition_dir} down to {kept_bound} bytes")
        with Consumer(broker.address) as consumer:
            start = consumer.beginning_offsets([TopicPartition("bounded", 0)])[TopicPartition("bounded", 0)]
        assert start > 0  # the oldest records went


def test_a_produce_below_the_free_space_floor_is_refused_naming_the_partition_and_the_setting(tmp_path: Path) -> None:
    floor = shutil.disk_usage(tmp_path).free + (1 << 40)  # a terabyte more than there is: always below it
    with broker_with(tmp_path, "--min-free-disk-bytes", str(floor)) as broker:
        Admin(broker.address).create_topic("floor", partitions=1)
        with Producer(broker.address, delivery_timeout_ms=5000) as producer:
            error = producer.send("floor", b"v").exception(timeout=30)
    assert isinstance(error, StorageError), repr(error)
    assert "floor-0" in str(error) and "min_free_disk_bytes" in str(error) and "nothing was written" in str(error)


@pytest.fixture(autouse=True)
def _short_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOGBROKER_BOOTSTRAP", raising=False)
