"""flush="always" fsyncs before acknowledging; flush="interval" acknowledges at once and fsyncs on a timer."""

from __future__ import annotations

from logbroker_client import Admin, Producer

from logbroker.storage.log import PendingFlush
from tests.support.brokers import InProcessBroker, wait_until

WRITES = 20


def count_flushes(broker: InProcessBroker, topic: str) -> list[int]:
    """Wrap the partition log's flush (in the pool) and end_flush (the second half of a flush whose fsync ran in
    the native fsync threads) so the test can count fsyncs."""
    assert broker.server is not None
    replica = broker.server.broker.replicas.replica(topic, 0)
    assert replica is not None
    calls = [0]
    log = replica.log
    real_flush, real_end_flush = log.flush, log.end_flush

    def counted() -> int:
        calls[0] += 1
        return real_flush()

    def counted_end(pending: PendingFlush, error: OSError | None) -> int:
        calls[0] += 1
        return real_end_flush(pending, error)

    log.flush = counted  # type: ignore[method-assign]
    log.end_flush = counted_end  # type: ignore[method-assign]
    return calls


def write_one_at_a_time(address: str, topic: str) -> None:
    with Producer(address, acks=1, linger_ms=0) as producer:
        for i in range(WRITES):
            producer.send(topic, value=b"%d" % i).result(timeout=10)


def test_flush_always_fsyncs_every_acknowledged_write(broker: InProcessBroker) -> None:
    Admin(broker.address).create_topic("always", configs={"flush": "always"})
    calls = count_flushes(broker, "always")
    write_one_at_a_time(broker.address, "always")
    assert calls[0] >= WRITES  # one request at a time: no two writes share an fsync


def test_flush_interval_acknowledges_without_fsync_and_fsyncs_on_its_timer(broker: InProcessBroker) -> None:
    Admin(broker.address).create_topic("interval", configs={"flush": "interval", "flush.interval.ms": "100000"})
    calls = count_flushes(broker, "interval")
    write_one_at_a_time(broker.address, "interval")
    assert calls[0] == 0  # the timer (100 s) has not come round: nothing was fsynced for the acks
    Admin(broker.address).create_topic("interval-fast", configs={"flush": "interval", "flush.interval.ms": "50"})
    fast_calls = count_flushes(broker, "interval-fast")
    wait_until(lambda: fast_calls[0] >= 2, 10, "the 50 ms flush timer to fsync the log twice")


def test_a_topic_altered_to_interval_flushes_is_fsynced_on_its_timer(broker: InProcessBroker) -> None:
    """The interval flusher looks over the partitions again after a config change (not on a fixed rescan of
    every partition), so a topic switched from flush="always" to interval flushes is picked up."""
    admin = Admin(broker.address)
    admin.create_topic("switched", configs={"flush": "always"})
    calls = count_flushes(broker, "switched")
    assert broker.server is not None
    server = broker.server
    wait_until(lambda: server.broker.maintenance._scanned_layout == server.broker.replicas.layout_version, 10,
               "the interval flusher to have looked over the new partition (and found it flush=always)")
    admin.alter_topic_configs("switched", {"flush": "interval", "flush.interval.ms": "50"})
    wait_until(lambda: calls[0] >= 2, 10, "the altered topic's 50 ms flush timer to fsync its log twice")
