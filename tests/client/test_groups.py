"""Consumer groups against a real broker (group timeouts lowered): sharing, hand-over, resuming from committed
offsets, static membership, resets, and the errors of bad requests."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from logbroker_client import Admin, AsyncAdmin, AsyncConsumer, Consumer, Producer, TopicPartition
from logbroker_client.errors import (
    GroupIdNotFoundError,
    InvalidGroupIdError,
    InvalidRequestError,
    NonEmptyGroupError,
    PartitionNotOwnedError,
)
from logbroker_client.types import ConsumerRecord, OffsetAndMetadata

from tests.support.brokers import InProcessBroker

SESSION_MS = 2_000
GROUP_SETTINGS = {"group_session_timeout_ms": SESSION_MS, "group_heartbeat_interval_ms": 200}
DEADLINE_S = 10.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[InProcessBroker]:
    running = InProcessBroker(tmp_path / "data", **GROUP_SETTINGS).start()  # type: ignore[arg-type]
    try:
        yield running
    finally:
        running.stop()


def make_topic(bootstrap: str, name: str, partitions: int, records: int) -> list[bytes]:
    """A topic with `records` keyed records spread over its partitions; returns their values."""
    Admin(bootstrap).create_topic(name, partitions=partitions)
    return produce(bootstrap, name, range(records))


def produce(bootstrap: str, topic: str, numbers: range) -> list[bytes]:
    values = [b"%s-%d" % (topic.encode(), n) for n in numbers]
    with Producer(bootstrap, acks="all") as producer:
        for value in values:
            producer.send(topic, value=value, key=value)
        assert producer.flush() == 0
    return values


def member(bootstrap: str, group: str = "billing", **options: object) -> Consumer:
    options.setdefault("auto_offset_reset", "earliest")
    return Consumer(bootstrap, group_id=group, session_timeout_ms=SESSION_MS, **options)  # type: ignore[arg-type]


class Members:
    """Polls several consumers in turn from one thread, keeping what each got, and checks after every poll that
    each record came from a partition its consumer owns and that no partition has two owners."""

    def __init__(self, *consumers: Consumer) -> None:
        self.consumers = list(consumers)
        self.records: dict[int, list[ConsumerRecord]] = {id(c): [] for c in consumers}

    def poll_until(self, done: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
            for consumer in self.consumers:
                got = consumer.poll(timeout=0.05)
                owned = consumer.assignment()
                assert {TopicPartition(r.topic, r.partition) for r in got} <= owned
                self.records[id(consumer)] += got
                self.check_no_two_owners()

    def check_no_two_owners(self) -> None:
        seen: set[TopicPartition] = set()
        for consumer in self.consumers:
            owned = consumer.assignment()
            assert not owned & seen, f"{sorted(owned & seen)} owned twice"
            seen |= owned

    def values(self, consumer: Consumer | None = None) -> list[bytes | None]:
        chosen = [consumer] if consumer else self.consumers
        return [r.value for c in chosen for r in self.records[id(c)]]


def all_partitions(topic: str, count: int) -> set[TopicPartition]:
    return {TopicPartition(topic, p) for p in range(count)}


def test_two_members_share_the_partitions_and_the_survivor_takes_over_when_one_closes(
        broker: InProcessBroker) -> None:
    values = make_topic(broker.address, "orders", partitions=6, records=120)
    first, second = member(broker.address), member(broker.address)
    assigned: list[set[TopicPartition]] = []
    first.subscribe(["orders"])
    second.subscribe(["orders"], on_assigned=assigned.append)
    group = Members(first, second)
    group.poll_until(lambda: len(first.assignment()) == 3 and len(second.assignment()) == 3,
                     "the six partitions to be shared three and three")
    assert first.assignment() | second.assignment() == all_partitions("orders", 6)
    first.close()  # auto-commit commits what it handed out, then it leaves at once
    group.consumers.remove(first)
    group.poll_until(lambda: second.assignment() == all_partitions("orders", 6) and
                     len(group.values()) + len(group.records[id(first)]) >= len(values),
                     "the survivor to own every partition and read everything", timeout_s=SESSION_MS / 1000)
    consumed = group.values() + [r.value for r in group.records[id(first)]]
    assert sorted(consumed) == sorted(values)  # every record once: hand-overs commit before releasing
    assert set().union(*assigned) == all_partitions("orders", 6)
    second.close()


def test_a_restarted_member_resumes_after_its_synchronous_commits_with_nothing_read_twice(
        broker: InProcessBroker) -> None:
    values = make_topic(broker.address, "ledger", partitions=2, records=40)
    seen: list[bytes | None] = []
    with member(broker.address, enable_auto_commit=False) as consumer:
        consumer.subscribe(["ledger"])
        while len(seen) < 25:
            batch = consumer.poll(timeout=0.2, max_records=5)
            seen += [r.value for r in batch]
            if batch:
                consumer.commit()
        positions = {tp: consumer.position(tp) for tp in consumer.assignment()}
        assert {tp: c.offset for tp, c in consumer.committed(positions).items() if c} == positions
    values += produce(broker.address, "ledger", range(40, 60))
    with member(broker.address, enable_auto_commit=False) as restarted:
        restarted.subscribe(["ledger"])
        deadline = time.monotonic() + DEADLINE_S
        while len(seen) < len(values) and time.monotonic() < deadline:
            seen += [r.value for r in restarted.poll(timeout=0.2)]
    assert sorted(seen) == sorted(values)


CRASHING_MEMBER = """
import sys
from logbroker_client import Consumer
consumer = Consumer(sys.argv[1], group_id="crashy", auto_offset_reset="earliest", auto_commit_interval_ms=100,
                    session_timeout_ms=2000)
