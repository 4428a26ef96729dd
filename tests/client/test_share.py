"""ShareConsumer and AsyncShareConsumer against a real broker: sharing one partition, release with a delay, reject to
the dead letters, close handing records over at once, lock expiry, max_in_flight, delayed delivery, priority
lanes, the admin calls, and the errors of bad input. One broker serves the module; each test has its own topic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
from logbroker_client import (
    Admin,
    AsyncAdmin,
    AsyncProducer,
    AsyncShareConsumer,
    Consumer,
    Producer,
    ShareConsumer,
    ShareRecord,
    TopicPartition,
)
from logbroker_client.errors import (
    AcknowledgementError,
    InvalidGroupConfigError,
    InvalidGroupIdError,
    InvalidRecordStateError,
    UnknownTopicOrPartitionError,
)

from tests.support.brokers import InProcessBroker

DEADLINE_S = 10.0
LOCK_MS = 1_000  # the shortest lock a group may have


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    broker = InProcessBroker(tmp_path_factory.mktemp("share") / "data").start()
    try:
        yield broker.address
    finally:
        broker.stop()


def queue(bootstrap: str, topic: str, count: int, partitions: int = 1, **send: object) -> list[bytes]:
    """A topic holding `count` records; returns their values."""
    Admin(bootstrap).create_topic(topic, partitions=partitions)
    return produce(bootstrap, topic, [b"%s-%d" % (topic.encode(), n) for n in range(count)], **send)


def produce(bootstrap: str, topic: str, values: Sequence[bytes], **send: object) -> list[bytes]:
    with Producer(bootstrap) as producer:
        for value in values:
            producer.send(topic, value=value, **send)  # type: ignore[arg-type]
        assert producer.flush() == 0
    return list(values)


def worker(bootstrap: str, group: str, topic: str, **options: object) -> ShareConsumer:
    consumer = ShareConsumer(group, bootstrap, **options)  # type: ignore[arg-type]
    consumer.subscribe([topic])
    return consumer


def poll_until(consumer: ShareConsumer, done: Callable[[list[ShareRecord]], bool], what: str,
               timeout_s: float = DEADLINE_S) -> list[ShareRecord]:
    """Poll until done(everything polled so far) holds; fail naming `what` at the deadline."""
    got: list[ShareRecord] = []
    deadline = time.monotonic() + timeout_s
    while not done(got):
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}; got {got}"
        got += consumer.poll(timeout=0.1)
    return got


def set_lock(bootstrap: str, group: str, lock_ms: int = LOCK_MS, **more: str) -> None:
    Admin(bootstrap).alter_group_configs(group, {"share.record.lock.duration.ms": lock_ms, **more})


def test_two_consumers_on_one_partition_both_get_records_and_none_twice_while_acked(bootstrap: str) -> None:
    values = queue(bootstrap, "mail", 200)
    first = worker(bootstrap, "senders", "mail", max_in_flight=10)
    second = worker(bootstrap, "senders", "mail", max_in_flight=10)
    got: dict[str, list[bytes]] = {first.member_id: [], second.member_id: []}
    deadline = time.monotonic() + DEADLINE_S
    while sum(map(len, got.values())) < len(values):
        assert time.monotonic() < deadline, f"only {sum(map(len, got.values()))} of {len(values)} records came"
        for consumer in (first, second):
            for record in consumer.poll(timeout=0.05):
                got[consumer.member_id].append(record.value or b"")
                record.ack()
            assert consumer.in_flight <= 10
    everything = got[first.member_id] + got[second.member_id]
    assert sorted(everything) == sorted(values)  # each once
    assert got[first.member_id] and got[second.member_id]  # both took part, on a single partition
    first.commit()
    second.commit()
    assert first.poll(timeout=0.3) == [] and second.poll(timeout=0.3) == []  # acked: never delivered again
    first.close()
    second.close()


def test_a_release_with_a_delay_comes_back_after_the_delay(bootstrap: str) -> None:
    queue(bootstrap, "retries", 1)
    with worker(bootstrap, "retriers", "retries") as consumer:
        job, = poll_until(consumer, lambda got: len(got) == 1, "the job")
        released_at = time.monotonic()
        job.release(delay_ms=800)
        again, = poll_until(consumer, lambda got: len(got) == 1, "the job to come back")
        waited_s = time.monotonic() - released_at
        assert again.offset == job.offset and again.delivery_count == 2
        assert waited_s >= 0.8, f"came back after {waited_s:.3f}s, before its 800 ms delay"
        again.ack()
        consumer.commit()


def test_a_rejected_record_lands_in_the_dead_letter_topic_with_its_headers(bootstrap: str) -> None:
    produce_at = queue(bootstrap, "payments", 3)
    with worker(bootstrap, "payers", "payments") as consumer:
        records = poll_until(consumer, lambda got: len(got) == 3, "three payments")
        poison = records[1]
        poison.reject("amount is not a number")
        for record in (records[0], records[2]):
            record.ack()
        consumer.commit()
    dead = read_all(bootstrap, "payments.dlq", 1)
    assert [r.value for r in dead] == [produce_at[1]]
    headers = {key: value for key, value in dead[0].headers}
    assert headers == {"lb.dlq.topic": b"payments", "lb.dlq.partition": b"0", "lb.dlq.offset": b"%d" % poison.offset,
                       "lb.dlq.delivery.count": b"1", "lb.dlq.group": b"payers",
                       "lb.dlq.reason": b"amount is not a number"}


def read_all(bootstrap: str, topic: str, count: int) -> list[ShareRecord]:
    """The first `count` records of partition 0 of a topic (waiting for it to be created and filled)."""
    deadline = time.monotonic() + DEADLINE_S
    while topic not in Admin(bootstrap).list_topics():
        assert time.monotonic() < deadline, f"{topic} was not created"
        time.sleep(0.05)
    with Consumer(bootstrap, auto_offset_reset="earliest") as reader:
        reader.assign([TopicPartition(topic, 0)])
        got: list[ShareRecord] = []
        while len(got) < count:
            assert time.monotonic() < deadline, f"only {len(got)} of {count} records in {topic}"
            got += reader.poll(timeout=0.1)  # type: ignore[arg-type]
    return got


def test_close_releases_held_records_to_another_consumer_at_once(bootstrap: str) -> None:
    values = queue(bootstrap, "reports", 20)
    first = worker(bootstrap, "reporters", "reports")
    held = poll_until(first, lambda got: len(got) == 20, "every report")
    first.close()
    closed_at = time.monotonic()
    with worker(bootstrap, "reporters", "reports") as second:
        again = poll_until(second, lambda got: len(got) == 20, "the released reports")
        # The group's retry backoff (1 s) does not apply: close() gives records back to be taken now.
        assert time.monotonic() - closed_at < 0.9
        assert sorted(r.value for r in again) == sorted(values) == sorted(r.value for r in held)
        assert all(r.delivery_count == 2 for r in again)
        for record in again:
            record.ack()


def interrupt_once(consumer: ShareConsumer, method: str, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Make the consumer's `method` raise KeyboardInterrupt (Ctrl-C) on its first call, before it does anything;
    returns the arguments of that call."""
    real = getattr(consumer, method)
    struck: list[object] = []

    def interrupted(*args: object) -> object:
        if not struck:
            struck.extend(args)
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(consumer, method, interrupted)
    return struck


