"""The acknowledged-records checker: what the producer was told must be what the log holds.

Three parts, usable on their own:

- ``AckLog``: thread-safe record of acknowledgements, fed by producer done-callbacks: value ->
  (partition, offset) for every acknowledged record, and a count (and a sample) of the failed ones.
  A failed record is not a violation: it may or may not be in the log (the write may have committed
  after the client gave up), and the checker makes no claim about it.
- ``read_log``: reads every partition of a topic from offset 0 to its end through a ``Consumer``,
  starting over from the last position whenever a leader moves or a broker is unreachable.
- ``check(acked, log)``: the list of violations (empty when the log is right):
  an acknowledged record is missing; it is stored at another (partition, offset) than it was
  acknowledged with; it is stored more than once; offsets of a partition are not strictly increasing
  as read; acknowledged records of a partition, ordered by the sequence number in their value, are
  not in offset order.

Values carry their sequence number: ``make_value(seq)`` is ``b"%012d|"`` followed by padding, and
``sequence_of`` reads it back. ``ProducerLoad`` is a producer thread that sends such values
continuously, with a bound on unacknowledged records, and feeds an AckLog.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from logbroker_client import Consumer, Producer, TopicPartition
from logbroker_client.errors import LogbrokerError

SEQ_DIGITS = 12
MAX_VIOLATIONS_SHOWN = 20
DEFAULT_LOAD_RATE_PER_S = 5000.0  # enough to have batches in flight at any moment, little enough to read back fast


class Stored(NamedTuple):
    """One record as read back: its offset and value."""

    offset: int
    value: bytes


def make_value(seq: int, size: int = 0, tag: bytes = b"") -> bytes:
    """b'000000000042|tag' padded with '.' to `size` bytes (at least the sequence and the tag)."""
    head = b"%0*d|" % (SEQ_DIGITS, seq) + tag
    return head + b"." * max(0, size - len(head))


def sequence_of(value: bytes) -> int:
    return int(value[:SEQ_DIGITS])


# ------------------------------------------------------------------------------------- AckLog


class AckLog:
    """What the producers were told: value -> (partition, offset), and how many sends failed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acked: dict[bytes, tuple[int, int]] = {}
        self.failed = 0
        self.errors: Counter[str] = Counter()  # exception class name -> count
        self.first_errors: list[str] = []
        self.completed = 0

    def callback(self, value: bytes) -> Callable[[Any], None]:
        """A done-callback for the future of a record with this value."""
        def on_done(future: Any) -> None:
            error = future.exception()
            if error is None:
                meta = future.result()
                self.ack(value, meta.partition, meta.offset)
            else:
                self.fail(value, error)
        return on_done

    def ack(self, value: bytes, partition: int, offset: int) -> None:
        with self._lock:
            previous = self.acked.get(value)
            if previous is not None and previous != (partition, offset):
                # One value acknowledged twice at different places: keep both visible to check().
                self.errors["acknowledged twice"] += 1
                self.first_errors.append(f"{value[:24]!r} acknowledged at {previous} and at {(partition, offset)}")
            self.acked[value] = (partition, offset)
            self.completed += 1

    def fail(self, value: bytes, error: BaseException) -> None:
        with self._lock:
            self.failed += 1
            self.completed += 1
            self.errors[type(error).__name__] += 1
            if len(self.first_errors) < 5:
                self.first_errors.append(f"{value[:24]!r}: {type(error).__name__}: {error}")

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def snapshot(self) -> dict[bytes, tuple[int, int]]:
        with self._lock:
            return dict(self.acked)

    def summary(self) -> str:
        with self._lock:
            return (f"{len(self.acked)} acknowledged, {self.failed} failed {dict(self.errors)}"
                    + (f"; first errors: {self.first_errors}" if self.first_errors else ""))


# -------------------------------------------------------------------------------- the checker


def check(acked: Mapping[bytes, tuple[int, int]], log: Mapping[int, Sequence[Stored]],
          seq_of: Callable[[bytes], int] = sequence_of) -> list[str]:
    """Every violation of 'each acknowledged record is stored once, at its offset, in send order'."""
    violations: list[str] = []
    where: dict[bytes, list[tuple[int, int]]] = {}
    for partition in sorted(log):
        previous: int | None = None
        for record in log[partition]:
            if previous is not None and record.offset <= previous:
                violations.append(f"partition {partition}: offset {record.offset} read after offset {previous} "
                                  "(offsets must strictly increase)")
            previous = record.offset
            where.setdefault(record.value, []).append((partition, record.offset))
    for value, (partition, offset) in sorted(acked.items(), key=lambda item: item[1]):
        places = where.get(value)
        if not places:
            violations.append(f"lost: {value[:24]!r} acknowledged at {partition}/{offset} is not in the log")
            continue
        if len(places) > 1:
            shown = ", ".join(f"{p}/{o}" for p, o in places)
            violations.append(f"duplicate: {value[:24]!r} acknowledged at {partition}/{offset} is stored "
                              f"{len(places)} times: {shown}")
        if (partition, offset) not in places:
            shown = ", ".join(f"{p}/{o}" for p, o in places)
            violations.append(f"moved: {value[:24]!r} acknowledged at {partition}/{offset} is stored at {shown}")
    by_partition: dict[int, list[tuple[int, int, bytes]]] = {}
    for value, (partition, offset) in acked.items():
        by_partition.setdefault(partition, []).append((seq_of(value), offset, value))
    for partition, items in sorted(by_partition.items()):
        items.sort()
        for (seq_a, offset_a, _), (seq_b, offset_b, _) in zip(items, items[1:], strict=False):
            if offset_b <= offset_a:
                violations.append(f"reordered: partition {partition}: sequence {seq_b} acknowledged at offset "
                                  f"{offset_b}, not after sequence {seq_a} at offset {offset_a}")
    return violations