consumer.subscribe(["events"])
while True:
    for record in consumer.poll(timeout=0.1, max_records=3):
        print(record.partition, record.offset, flush=True)
"""


def test_auto_commit_is_at_least_once_across_a_killed_member(broker: InProcessBroker, tmp_path: Path) -> None:
    make_topic(broker.address, "events", partitions=2, records=200)
    script = tmp_path / "member.py"
    script.write_text(CRASHING_MEMBER)
    crashed = subprocess.Popen([sys.executable, str(script), broker.address], stdout=subprocess.PIPE, text=True)
    printed: set[tuple[int, int]] = set()
    try:
        assert crashed.stdout is not None
        while len(printed) < 60:
            line = crashed.stdout.readline()
            assert line, "the member script stopped early"
            partition, offset = map(int, line.split())
            printed.add((partition, offset))
    finally:
        crashed.kill()  # no close(): nothing more is committed, and it never leaves
        crashed.wait(10)
    ends = Consumer(broker.address).end_offsets(all_partitions("events", 2))
    again: set[tuple[int, int]] = set()
    with member(broker.address, group="crashy") as survivor:
        survivor.subscribe(["events"])
        deadline = time.monotonic() + SESSION_MS / 1000 + DEADLINE_S  # the dead member's session ends first
        while sum(1 for p, o in again | printed if o < ends[TopicPartition("events", p)]) < 200:
            assert time.monotonic() < deadline, "the group did not deliver every record"
            again |= {(r.partition, r.offset) for r in survivor.poll(timeout=0.2)}
    for partition in (0, 1):  # resumed at or before the first offset the dead member did not print: no gap
        dead = sorted(o for p, o in printed if p == partition)
        resumed = min((o for p, o in again if p == partition), default=None)
        assert resumed is None or not dead or resumed <= dead[-1] + 1


PAUSABLE_MEMBER = """
import sys
from logbroker_client import Consumer

def say(what, tps):
    print(what, ",".join(str(tp.partition) for tp in sorted(tps)), flush=True)

consumer = Consumer(sys.argv[1], group_id="pausy", auto_offset_reset="earliest", session_timeout_ms=2000)
consumer.subscribe(["jobs"], on_assigned=lambda tps: say("assigned", tps), on_revoked=lambda tps: say("revoked", tps),
                   on_lost=lambda tps: say("lost", tps))
