"""Share groups (queues) over three real brokers: the acceptance scenarios of the queues issue.

Workers (tests/support/share_worker.py) speak the raw Share gRPC service, as subprocesses when a test kills
one, else as threads; every event they see goes to a JSON-lines file, and the share checker
(tests/support/share_checker.py) holds them, the producer's acknowledgements and the dead-letter topic to
the queue's promises: one holder at a time, nothing accepted delivered again, nothing lost, dead letters
exactly once, delivery counts within the limit.

The group's lock is lowered to LOCK_MS and its retry backoff to zero, so a lost worker's records come back
LOCK_MS after it took them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from logbroker_client import Admin, Producer
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from tests.support.brokers import InProcessBroker, wait_until
from tests.support.checker import AckLog, ProducerLoad, make_value
from tests.support.cluster import BrokerCluster
from tests.support.share_checker import (
    DeadLetter,
    ShareRules,
    Summary,
    assert_clean,
    check,
    load_events,
    produced_by_offset,
    read_dead_letters,
)
from tests.support.share_worker import Brokers, ShareWorker, WorkerProcess, WorkerSettings

TOPIC = "jobs"
DLQ_TOPIC = f"{TOPIC}.dlq"
LOCK_MS = 2000
DELIVERY_LIMIT = 3
SETTLE_TIMEOUT_S = 30.0
DEAD_LETTERS_AT_KILL = 30
CALL_TIMEOUT_S = 10.0
POISON = b"poison"
STICKY = b"sticky"  # released every time: dead-lettered when it reaches the delivery limit
BAD_ID_CODES = (pb.ErrorCode.INVALID_GROUP_ID, pb.ErrorCode.INVALID_REQUEST)
BAD_CONFIGS = (("share.record.lock.duration.ms", "500"), ("share.delivery.count.limit", "0"),
               ("share.retry.backoff", "sometimes"), ("share.no.such.key", "1"))


# ----------------------------------------------------------------------------------------- helpers


@pytest.fixture
def jobs(cluster: BrokerCluster) -> BrokerCluster:
    """The queue's topic, and its dead-letter topic made beforehand (the broker also creates it on demand,
    from any broker: a test at the end checks that)."""
    with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic(TOPIC, partitions=1, replication_factor=3)
        admin.create_topic(DLQ_TOPIC, partitions=1, replication_factor=3)
    cluster.leader_of(TOPIC, 0)
    return cluster


def configure_group(cluster: BrokerCluster, group: str, lock_ms: int = LOCK_MS,
                    delivery_limit: int = DELIVERY_LIMIT) -> ShareRules:
    """Set the group's lock, delivery limit and a zero fixed backoff; wait until every broker knows them."""
    configs = {"share.record.lock.duration.ms": str(lock_ms), "share.delivery.count.limit": str(delivery_limit),
               "share.retry.backoff": "fixed", "share.retry.backoff.ms": "0"}
    answer = admin_call(cluster, "AlterGroupConfigs", pb.AlterGroupConfigsRequest(group_id=group, configs=configs))
    assert not answer.error_code, answer.error_message

    def everywhere() -> bool:
        return all(dict(admin_call(cluster, "DescribeGroupConfigs", pb.DescribeGroupConfigsRequest(group_id=group),
                                   node).configs).items() >= configs.items() for node in cluster.live())

    wait_until(everywhere, 20, f"every broker to know group {group}'s configs", interval_s=0.1)
    return ShareRules(group, TOPIC, lock_ms, delivery_limit)


def admin_call(cluster: BrokerCluster, method: str, request: Any, node: int | None = None) -> Any:
    """One Admin call at `node` (default: the first live broker)."""
    with grpc.insecure_channel(cluster.address(node or cluster.live()[0])) as channel:
        return getattr(pb_grpc.AdminStub(channel), method)(request, timeout=CALL_TIMEOUT_S)


def settings(cluster: BrokerCluster, tmp_path: Path, group: str, name: str, **overrides: Any) -> WorkerSettings:
    return WorkerSettings(bootstrap=cluster.bootstrap.split(","), group=group, topic=TOPIC,
                          events_path=tmp_path / f"{group}-{name}.jsonl", member_id=f"{group}-{name}", **overrides)