def describe_violations(violations: Sequence[str], limit: int = MAX_VIOLATIONS_SHOWN) -> str:
    kinds = Counter(v.split(":", 1)[0] if not v.startswith("partition") else "offsets" for v in violations)
    shown = "\n  ".join(violations[:limit])
    more = f"\n  ... and {len(violations) - limit} more" if len(violations) > limit else ""
    return f"{len(violations)} violation(s) {dict(kinds)}:\n  {shown}{more}"


def assert_clean(acked: Mapping[bytes, tuple[int, int]], log: Mapping[int, Sequence[Stored]],
                 context: str = "") -> None:
    violations = check(acked, log)
    assert not violations, f"{context}{describe_violations(violations)}"


# -------------------------------------------------------------------------------- reading back


def read_log(bootstrap: str, topic: str, partitions: Iterable[int], timeout_s: float = 60.0) -> dict[int, list[Stored]]:
    """Every record of each partition from offset 0 to the partition's end (its high watermark).

    The end is asked again once reached, and reading stops only when it no longer moves. Broker or
    leadership errors start a fresh consumer from the position reached, until `timeout_s` has passed.
    """
    deadline = time.monotonic() + timeout_s
    return {p: _read_partition(bootstrap, TopicPartition(topic, p), deadline) for p in partitions}


def _read_partition(bootstrap: str, tp: TopicPartition, deadline: float) -> list[Stored]:
    records: list[Stored] = []
    position = 0
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with Consumer(bootstrap, auto_offset_reset="none", fetch_max_wait_ms=100,
                          request_timeout_ms=3000) as consumer:
                consumer.assign([tp])
                consumer.seek(tp, position)
                while time.monotonic() < deadline:
                    end = consumer.end_offsets([tp])[tp]
                    while consumer.position(tp) < end:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"reading {tp} stuck at {consumer.position(tp)} of {end}")
                        for record in consumer.poll(timeout=0.5):
                            records.append(Stored(record.offset, record.value or b""))
                        position = consumer.position(tp)
                    if consumer.end_offsets([tp])[tp] == end:
                        return records
        except LogbrokerError as exc:
            last_error = exc
            time.sleep(0.1)
    raise AssertionError(f"could not read {tp.topic}-{tp.partition} to its end before the deadline "
                         f"(reached offset {position}; last error: {last_error!r})")


# ------------------------------------------------------------------------------- load generator


class ProducerLoad:
    """A thread that sends sequence-numbered values to partitions seq % partitions until stopped.

    It paces itself to `rate_per_s` records a second (catching up after a stall) and keeps at most
    `max_outstanding` records unacknowledged at a time, so a stalled cluster stalls the
    load instead of filling memory. Every acknowledgement and failure goes to `acks`.
    """

    def __init__(self, bootstrap: str, topic: str, partitions: int, acks: AckLog, *, value_size: int = 64,
                 max_outstanding: int = 2000, rate_per_s: float = DEFAULT_LOAD_RATE_PER_S,
                 producer_args: Mapping[str, Any] | None = None) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions
        self.acks = acks
        self.value_size = value_size
        self.max_outstanding = max_outstanding
        self.rate_per_s = rate_per_s
        self.producer_args: dict[str, Any] = {"acks": "all", "linger_ms": 2, "batch_size": 16384,
                                              "request_timeout_ms": 3000, "delivery_timeout_ms": 60_000,
                                              **(producer_args or {})}
        self.sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="producer-load", daemon=True)

    def start(self) -> ProducerLoad:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with Producer(self.bootstrap, **self.producer_args) as producer:
                started = time.monotonic()
                while not self._stop.is_set():
                    ahead_s = self.sent / self.rate_per_s - (time.monotonic() - started)
                    if self.sent - self.acks.completed >= self.max_outstanding or ahead_s > 0:
                        time.sleep(min(max(ahead_s, 0.0), 0.01) or 0.002)
                        continue
                    value = make_value(self.sent, self.value_size)
                    future = producer.send(self.topic, value=value, partition=self.sent % self.partitions)
                    future.add_done_callback(self.acks.callback(value))
                    self.sent += 1
                producer.flush(timeout=self.producer_args["delivery_timeout_ms"] / 1000 + 10)
        except BaseException as exc:  # reported by stop(); the thread must not die silently
            self.error = exc

    def stop(self, timeout_s: float = 90.0) -> None:
        """Stop sending, wait for every outstanding record to be acknowledged or to fail."""
        self._stop.set()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the producer did not finish within {timeout_s}s: {self.acks.summary()}"
        if self.error is not None:
            raise AssertionError(f"the producer thread failed: {self.error!r}") from self.error

    def wait_acked(self, count: int, timeout_s: float, what: str = "") -> None:
        """Wait until `count` records in all are acknowledged."""
        deadline = time.monotonic() + timeout_s
        while self.acks.count() < count:
            if self.error is not None:
                raise AssertionError(f"the producer thread failed: {self.error!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {count} acknowledged records"
                                     f"{' ' + what if what else ''}: {self.acks.summary()}")
            time.sleep(0.02)


def produce_acked(bootstrap: str, topic: str, count: int, acks: AckLog, tag: bytes = b"", partition: int = 0) -> None:
    """Produce ``count`` sequence-numbered acks=all records to one partition and insist all are acknowledged."""
    with Producer(bootstrap, acks="all", linger_ms=2) as producer:
        for seq in range(count):
            value = make_value(seq, tag=tag)
            producer.send(topic, value=value, partition=partition).add_done_callback(acks.callback(value))
        producer.flush(timeout=60)
    assert acks.count() == count, acks.summary()