while True:
    consumer.poll(timeout=0.1)
"""


class Lines:
    """A subprocess's stdout lines, read on a thread so the test can wait for one with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.strip())

    def wait_for(self, prefix: str, after: int = 0, timeout_s: float = DEADLINE_S) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            found = [line for line in self.lines[after:] if line.startswith(prefix)]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no {prefix!r} line; got {self.lines}"
            time.sleep(0.02)


def test_a_member_paused_past_its_session_is_fenced_loses_its_partitions_and_rejoins(
        broker: InProcessBroker, tmp_path: Path) -> None:
    make_topic(broker.address, "jobs", partitions=2, records=4)
    script = tmp_path / "member.py"
    script.write_text(PAUSABLE_MEMBER)
    paused = subprocess.Popen([sys.executable, str(script), broker.address], stdout=subprocess.PIPE, text=True)
    try:
        lines = Lines(paused)
        assert lines.wait_for("assigned") == "assigned 0,1"
        paused.send_signal(signal.SIGSTOP)
        survivor = member(broker.address, group="pausy")
        survivor.subscribe(["jobs"])
        Members(survivor).poll_until(lambda: survivor.assignment() == all_partitions("jobs", 2),
                                     "the session of the paused member to end and its partitions to move")
        seen = len(lines.lines)
        paused.send_signal(signal.SIGCONT)
        assert lines.wait_for("lost", after=seen) == "lost 0,1"  # dropped without a commit, then rejoined
        Members(survivor).poll_until(lambda: len(survivor.assignment()) == 1, "the rejoined member to get one")
        mine = lines.wait_for("assigned", after=seen)
        assert {TopicPartition("jobs", int(mine.split()[1]))} == all_partitions("jobs", 2) - survivor.assignment()
        survivor.close()
    finally:
        paused.kill()
        paused.wait(10)


def test_a_commit_for_a_partition_the_member_does_not_own_is_refused_and_changes_nothing(
        broker: InProcessBroker) -> None:
    make_topic(broker.address, "split", partitions=2, records=10)
    first, second = member(broker.address), member(broker.address)
    first.subscribe(["split"])
    second.subscribe(["split"])
    Members(first, second).poll_until(lambda: len(first.assignment()) == len(second.assignment()) == 1,
                                      "one partition each")
    foreign = next(iter(second.assignment()))
    before = first.committed([foreign])  # what the hand-over committed for it, if anything
    with pytest.raises(PartitionNotOwnedError, match=f"does not own split-{foreign.partition}"):
        first.commit({foreign: 5})
    assert first.committed([foreign]) == before and before[foreign] != OffsetAndMetadata(5)
    first.close()
    second.close()


def test_a_static_member_restarting_gets_its_own_partitions_back_and_nobody_else_takes_them(
        broker: InProcessBroker) -> None:
    make_topic(broker.address, "static", partitions=4, records=8)
    first = member(broker.address, group_instance_id="pod-a")
    second = member(broker.address, group_instance_id="pod-b")
    first.subscribe(["static"])
    second.subscribe(["static"])
    Members(first, second).poll_until(lambda: len(first.assignment()) == len(second.assignment()) == 2,
                                      "two partitions each")
    held_by_first, held_by_second = first.assignment(), second.assignment()
    first.close()  # epoch -2: away for a restart, its partitions kept for it
    stay = time.monotonic() + SESSION_MS / 2000
    while time.monotonic() < stay:  # half a session: the other member must not be given them
        second.poll(timeout=0.05)
        assert second.assignment() == held_by_second
    restarted = member(broker.address, group_instance_id="pod-a")
    restarted.subscribe(["static"])
    Members(restarted, second).poll_until(lambda: restarted.assignment() == held_by_first,
                                          "the restarted member to own its partitions again")
    assert second.assignment() == held_by_second
    assert len(Admin(broker.address).describe_groups(["billing"])[0].members) == 2
    restarted.close()
    second.close()