LONG_LOCK_MS = 60_000  # longer than any deadline here: records come back only by being given back


@pytest.mark.parametrize("window", ["answer taken off the queue", "request never sent"])
def test_ctrl_c_at_any_point_of_a_fetch_lets_close_give_everything_back_at_once(
        bootstrap: str, window: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C can strike between taking a fetch's answer off the queue and taking it in (so the records it
    acquired are held by no one), or between planning a request and sending it (so its answer never comes).
    close() must still give back at once whatever the member holds, and wait for no answer it will not get."""
    topic, group = f"interrupted-{window.split()[-1]}", f"interrupted-{window.split()[-1]}-workers"
    values = queue(bootstrap, topic, 5)
    set_lock(bootstrap, group, LONG_LOCK_MS)
    first = worker(bootstrap, group, topic, request_timeout_ms=LONG_LOCK_MS)
    struck = interrupt_once(first, "_finish" if window == "answer taken off the queue" else "_start", monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        poll_until(first, lambda got: False, "Ctrl-C")
    assert struck, "the interrupted step never ran"
    started = time.monotonic()
    first.close()
    assert time.monotonic() - started < DEADLINE_S, "close() waited for an answer it already had or never asked for"
    with worker(bootstrap, group, topic) as second:
        again = poll_until(second, lambda got: len(got) == len(values), "the records the interrupted member held")
        assert sorted(r.value for r in again) == sorted(values)
        for record in again:
            record.ack()
        second.commit()


def test_a_crashed_workers_jobs_come_back_to_another_after_the_lock_timeout(bootstrap: str) -> None:
    queue(bootstrap, "renders", 5)
    set_lock(bootstrap, "renderers")
    crashed = worker(bootstrap, "renderers", "renders")
    taken = poll_until(crashed, lambda got: len(got) == 5, "the jobs")
    taken_at = time.monotonic()  # the worker never acks, never polls again: as if killed
    with worker(bootstrap, "renderers", "renders") as survivor:
        again = poll_until(survivor, lambda got: len(got) == 5, "the jobs after the lock timeout")
        assert time.monotonic() - taken_at >= LOCK_MS / 1000 * 0.9
        assert {r.offset for r in again} == {r.offset for r in taken}
        for record in again:
            record.ack()
        survivor.commit()
    with pytest.raises(AcknowledgementError) as refused:  # the crashed one comes back: too late
        taken[0].ack()
        crashed.commit()
    failure, = refused.value.failures
    assert isinstance(failure.error, InvalidRecordStateError)
    assert "expired" in str(failure.error) or "not held" in str(failure.error)
    crashed.close()


def test_max_in_flight_bounds_the_records_held_unacknowledged(bootstrap: str) -> None:
    queue(bootstrap, "thumbs", 50)
    with worker(bootstrap, "thumbnailers", "thumbs", max_in_flight=7) as consumer:
        held = poll_until(consumer, lambda got: len(got) >= 7, "seven records")
        assert len(held) == 7 and consumer.in_flight == 7
        assert consumer.poll(timeout=0.5) == []  # nothing more while seven are unfinished
        described = Admin(bootstrap).describe_share_group("thumbnailers", "thumbs")
        assert described.in_flight_by_member() == {consumer.member_id: 7}
        for record in held[:3]:
            record.ack()
        more = poll_until(consumer, lambda got: len(got) >= 3, "three more")
        assert len(more) == 3 and consumer.in_flight == 7


def test_a_delayed_record_arrives_no_earlier_than_its_time_and_then_arrives(bootstrap: str) -> None:
    """Never early, and delivered once due; how late is measured by benchmarks/delayed.py, not asserted."""
    Admin(bootstrap).create_topic("reminders", partitions=1)
    with worker(bootstrap, "reminders", "reminders") as consumer:
        consumer.poll(timeout=0.2)  # the group exists and waits at the log end
        deliver_at_ms = time.time_ns() // 1_000_000 + 2_000
        produce(bootstrap, "reminders", [b"later"], deliver_at_ms=deliver_at_ms)
        produce(bootstrap, "reminders", [b"now"])
        got = poll_until(consumer, lambda got: any(r.value == b"now" for r in got), "the record without a delay")
        received_ms = time.time_ns() // 1_000_000
        assert [r.value for r in got if r.value == b"later"] == [] or received_ms >= deliver_at_ms
        for record in got:
            record.ack()
        if not any(r.value == b"later" for r in got):
            later, = poll_until(consumer, lambda got: len(got) == 1, "the delayed record")
            assert later.value == b"later" and time.time_ns() // 1_000_000 >= deliver_at_ms
            later.ack()


def test_priority_lanes_serve_the_urgent_first_and_the_others_still(bootstrap: str) -> None:
    admin = Admin(bootstrap)
    for lane in ("tasks", "tasks.p1", "tasks.p2"):
        admin.create_topic(lane, partitions=1)
    admin.describe_share_group("taskers", "tasks", priorities=3)  # every lane's leader is ready
    with Producer(bootstrap) as producer:
        for priority in (0, 1, 2):
            for n in range(40):
                producer.send("tasks", value=b"%d-%d" % (priority, n), priority=priority)
        assert producer.flush() == 0
    consumer = ShareConsumer("taskers", bootstrap, max_in_flight=10)
    consumer.subscribe(["tasks"], priorities=3)
    order: list[str] = []
    deadline = time.monotonic() + DEADLINE_S
    while len(order) < 120:
        assert time.monotonic() < deadline, f"only {len(order)} of 120 tasks came"
        for record in consumer.poll(timeout=0.1):
            order.append(record.topic)
            record.ack()
    consumer.close()
    first_half = order[:60]
    assert first_half.count("tasks.p2") > first_half.count("tasks.p1") > first_half.count("tasks")
    assert "tasks" in order[:order.index("tasks.p2", 30)]  # the least urgent lane is served before p2 runs dry
    assert sorted(set(order)) == ["tasks", "tasks.p1", "tasks.p2"]


def test_group_configs_and_the_share_group_description(bootstrap: str) -> None:
    queue(bootstrap, "orders", 6, partitions=2)
    admin = Admin(bootstrap)
    admin.alter_group_configs("packers", {"share.delivery.count.limit": 3, "share.retry.backoff": "fixed"})
    configs = admin.describe_group_configs("packers")
    assert configs["share.delivery.count.limit"] == "3" and configs["share.retry.backoff"] == "fixed"
    assert configs["share.record.lock.duration.ms"] == "30000"
    with pytest.raises(InvalidGroupConfigError, match="unknown group config 'share.nope'"):
        admin.alter_group_configs("packers", {"share.nope": "1"})
    with worker(bootstrap, "packers", "orders") as consumer:
        held = poll_until(consumer, lambda got: len(got) == 6, "six orders")
        held[0].release(60_000)
        held[1].ack()
        consumer.commit()
        described = admin.describe_share_group("packers", ["orders"])
        assert [(p.topic, p.partition) for p in described.partitions] == [("orders", 0), ("orders", 1)]
        assert (described.in_flight, described.delayed, described.available) == (4, 1, 0)
        assert described.in_flight_by_member() == {consumer.member_id: 4}


def test_bad_input_gets_clear_errors(bootstrap: str) -> None:
    Admin(bootstrap).create_topic("inbox", partitions=1)
    with pytest.raises(InvalidGroupIdError, match="group id must have 1 to 255 characters"):
        ShareConsumer("", bootstrap)
    with pytest.raises(ValueError, match="max_in_flight must be"):
        ShareConsumer("g", bootstrap, max_in_flight=0)
    with Producer(bootstrap) as producer, pytest.raises(ValueError, match="delay_ms must not be negative"):
        producer.send("inbox", value=b"x", delay_ms=-5)
    consumer = ShareConsumer("readers", bootstrap)
    with pytest.raises(UnknownTopicOrPartitionError, match="nowhere"):
        consumer.subscribe(["nowhere"])
    missing_lane = r"priority lane 1 of queue 'inbox'.*lb topic create inbox.p1"
    with pytest.raises(UnknownTopicOrPartitionError, match=missing_lane):
        consumer.subscribe(["inbox"], priorities=2)
    consumer.subscribe(["inbox"])
    produce(bootstrap, "inbox", [b"one"])
    record, = poll_until(consumer, lambda got: len(got) == 1, "the record")
    with pytest.raises(ValueError, match="release delay must be 0"):
        record.release(delay_ms=-1)
    record.ack()
    with pytest.raises(InvalidRecordStateError, match="already finished with it"):
        record.ack()
    consumer.close()
    with pytest.raises(Exception, match="closed"):
        consumer.poll()


async def test_async_consumers_share_a_queue_and_close_hands_records_over(bootstrap: str) -> None:
    values = await asyncio.to_thread(queue, bootstrap, "uploads", 30)
    first = AsyncShareConsumer("uploaders", bootstrap, max_in_flight=10)
    second = AsyncShareConsumer("uploaders", bootstrap, max_in_flight=10)
    await first.subscribe("uploads")
    await second.subscribe("uploads")
    done: list[bytes] = []
    deadline = time.monotonic() + DEADLINE_S
    held = await first.poll(timeout=1.0)
    assert held
    await first.close()  # gives its records back at once
    while len(done) < len(values):
        assert time.monotonic() < deadline, f"only {len(done)} of {len(values)} uploads came"
        for record in await second.poll(timeout=0.1):
            done.append(record.value or b"")
            record.ack()
    await second.commit()
    assert sorted(done) == sorted(values)
    await second.close()
    admin = AsyncAdmin(bootstrap)
    await admin.alter_group_configs("uploaders", {"share.retry.backoff.ms": 250})
    assert (await admin.describe_group_configs("uploaders"))["share.retry.backoff.ms"] == "250"
    described = await admin.describe_share_group("uploaders", "uploads")
    assert (described.available, described.in_flight) == (0, 0)
    await admin.close()
    async with AsyncProducer(bootstrap) as producer:
        with pytest.raises(ValueError, match="delay_ms must not be negative"):
            await producer.send("uploads", b"x", delay_ms=-1)
        with pytest.raises(ValueError, match="priority must be"):
            await producer.send("uploads", b"x", priority=-1)
        meta = await producer.send_and_wait("uploads", b"later", delay_ms=60_000)
    assert meta.offset >= 0