def send_tagged(cluster: BrokerCluster, acks: AckLog, first_seq: int, count: int, tag: bytes) -> list[bytes]:
    values = [make_value(first_seq + i, 64, tag) for i in range(count)]
    with Producer(cluster.bootstrap, acks="all", linger_ms=1, request_timeout_ms=5000) as producer:
        for value in values:
            producer.send(TOPIC, value=value, partition=0).add_done_callback(acks.callback(value))
        producer.flush(timeout=30)
    return values


def events_of(tmp_path: Path, group: str) -> list[dict[str, Any]]:
    return load_events(sorted(tmp_path.glob(f"{group}-*.jsonl")))


def wait_settled(cluster: BrokerCluster, tmp_path: Path, rules: ShareRules, acks: AckLog,
                 timeout_s: float = SETTLE_TIMEOUT_S) -> list[DeadLetter]:
    """Until every acknowledged record is accepted or dead-lettered (the checker finds nothing lost); the
    dead letters then. (The events are read again once the workers stopped: their last acks count too.)"""
    produced = produced_by_offset(acks.snapshot())
    found: dict[str, Any] = {}

    def settled() -> bool:
        found["events"] = events_of(tmp_path, rules.group)
        found["letters"] = read_dead_letters(cluster.bootstrap.split(","), DLQ_TOPIC)
        found["lost"] = [v for v in check(found["events"], produced, found["letters"], rules) if v.startswith("lost")]
        return not found["lost"]

    try:
        wait_until(settled, timeout_s, "every produced record to be accepted or dead-lettered", interval_s=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {found['lost'][:10]}") from None
    return list(found["letters"])


def describe_queue(cluster: BrokerCluster, group: str) -> pb.SharePartitionDescription:
    brokers = Brokers(cluster.bootstrap.split(","))
    try:
        leader = brokers.leader(TOPIC, 0)
        assert leader is not None, "no leader of the queue's partition"
        return brokers.share(leader).DescribeSharePartitions(pb.DescribeSharePartitionsRequest(
            group_id=group, partitions=[pb.TopicPartitions(topic=TOPIC, partitions=[0])]),
            timeout=CALL_TIMEOUT_S).partitions[0]
    finally:
        brokers.close()


def assert_drained(cluster: BrokerCluster, group: str) -> None:
    """The leader agrees: nothing available, in flight or waiting."""
    queue: list[pb.SharePartitionDescription] = []

    def empty() -> bool:
        queue[:] = [describe_queue(cluster, group)]
        return not (queue[0].error_code or queue[0].available or queue[0].in_flight or queue[0].delayed)

    wait_until(empty, 15, "the queue to be empty", interval_s=0.2)


def stop_all(workers: Sequence[ShareWorker | WorkerProcess]) -> None:
    for worker in workers:
        worker.stop()


@contextlib.contextmanager
def producing(cluster: BrokerCluster, acks: AckLog, rate_per_s: float) -> Iterator[ProducerLoad]:
    """Sequence-numbered records at rate_per_s while the block runs; every one acknowledged or failed after."""
    producer = ProducerLoad(cluster.bootstrap, TOPIC, 1, acks, value_size=64, rate_per_s=rate_per_s,
                            max_outstanding=200).start()
    try:
        yield producer
    finally:
        producer.stop()


def held_records(events: Sequence[dict[str, Any]], member: str) -> set[int]:
    """Offsets the member acquired (last time) and never acknowledged afterwards."""
    held: set[int] = set()
    for event in events:
        if event.get("member") != member:
            continue
        if event["event"] == "acquired":
            held.add(event["offset"])
        elif "first_offset" in event:
            held -= set(range(event["first_offset"], event["last_offset"] + 1))
    return held


def report(name: str, summary: Summary, **extra: Any) -> None:
    print(f"{name}: {summary}", *(f"{k}={v}" for k, v in extra.items()))


# -------------------------------------------------------------------------------------- scenarios


def test_a_killed_workers_records_come_back_to_another_after_the_lock(jobs: BrokerCluster, tmp_path: Path) -> None:
    acks = AckLog()
    rules = configure_group(jobs, "killed")
    send_tagged(jobs, acks, 1_000_000, 30, b"backlog")  # so that each worker takes a full batch of 5 at first
    workers = [WorkerProcess(settings(jobs, tmp_path, "killed", f"w{i}", work_ms=100, max_records=5)).start()
               for i in range(3)]
    victim = workers[0].settings.member_id
    try:
        for worker in workers:
            worker.wait_started()
        with producing(jobs, acks, rate_per_s=20):
            wait_until(lambda: len(held_records(events_of(tmp_path, "killed"), victim)) >= 3, 20,
                       "the victim to hold records mid-job", interval_s=0.01)
            workers[0].kill()
            orphans = held_records(events_of(tmp_path, "killed"), victim)
            time.sleep(3.0)
        letters = wait_settled(jobs, tmp_path, rules, acks)
    finally:
        stop_all(workers)
    events = events_of(tmp_path, rules.group)
    summary = assert_clean(events, produced_by_offset(acks.snapshot()), letters, rules)
    report("killed worker", summary, orphans=sorted(orphans))
    assert orphans and not letters
    for offset in orphans:
        taken = [e for e in events if e["event"] == "acquired" and e["offset"] == offset]
        victims_deadline_ms = max(e["lock_deadline_ms"] for e in taken if e["member"] == victim)
        takers = sorted((e for e in taken if e["member"] != victim), key=lambda e: e["lock_deadline_ms"])
        assert takers, f"offset {offset} held by the killed worker never came back"
        assert takers[0]["delivery_count"] >= 2
        assert takers[0]["lock_deadline_ms"] - LOCK_MS >= victims_deadline_ms  # only once the victim's lock expired
    assert_drained(jobs, "killed")


def test_a_poison_record_ends_in_the_dead_letters_once_while_the_others_flow(jobs: BrokerCluster,
                                                                            tmp_path: Path) -> None:
    acks = AckLog()
    rules = configure_group(jobs, "poison")
    workers = [ShareWorker(settings(jobs, tmp_path, "poison", f"w{i}", work_ms=5, reject_values=(POISON,),
                                    release_values=(STICKY,))).start() for i in range(3)]
    try:
        with producing(jobs, acks, rate_per_s=60) as producer:
            producer.wait_acked(50, 20)
            poison = send_tagged(jobs, acks, 1_000_000, 1, POISON)[0]
            sticky = send_tagged(jobs, acks, 1_000_001, 1, STICKY)[0]
            producer.wait_acked(150, 20)
        letters = wait_settled(jobs, tmp_path, rules, acks)
    finally:
        stop_all(workers)
    events = events_of(tmp_path, rules.group)
    summary = assert_clean(events, produced_by_offset(acks.snapshot()), letters, rules)
    report("poison", summary)
    poison_offset, sticky_offset = acks.snapshot()[poison][1], acks.snapshot()[sticky][1]
    by_offset = {int(letter.headers["lb.dlq.offset"]): letter for letter in letters}
    assert sorted(by_offset) == sorted([poison_offset, sticky_offset]) and len(letters) == 2, letters
    assert by_offset[poison_offset].headers.items() >= {
        "lb.dlq.topic": TOPIC, "lb.dlq.partition": "0", "lb.dlq.group": "poison", "lb.dlq.delivery.count": "1",
        "lb.dlq.reason": "poison"}.items()
    assert by_offset[sticky_offset].headers["lb.dlq.delivery.count"] == str(DELIVERY_LIMIT)
    assert "delivery limit" in by_offset[sticky_offset].headers["lb.dlq.reason"]
    assert summary.records_accepted == len(acks.snapshot()) - 2
    assert_drained(jobs, "poison")


def test_the_partition_leader_killed_under_load_loses_and_repeats_nothing_acknowledged(jobs: BrokerCluster,
                                                                                      tmp_path: Path) -> None:
    """No poison here (dead letters out of offset order have a test of their own at the end); the next test
    kills the leader with dead letters pending instead."""
    acks = AckLog()
    rules = configure_group(jobs, "failover")
    workers = [ShareWorker(settings(jobs, tmp_path, "failover", f"w{i}", work_ms=20)).start()
               for i in range(3)]  # each holds up to 200 ms of work: records are in flight at the kill
    try:
        with producing(jobs, acks, rate_per_s=100) as producer:
            producer.wait_acked(200, 20)
            leader = jobs.leader_of(TOPIC, 0)
            jobs.kill(leader)
            new_leader = jobs.leader_of(TOPIC, 0, exclude=(leader,))
            producer.wait_acked(acks.count() + 200, 30, "after the failover")
            jobs.restart(leader)
        letters = wait_settled(jobs, tmp_path, rules, acks)
    finally:
        stop_all(workers)
    events = events_of(tmp_path, rules.group)
    summary = assert_clean(events, produced_by_offset(acks.snapshot()), letters, rules)
    report("leader killed", summary, old_leader=leader, new_leader=new_leader)
    assert not letters
    assert_drained(jobs, "failover")


def test_dead_letters_pending_at_a_leader_kill_are_written_once(jobs: BrokerCluster, tmp_path: Path) -> None:
    """Poison records rejected in one ack; the leader is SIGKILLed as soon as that is confirmed, before,
    during or after the dead letters are written: the new leader writes each exactly once.

    At most DEAD_LETTERS_AT_KILL of them: the dead-letter partition remembers the last 32 batches of a
    producer, and a retry of an older one is refused for good (a regression test at the end covers it; with 50, the kill
    in the middle of the writing left 6 records out of the dead letters for ever)."""
    acks = AckLog()
    rules = configure_group(jobs, "dlq-failover")
    send_tagged(jobs, acks, 0, DEAD_LETTERS_AT_KILL, POISON)
    leader = jobs.leader_of(TOPIC, 0)
    worker = ShareWorker(settings(jobs, tmp_path, "dlq-failover", "w0", reject_values=(POISON,), max_records=100))
    worker.start()
    try:
        wait_until(lambda: worker.events.counts["rejected"] > 0, 20, "the rejects to be confirmed", interval_s=0.005)
        jobs.kill(leader)
        jobs.leader_of(TOPIC, 0, exclude=(leader,))
        letters = wait_settled(jobs, tmp_path, rules, acks)
    finally:
        worker.stop()
    events = events_of(tmp_path, rules.group)
    summary = assert_clean(events, produced_by_offset(acks.snapshot()), letters, rules)
    report("dead letters across a leader kill", summary)
    assert len(letters) == summary.records_rejected == DEAD_LETTERS_AT_KILL


def test_competing_consumers_scale_past_the_partitions(jobs: BrokerCluster, tmp_path: Path) -> None:
    acks = AckLog()
    send_tagged(jobs, acks, 0, 3000, b"")
    window_s = 2.5  # 250 records for one worker at 10 ms each: enough to tell 3x from less
    one = processed_in(jobs, tmp_path, "one", 1, window_s)
    four = processed_in(jobs, tmp_path, "four", 4, window_s)
    print(f"competing consumers, 10 ms of work per record, {window_s} s: 1 worker {one} records, "
          f"4 workers {four} records, ratio {four / max(one, 1):.2f}")
    assert four >= 3 * one, f"4 workers processed {four} records, 1 worker {one}: less than 3x"


def processed_in(cluster: BrokerCluster, tmp_path: Path, group: str, workers: int, window_s: float) -> int:
    """Records accepted by `workers` workers of a fresh group in window_s (after their first fetch); the checker
    holds their events (nothing is lost here: most of the backlog is left, so only the other rules apply)."""
    rules = configure_group(cluster, group)
    started = [ShareWorker(settings(cluster, tmp_path, group, f"w{i}", work_ms=10, max_records=10)).start()
               for i in range(workers)]
    try:
        wait_until(lambda: all(w.events.counts["acquired"] for w in started), 10, "every worker's first records")
        before = sum(w.records_accepted for w in started)
        time.sleep(window_s)
        processed = sum(w.records_accepted for w in started) - before
    finally:
        stop_all(started)
    assert_clean(events_of(tmp_path, group), {}, [], rules, f"{workers} worker(s): ")
    return processed


# --------------------------------------------------------------------------------------- bad input


class RawMember:
    """One member speaking ShareFetch / ShareAcknowledge at the partition's leader."""

    def __init__(self, cluster: BrokerCluster, group: str, member_id: str) -> None:
        self.group, self.member_id = group, member_id
        self.brokers = Brokers(cluster.bootstrap.split(","))

    def stub(self) -> pb_grpc.ShareStub:
        leader = self.brokers.leader(TOPIC, 0)
        assert leader is not None
        return self.brokers.share(leader)

    def fetch(self, max_records: int = 3, acks: Sequence[pb.AckRange] = ()) -> pb.SharePartitionData:
        return self.stub().ShareFetch(pb.ShareFetchRequest(
            group_id=self.group, member_id=self.member_id, max_wait_ms=1000, max_records=max_records,
            partitions=[pb.SharePartitionFetch(topic=TOPIC, partition=0, acks=acks)]),
            timeout=CALL_TIMEOUT_S).partitions[0]

    def ack(self, *acks: pb.AckRange) -> pb.SharePartitionData:
        return self.stub().ShareAcknowledge(pb.ShareAcknowledgeRequest(
            group_id=self.group, member_id=self.member_id,
            partitions=[pb.SharePartitionFetch(topic=TOPIC, partition=0, acks=acks)]),
            timeout=CALL_TIMEOUT_S).partitions[0]

    def close(self) -> None:
        self.brokers.close()


def accept(first: int, last: int | None = None) -> pb.AckRange:
    return pb.AckRange(first_offset=first, last_offset=first if last is None else last, type=pb.AckType.ACCEPT)


def offsets_of(part: pb.SharePartitionData) -> list[int]:
    return [o for r in part.acquired for o in range(r.first_offset, r.last_offset + 1)]


def only_result(part: pb.SharePartitionData) -> pb.AckResult:
    assert not part.error_code, part.error_message
    assert len(part.ack_results) == 1, part
    return part.ack_results[0]


def test_bad_input_gets_clear_errors_and_loses_nothing(jobs: BrokerCluster, tmp_path: Path) -> None:
    acks = AckLog()
    send_tagged(jobs, acks, 0, 10, b"")
    rules = configure_group(jobs, "bad", lock_ms=1000)
    holder, other = RawMember(jobs, "bad", "holder"), RawMember(jobs, "bad", "other")
    try:
        first, second, third = offsets_of(holder.fetch())
        accepted = refused_acks_change_nothing(holder, other, first, second, third)
        accepted += late_ack_is_refused_and_the_record_comes_back(jobs, holder, other, third)
        refuse_bad_identities(holder)
        refuse_bad_configs(jobs)
    finally:
        holder.close()
        other.close()
    drainer = ShareWorker(settings(jobs, tmp_path, "bad", "drainer")).start()
    try:
        wait_until(lambda: drainer.records_accepted + len(accepted) >= len(acks.snapshot()), 20, "the rest drained")
    finally:
        drainer.stop()
    drained = {o for e in events_of(tmp_path, "bad") if e["event"] == "accepted"
               for o in range(e["first_offset"], e["last_offset"] + 1)}
    assert drained.isdisjoint(accepted) and drained | set(accepted) == {o for _, o in acks.snapshot().values()}
    assert_drained(jobs, rules.group)


def refused_acks_change_nothing(holder: RawMember, other: RawMember, first: int, second: int, third: int) -> list[int]:
    """Acks of records another member holds, never acquired, partly held or malformed are refused, and the
    holder's locks stand: it accepts them afterwards."""
    stolen = only_result(other.ack(accept(first)))
    assert stolen.error_code == pb.ErrorCode.INVALID_RECORD_STATE and "not held by member other" in stolen.error_message
    never = only_result(holder.ack(accept(third + 1000)))
    assert never.error_code == pb.ErrorCode.INVALID_RECORD_STATE
    negative = holder.ack(pb.AckRange(first_offset=first, last_offset=first, type=pb.AckType.RELEASE, delay_ms=-5))
    assert negative.error_code == pb.ErrorCode.INVALID_REQUEST and "negative" in negative.error_message
    untyped = holder.ack(pb.AckRange(first_offset=first, last_offset=first))
    assert untyped.error_code == pb.ErrorCode.INVALID_REQUEST, untyped
    backwards = only_result(holder.ack(accept(second, first)))
    assert backwards.error_code == pb.ErrorCode.INVALID_RECORD_STATE
    partly = only_result(holder.ack(accept(second, third + 5)))
    assert partly.error_code == pb.ErrorCode.INVALID_RECORD_STATE
    assert only_result(holder.ack(accept(first, second))).error_code == pb.ErrorCode.NONE
    return [first, second]


def late_ack_is_refused_and_the_record_comes_back(cluster: BrokerCluster, holder: RawMember, other: RawMember,
                                                  offset: int) -> list[int]:
    """An ack after the lock expired is refused (the record may be someone else's now); it comes back."""
    time.sleep(1.1)  # past the 1 s lock
    late = only_result(holder.ack(accept(offset)))
    assert late.error_code == pb.ErrorCode.INVALID_RECORD_STATE, late  # its wording is checked below
    wait_until(lambda: not describe_queue(cluster, "bad").in_flight, 5, "the broker to expire the lock")
    again = other.fetch(max_records=1)
    assert offsets_of(again) == [offset] and again.acquired[0].delivery_count == 2, again
    assert only_result(other.ack(accept(offset))).error_code == pb.ErrorCode.NONE
    return [offset]


def refuse_bad_identities(member: RawMember) -> None:
    """An empty group id or member id is refused by name, by ShareFetch and ShareAcknowledge alike."""
    stub = member.stub()
    for group, member_id, words in (("", "m", "group id"), ("bad", "", "member id")):
        fetched = stub.ShareFetch(pb.ShareFetchRequest(group_id=group, member_id=member_id, partitions=[
            pb.SharePartitionFetch(topic=TOPIC, partition=0)]), timeout=CALL_TIMEOUT_S).partitions[0]
        acked = stub.ShareAcknowledge(pb.ShareAcknowledgeRequest(group_id=group, member_id=member_id, partitions=[
            pb.SharePartitionFetch(topic=TOPIC, partition=0, acks=[accept(0)])]), timeout=CALL_TIMEOUT_S).partitions[0]
        for answer in (fetched, acked):  # both calls answer the same code (checked below)
            assert answer.error_code in BAD_ID_CODES and words in answer.error_message, answer
    unknown_topic = stub.ShareFetch(pb.ShareFetchRequest(group_id="bad", member_id="m", partitions=[
        pb.SharePartitionFetch(topic="no-such-topic", partition=0)]), timeout=CALL_TIMEOUT_S).partitions[0]
    assert unknown_topic.error_code == pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, unknown_topic
    fresh = stub.DescribeSharePartitions(pb.DescribeSharePartitionsRequest(
        group_id="never-used", partitions=[pb.TopicPartitions(topic=TOPIC, partitions=[0])]), timeout=CALL_TIMEOUT_S)
    assert not fresh.partitions[0].error_code and not fresh.partitions[0].in_flight  # created on first use


def refuse_bad_configs(cluster: BrokerCluster) -> None:
    """Out-of-range or unknown group configs are refused, naming the key (asked of the controller leader:
    through another broker the answer takes 30 s, checked below)."""
    controller = controller_leader(cluster)
    for key, value in BAD_CONFIGS:
        answer = admin_call(cluster, "AlterGroupConfigs", pb.AlterGroupConfigsRequest(group_id="bad",
                                                                                      configs={key: value}), controller)
        assert answer.error_code and key in answer.error_message, (key, answer)


def controller_leader(cluster: BrokerCluster) -> int:
    with grpc.insecure_channel(cluster.address(cluster.live()[0])) as channel:
        return int(pb_grpc.BrokerStub(channel).Metadata(pb.MetadataRequest(), timeout=CALL_TIMEOUT_S).controller_id)


# ------------------------------------------------------------------------ broker gaps, pinned down


def test_an_ack_after_the_lock_expired_says_so(jobs: BrokerCluster) -> None:
    configure_group(jobs, "late", lock_ms=1000)
    send_tagged(jobs, AckLog(), 0, 1, b"")
    member = RawMember(jobs, "late", "slow")
    try:
        (offset,) = offsets_of(member.fetch(max_records=1))
        time.sleep(1.5)
        late = only_result(member.ack(accept(offset)))
    finally:
        member.close()
    assert late.error_code == pb.ErrorCode.INVALID_RECORD_STATE and "expired" in late.error_message, late


def test_an_empty_group_id_gets_one_error_code(jobs: BrokerCluster) -> None:
    member = RawMember(jobs, "", "m")
    try:
        fetched = member.fetch()
        acked = member.ack(accept(0))
    finally:
        member.close()
    assert fetched.error_code == acked.error_code == pb.ErrorCode.INVALID_GROUP_ID, (fetched, acked)


@pytest.mark.slow  # the 30 s wait it pins down
def test_a_refused_group_config_is_answered_at_once_by_any_broker(jobs: BrokerCluster) -> None:
    follower = next(node for node in jobs.live() if node != controller_leader(jobs))
    started = time.monotonic()
    with grpc.insecure_channel(jobs.address(follower)) as channel:
        answer = pb_grpc.AdminStub(channel).AlterGroupConfigs(pb.AlterGroupConfigsRequest(
            group_id="bad", configs={"share.record.lock.duration.ms": "500"}), timeout=40)
    elapsed_s = time.monotonic() - started
    print(f"refused config through broker {follower}: {elapsed_s:.1f} s, {answer}")
    assert answer.error_code and elapsed_s < 5, (elapsed_s, answer)


def test_the_dead_letter_topic_is_created_on_demand_whoever_leads(cluster: BrokerCluster) -> None:
    with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic("orders", partitions=3, replication_factor=3)
    controller = controller_leader(cluster)
    leaders = {p: cluster.leader_of("orders", p) for p in range(3)}
    partition = next((p for p, node in leaders.items() if node != controller), None)
    if partition is None:
        pytest.skip(f"every partition is led by the controller leader {controller}")
    configure_group(cluster, "orders-workers")
    send_to = Producer(cluster.bootstrap, acks="all")
    send_to.send("orders", value=b"poison", partition=partition)
    send_to.flush(timeout=30)
    send_to.close()
    brokers = Brokers(cluster.bootstrap.split(","))
    try:
        stub = brokers.share(brokers.leader("orders", partition) or "")
        fetched = stub.ShareFetch(pb.ShareFetchRequest(group_id="orders-workers", member_id="m", max_wait_ms=2000,
                                                       partitions=[pb.SharePartitionFetch(topic="orders",
                                                                                          partition=partition)]))
        (offset,) = offsets_of(fetched.partitions[0])
        stub.ShareAcknowledge(pb.ShareAcknowledgeRequest(group_id="orders-workers", member_id="m", partitions=[
            pb.SharePartitionFetch(topic="orders", partition=partition, acks=[
                pb.AckRange(first_offset=offset, last_offset=offset, type=pb.AckType.REJECT)])]))
    finally:
        brokers.close()
    wait_until(lambda: bool(read_dead_letters(cluster.bootstrap.split(","), "orders.dlq")), 10,
               f"the reject of orders-{partition} (led by {leaders[partition]}, controller {controller}) to "
               "reach orders.dlq")


def test_dead_letters_written_out_of_offset_order_all_arrive(broker: InProcessBroker) -> None:
    with Admin(broker.address) as admin:
        admin.create_topic(TOPIC, partitions=1, replication_factor=1)
    with Producer(broker.address, acks="all") as producer:
        for index in range(2):
            producer.send(TOPIC, value=b"poison-%d" % index, partition=0)
        producer.flush(timeout=30)
    brokers = Brokers([broker.address])
    stub = brokers.share(broker.address)
    try:
        fetched = stub.ShareFetch(pb.ShareFetchRequest(group_id="g", member_id="m", max_wait_ms=2000, partitions=[
            pb.SharePartitionFetch(topic=TOPIC, partition=0)])).partitions[0]
        lower, higher = offsets_of(fetched)
        for offset in (higher, lower):  # the higher one first: its dead letter is written before the lower's
            rejected = stub.ShareAcknowledge(pb.ShareAcknowledgeRequest(group_id="g", member_id="m", partitions=[
                pb.SharePartitionFetch(topic=TOPIC, partition=0, acks=[
                    pb.AckRange(first_offset=offset, last_offset=offset, type=pb.AckType.REJECT)])]))
            assert not rejected.partitions[0].ack_results[0].error_code
            time.sleep(0.5)
    finally:
        brokers.close()
    wait_until(lambda: len(read_dead_letters([broker.address], DLQ_TOPIC)) == 2, 5,
               f"both rejected records (offsets {higher}, then {lower}) in {DLQ_TOPIC}")