def test_reset_offsets_replays_and_is_refused_while_the_group_has_members(broker: InProcessBroker) -> None:
    values = make_topic(broker.address, "replay", partitions=3, records=30)
    admin = Admin(broker.address)
    consumer = member(broker.address)
    consumer.subscribe(["replay"])
    got = Members(consumer)
    got.poll_until(lambda: len(got.values()) == len(values), "every record")
    consumer.commit()
    committed = consumer.committed(all_partitions("replay", 3))
    with pytest.raises(NonEmptyGroupError, match="1 live member"):
        admin.reset_offsets("billing", "replay", to_earliest=True)
    with pytest.raises(NonEmptyGroupError):
        admin.delete_groups(["billing"])
    assert consumer.committed(all_partitions("replay", 3)) == committed
    consumer.close()

    plan = admin.reset_offsets("billing", "replay", to_offset=0, dry_run=True)
    assert [c.new for c in plan] == [0, 0, 0]
    assert [c.previous for c in plan] == [committed[TopicPartition("replay", p)].offset for p in range(3)]
    assert Admin(broker.address).describe_groups(["billing"])[0].total_lag == 0  # the dry run changed nothing
    shifted = admin.reset_offsets("billing", "replay", shift_by=-2)
    assert [c.new for c in shifted] == [c.previous - 2 for c in plan]  # type: ignore[operator]
    admin.reset_offsets("billing", "replay", to_earliest=True)
    again = member(broker.address, auto_offset_reset="latest")
    again.subscribe(["replay"])
    replayed = Members(again)
    replayed.poll_until(lambda: len(replayed.values()) == len(values), "the replay of every record")
    assert sorted(replayed.values()) == sorted(values)
    again.close()
    admin.delete_groups(["billing"])
    with pytest.raises(GroupIdNotFoundError, match="does not exist"):
        admin.describe_groups(["billing"])


def test_a_pattern_subscription_and_a_simple_group_commit(broker: InProcessBroker) -> None:
    make_topic(broker.address, "audit-eu", partitions=1, records=3)
    make_topic(broker.address, "audit-us", partitions=1, records=3)
    make_topic(broker.address, "other", partitions=1, records=3)
    consumer = member(broker.address, group="auditors")
    consumer.subscribe(pattern="audit-.*")
    got = Members(consumer)
    got.poll_until(lambda: len(got.values()) == 6, "the records of both audit topics")
    assert consumer.assignment() == {TopicPartition("audit-eu", 0), TopicPartition("audit-us", 0)}
    consumer.close()

    tp = TopicPartition("other", 0)
    with member(broker.address, group="by-hand", enable_auto_commit=False) as simple:  # assign() + commit()
        simple.assign([tp])
        assert len(simple.poll(timeout=2.0)) == 3
        simple.commit({tp: OffsetAndMetadata(2, "half-way")})
        assert simple.committed([tp]) == {tp: OffsetAndMetadata(2, "half-way")}
    with member(broker.address, group="by-hand") as resumed:
        resumed.assign([tp])
        assert resumed.position(tp) == 2


def test_a_poll_reports_when_it_last_confirmed_the_session_owning_its_records(broker: InProcessBroker) -> None:
    make_topic(broker.address, "jobs", partitions=1, records=5)
    with member(broker.address, group="workers") as consumer:
        assert consumer.ownership_checked_at_ms is None  # no group records handed out yet
        consumer.subscribe(["jobs"])
        got = 0
        deadline = time.monotonic() + 20
        while got < 5 and time.monotonic() < deadline:
            before_ms = time.monotonic() * 1000
            got += len(consumer.poll(timeout=0.5))
        after_ms = time.monotonic() * 1000  # the last poll returned records: it checked within [before, after]
        assert got == 5
        checked_ms = consumer.ownership_checked_at_ms
        assert checked_ms is not None and before_ms <= checked_ms <= after_ms
    with member(broker.address, group=None) as plain:  # no group: nothing to confirm
        plain.assign([TopicPartition("jobs", 0)])
        assert len(plain.poll(timeout=2.0)) == 5
        assert plain.ownership_checked_at_ms is None


def test_bad_group_requests_are_named_and_change_nothing(broker: InProcessBroker) -> None:
    make_topic(broker.address, "bad", partitions=1, records=2)
    admin = Admin(broker.address)
    with pytest.raises(GroupIdNotFoundError, match="'nope' does not exist"):
        admin.describe_groups(["nope"])
    with pytest.raises(InvalidGroupIdError, match="empty"):
        Consumer(broker.address, group_id="")
    with pytest.raises(InvalidGroupIdError, match="1 to 255 characters, got 256"):
        admin.describe_groups(["x" * 256])
    too_long = member(broker.address, group="y" * 256)
    too_long.subscribe(["bad"])
    with pytest.raises(InvalidGroupIdError, match="got 256"):
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            too_long.poll(timeout=0.1)
    too_long.close()
    tp = TopicPartition("bad", 0)
    with member(broker.address, group="careful") as consumer:
        consumer.assign([tp])
        consumer.commit({tp: 1})
        with pytest.raises(InvalidRequestError, match="negative"):
            consumer.commit({tp: -1})
        with pytest.raises(InvalidRequestError, match="does not exist"):
            consumer.commit({TopicPartition("bad", 7): 1})
        assert consumer.committed([tp]) == {tp: OffsetAndMetadata(1, "")}
    with pytest.raises(ValueError, match="exactly one"):
        admin.reset_offsets("careful", "bad", to_earliest=True, to_latest=True)
    with pytest.raises(ValueError, match="0 or more"):
        admin.reset_offsets("careful", "bad", to_offset=-3)
    with pytest.raises(GroupIdNotFoundError):
        admin.delete_groups(["never-was"])


async def test_async_members_share_hand_over_and_commit(broker: InProcessBroker) -> None:
    values = make_topic(broker.address, "async-orders", partitions=4, records=40)
    first = AsyncConsumer(broker.address, group_id="async", auto_offset_reset="earliest", session_timeout_ms=SESSION_MS)
    second = AsyncConsumer(broker.address, group_id="async", auto_offset_reset="earliest",
                           session_timeout_ms=SESSION_MS)
    revoked: list[set[TopicPartition]] = []

    async def on_revoked(tps: set[TopicPartition]) -> None:
        revoked.append(tps)

    first.subscribe(["async-orders"], on_revoked=on_revoked)
    second.subscribe(["async-orders"])
    assert first.ownership_checked_at_ms is None
    got: list[bytes | None] = []
    deadline = time.monotonic() + DEADLINE_S
    while not (len(first.assignment()) == len(second.assignment()) == 2 and len(got) == len(values)):
        assert time.monotonic() < deadline, "the async members did not share and read everything"
        for consumer in (first, second):
            before_ms = time.monotonic() * 1000
            polled = await consumer.poll(timeout=0.05)
            if polled:  # it confirmed the session owning them while it polled
                checked_ms = consumer.ownership_checked_at_ms
                assert checked_ms is not None and before_ms <= checked_ms <= time.monotonic() * 1000
            got += [r.value for r in polled]
            assert not first.assignment() & second.assignment()
    await first.commit()
    owned = first.assignment()
    assert {tp: c.offset for tp, c in (await first.committed(owned)).items() if c} == \
        {tp: await first.position(tp) for tp in owned}
    await first.close()
    assert revoked[-1] == owned  # closing hands its partitions back through on_revoked
    while second.assignment() != all_partitions("async-orders", 4):
        assert time.monotonic() < deadline, "the async survivor did not take over"
        got += [r.value for r in await second.poll(timeout=0.05)]
    await asyncio.wait_for(second.commit_async(), 5)
    await second.close()
    assert sorted(got) == sorted(values)
    async with AsyncAdmin(broker.address) as admin:
        described = (await admin.describe_groups(["async"]))[0]
        assert (described.state, described.total_lag) == ("empty", 0)
        assert [g.group_id for g in await admin.list_groups()] == ["async"]
        changes = await admin.reset_offsets("async", "async-orders", to_earliest=True, dry_run=True)
        assert len(changes) == 4
