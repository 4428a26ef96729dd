"""Consumer groups over three real brokers: the acceptance scenarios of the consumer-groups issue.

Members are processes (tests/support/group_member_process.py: logbroker_client.Consumer with a group_id)
that write down every assignment, revocation, loss, record and commit; a producer thread (ProducerLoad)
keeps acknowledged records coming; an observer thread writes what the coordinator shows (committed
offsets, owners). Each scenario ends with the group checker (tests/support/group_checker.py) clean over
all of it: members consume only what they own, never two owners of a partition at once, commits never
ahead of what was polled, committed offsets never back, and every acknowledged record consumed.

The brokers' group session timeout is lowered to SESSION_MS and the heartbeat interval to HEARTBEAT_MS,
so a silent member is dropped within seconds.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from logbroker_client import Admin, Consumer, Producer, TopicPartition
from logbroker_client.errors import LogbrokerError
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from tests.cluster.conftest import RAFT_TICK_MS
from tests.support.brokers import wait_until
from tests.support.checker import AckLog, ProducerLoad, make_value, read_log
from tests.support.cluster import BrokerCluster
from tests.support.group_checker import (
    GroupObserver,
    check,
    describe_violations,
    load_events,
    now_us,
    replay,
    summarize,
)
from tests.support.group_member_process import MemberProcess, MemberSettings

TOPIC = "orders"
PARTITIONS = 6
GROUP = "billing"
OFFSETS_TOPIC = "__consumer_offsets"
SESSION_MS = 3000
HEARTBEAT_MS = 200
LOAD_RATE_PER_S = 300.0
SETTLE_TIMEOUT_S = 30.0  # for a group to settle, for the members to consume what was acknowledged
CALL_TIMEOUT_S = 5.0
FIRST_EXTRA_SEQ = 10**9  # sequence numbers of Scenario.produce(), far above the load's

LAPSED_SESSION_BUG = (
    "client bug: poll() confirmed a session that had already lapsed (GroupMember.check_session, called by poll() "
    "before and right after taking records) and handed out records of partitions the coordinator had given to "
    "another member. Records handed out after a pause that fell between that check and the return are not this "
    "bug: the member reports the check's instant (Consumer.ownership_checked_at_ms), and the checker ends its "
    "ownership there")
NEW_COORDINATOR_BUG = (
    "broker bug: a new coordinator dates each member's session from when its replica replayed the member's record "
    "(GroupCoordinatorShard._replay_member sets last_heartbeat_ms = clock_ms() then), not from when it took over; "
    "heartbeats write nothing, so a member whose record is older than the session timeout is expired by the new "
    "coordinator's first tick and loses its partitions (UNKNOWN_MEMBER_ID), static members included")

Event = dict[str, Any]


class ExpiredByNewCoordinator(AssertionError):
    """Members lost their partitions when the coordinator moved: NEW_COORDINATOR_BUG."""


class RecordsAfterLapse(AssertionError):
    """A member returned records of partitions its lapsed session had already lost: LAPSED_SESSION_BUG."""


def fenced_at_coordinator_move(violations: list[str], summary: dict[str, Any]) -> AssertionError | None:
    """In scenarios where nothing else fences a member, violations after members lost partitions are the bug's."""
    if summary["ended"].get("lost"):
        return ExpiredByNewCoordinator(f"members were fenced, and then: {describe_violations(violations)}")
    return None


def fenced_member_kept_consuming(violations: list[str], summary: dict[str, Any]) -> AssertionError | None:
    """Only overlaps of a fenced (lost) ownership with its successor: the client's lapsed-session race."""
    if all(v.startswith("overlap:") and "(lost)" in v for v in violations):
        return RecordsAfterLapse(describe_violations(violations))
    return None


# ------------------------------------------------------------------------------------------- harness


def held(events: Sequence[Event]) -> set[int]:
    """The partitions one member process holds after these events of it."""
    owned: set[int] = set()
    for event in events:
        if event["event"] == "assigned":
            owned |= set(event["partitions"])
        elif event["event"] in ("revoked", "lost"):
            owned -= set(event["partitions"])
        elif event["event"] == "closed":
            owned.clear()
    return owned


class Scenario:
    """The cluster, the load, the observer and the member processes of one test."""

    def __init__(self, cluster: BrokerCluster, root: Path) -> None:
        self.cluster = cluster
        self.root = root
        self.acks = AckLog()
        self.load: ProducerLoad | None = None
        self.observer = GroupObserver(cluster.bootstrap, GROUP, TOPIC, root / "observer.jsonl")
        self.members: dict[str, MemberProcess] = {}
        self.extra = 0  # records produce() has sent

    # ------------------------------------------------------------------------------ parts

    def start_load(self, rate_per_s: float = LOAD_RATE_PER_S) -> None:
        self.load = ProducerLoad(self.cluster.bootstrap, TOPIC, PARTITIONS, self.acks, rate_per_s=rate_per_s,
                                 max_outstanding=500).start()
        if not self.observer.started:
            self.observer.start()

    def produce(self, count: int) -> None:
        """Acknowledged records with sequence numbers the load has not used (so values stay distinct)."""
        first = FIRST_EXTRA_SEQ + self.extra
        self.extra += count
        with Producer(self.cluster.bootstrap, acks="all", linger_ms=2, request_timeout_ms=5000) as producer:
            for seq in range(first, first + count):
                value = make_value(seq, 64)
                producer.send(TOPIC, value=value, partition=seq % PARTITIONS).add_done_callback(
                    self.acks.callback(value))
            producer.flush(timeout=30)

    def member(self, name: str, **settings: Any) -> MemberProcess:
        assert name not in self.members, f"a member {name} was started already"
        settings.setdefault("session_timeout_ms", SESSION_MS)
        process = MemberProcess(MemberSettings(self.cluster.bootstrap, GROUP, TOPIC, self.root / f"{name}.jsonl",
                                               name=name, **settings)).start()
        self.members[name] = process
        return process

    def holdings(self, names: Sequence[str] | None = None) -> dict[str, set[int]]:
        return {name: held(self.members[name].events()) for name in names or self.live()}

    def live(self) -> list[str]:
        return [name for name, process in self.members.items() if process.running]

    def wait_shared(self, names: Sequence[str], timeout_s: float = SETTLE_TIMEOUT_S) -> dict[str, set[int]]:
        """Until these members hold every partition between them, each its share (counts within one)."""
        found: dict[str, dict[str, set[int]]] = {}

        def shared() -> bool:
            for name in names:
                process = self.members[name]
                assert process.running, f"member {name} exited:\n{process.log_text()[-3000:]}"
            holdings = found["last"] = self.holdings(names)
            sizes = [len(h) for h in holdings.values()]
            union = set().union(*holdings.values())
            return len(union) == sum(sizes) == PARTITIONS and max(sizes) - min(sizes) <= 1

        try:
            wait_until(shared, timeout_s, f"members {list(names)} to share the {PARTITIONS} partitions", 0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last holdings: {found.get('last')}") from None
        return found["last"]

    def wait_consuming(self, names: Sequence[str], records: int = 20, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
        """Until each member consumed `records` more records than it had."""
        def count(name: str) -> int:
            return sum(len(e["records"]) for e in self.members[name].events() if e["event"] == "consumed")

        targets = {name: count(name) + records for name in names}
        wait_until(lambda: all(count(n) >= t for n, t in targets.items()), timeout_s,
                   f"members {list(names)} to consume {records} more records each", 0.1)

    def events(self) -> list[Event]:
        return load_events(sorted(self.root.glob("*.jsonl")))

    # ---------------------------------------------------------------------------- the end

    def stop_load(self) -> None:
        if self.load is not None:
            self.load.stop()
            self.load = None

    def wait_all_consumed(self, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
        """Until every acknowledged record was consumed by some member (the members still run)."""
        wanted = set(self.acks.snapshot().values())
        missing: list[set[tuple[int, int]]] = []

        def consumed() -> bool:
            seen = {(p, o) for e in self.events() if e["event"] == "consumed" for p, o, _ in e["records"]}
            missing[:] = [wanted - seen]
            return not missing[0]

        try:
            wait_until(consumed, timeout_s, f"the {len(wanted)} acknowledged records to be consumed", 0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {len(missing[0])} missing, e.g. {sorted(missing[0])[:10]}") from None

    def finish(self, known: Callable[[list[str], dict[str, Any]], AssertionError | None] | None = None
               ) -> dict[str, Any]:
        """Stop the load, let the members consume the rest, stop them, and hold everything to the checker.
        `known` may put the violations down to a known bug: it returns the exception to raise (which the
        test's xfail expects), or None when they are not that bug's."""
        self.stop_load()
        self.wait_all_consumed()
        for process in self.members.values():
            process.stop()
        self.observer.stop()
        log = read_log(self.cluster.bootstrap, TOPIC, range(PARTITIONS))
        events = self.events()
        violations = check(events, self.acks.snapshot(), log)
        summary = summarize(events, log)
        explained = known(violations, summary) if violations and known is not None else None
        if explained is not None:
            raise explained
        assert not violations, f"{self.acks.summary()}\n{describe_violations(violations)}\nsummary: {summary}"
        summary["observations"] = self.observer.shown
        print(f"checker clean: {summary}; producer: {self.acks.summary()}")
        return summary

    def close(self) -> None:
        with contextlib.suppress(AssertionError):
            self.stop_load()
        for process in self.members.values():
            if process.running:
                process.kill()
        self.observer.stop()

    def member_logs(self) -> str:
        return "\n".join(f"===== member {name} ({process.log_path})\n{process.log_text()[-2000:]}"
                         for name, process in self.members.items())


@pytest.fixture
def scenario(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Scenario]:
    cluster = BrokerCluster(tmp_path / "cluster", size=3, raft_tick_ms=RAFT_TICK_MS,
                            broker_config={"group_session_timeout_ms": SESSION_MS,
                                           "group_heartbeat_interval_ms": HEARTBEAT_MS})
    failed_before = request.session.testsfailed
    run: Scenario | None = None
    try:
        cluster.start()
        with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
            admin.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=3)
        run = Scenario(cluster, tmp_path)
        yield run
    finally:
        try:
            if run is not None:
                run.close()
            if request.session.testsfailed != failed_before:
                print(f"\n----- logs of {request.node.nodeid} (under {tmp_path}) -----\n{cluster.log_tails()}\n"
                      f"{run.member_logs() if run is not None else ''}", flush=True)
        finally:
            cluster.stop_all()


def find_coordinator(cluster: BrokerCluster) -> int:
    """The group's coordinator as the Groups FindCoordinator RPC names it, asked of live brokers."""
    found: list[int] = []

    def named() -> bool:
        for node in cluster.live():
            try:
                with grpc.insecure_channel(cluster.address(node)) as channel:
                    answer = pb_grpc.GroupsStub(channel).FindCoordinator(
                        pb.FindCoordinatorRequest(group_ids=[GROUP]), timeout=CALL_TIMEOUT_S).coordinators[0]
            except grpc.RpcError:
                continue
            if not answer.error_code and answer.node_id in cluster.live():
                found.append(answer.node_id)
                return True
        return False

    wait_until(named, SETTLE_TIMEOUT_S, f"a live coordinator of group {GROUP}", interval_s=0.1)
    return found[-1]


def describe(cluster: BrokerCluster, timeout_s: float = SETTLE_TIMEOUT_S) -> Any:
    """Admin.describe_groups of the group, retried while the cluster is moving."""
    found: list[Any] = []

    def described() -> bool:
        try:
            with Admin(cluster.bootstrap, request_timeout_ms=int(CALL_TIMEOUT_S * 1000)) as admin:
                found.append(admin.describe_groups([GROUP])[0])
        except LogbrokerError:
            return False
        return True

    wait_until(described, timeout_s, f"group {GROUP} to be described", interval_s=0.2)
    return found[-1]


def committed_offsets(description: Any) -> dict[int, int | None]:
    return {p.partition: p.committed for p in description.partitions if p.topic == TOPIC}


def behind(now: int | None, then: int | None) -> bool:
    """A committed offset now below (or without) the one there was."""
    return then is not None and (now is None or now < then)


def committed_by_consumer(consumer: Consumer, tps: list[TopicPartition]) -> dict[int, int | None]:
    return {tp.partition: None if found is None else found.offset for tp, found in consumer.committed(tps).items()}


def commits_since(process: MemberProcess, since_us: int) -> int:
    return sum(1 for e in process.events() if e["event"] == "commit" and e["ok"] and e["sent_us"] > since_us)


def taken_at(events: Sequence[Event], partitions: set[int]) -> int:
    """When the last of these partitions was assigned (the member's latest assigned event naming each)."""
    times = {}
    for event in events:
        if event["event"] == "assigned":
            for partition in set(event["partitions"]) & partitions:
                times[partition] = event["t_us"]
    assert set(times) == partitions, f"never assigned {partitions - set(times)}"
    return max(times.values())


def in_sync_everywhere(cluster: BrokerCluster, node: int, topics: dict[str, int]) -> Callable[[], bool]:
    """Whether `node` is in the in-sync set of every partition of these topics (as each leader sees it)."""
    def check() -> bool:
        for topic, count in topics.items():
            for partition in range(count):
                leader = cluster.current_leader(topic, partition)
                view = cluster.partition_view(leader, topic, partition) if leader is not None else None
                if view is None or node not in view.isr:
                    return False
        return True

    return check


# --------------------------------------------------------------------------------------------- scenarios


def test_members_join_and_leave_under_load(scenario: Scenario) -> None:
    """One member takes everything; two join (one committing through auto-commit) and the partitions spread;
    one closes and its partitions move at once; another joins; the first closes."""
    scenario.start_load()
    scenario.member("a")
    scenario.wait_shared(["a"])
    scenario.wait_consuming(["a"])
    scenario.member("b")
    scenario.member("c", commit="auto")
    shares = scenario.wait_shared(["a", "b", "c"])
    scenario.wait_consuming(["a", "b", "c"])
    stopped = now_us()
    scenario.members["b"].stop()
    holdings = scenario.wait_shared(["a", "c"])
    took = max(taken_at(scenario.members[name].events(), holdings[name] & shares["b"])
               for name in ("a", "c") if holdings[name] & shares["b"])
    assert took - stopped < SESSION_MS * 1000, "b's partitions waited for a session timeout though b left"
    scenario.member("d")
    scenario.wait_shared(["a", "c", "d"])
    scenario.wait_consuming(["a", "c", "d"])
    scenario.members["a"].stop()
    scenario.wait_shared(["c", "d"])
    scenario.wait_consuming(["c", "d"])
    summary = scenario.finish()
    assert summary["owners"] == 4


def test_a_killed_members_partitions_move_after_the_session_timeout(scenario: Scenario) -> None:
    scenario.start_load()
    scenario.member("a")
    scenario.member("b")
    shares = scenario.wait_shared(["a", "b"])
    scenario.wait_consuming(["a", "b"])
    killed = now_us()
    scenario.members["a"].kill()
    scenario.wait_shared(["b"], timeout_s=SESSION_MS / 1000 + 15)
    moved = taken_at(scenario.members["b"].events(), shares["a"]) - killed
    # a's last heartbeat left at most one interval before the kill, and the coordinator waits a session after it
    assert moved >= (SESSION_MS - HEARTBEAT_MS - 100) * 1000, f"a's partitions moved {moved / 1e6:.3f}s after the kill"
    scenario.wait_consuming(["b"])
    scenario.finish()
    print(f"a's partitions {sorted(shares['a'])} moved to b {moved / 1e6:.3f}s after a was SIGKILLed")


def test_a_member_paused_past_its_session_is_fenced_and_rejoins(scenario: Scenario) -> None:
    scenario.start_load()
    scenario.member("a")
    scenario.member("b")
    shares = scenario.wait_shared(["a", "b"])
    scenario.wait_consuming(["a", "b"])
    paused = now_us()
    scenario.members["a"].pause()
    scenario.wait_shared(["b"], timeout_s=SESSION_MS / 1000 + 15)  # b takes a's partitions meanwhile
    moved = taken_at(scenario.members["b"].events(), shares["a"]) - paused
    assert moved >= (SESSION_MS - HEARTBEAT_MS - 100) * 1000, f"a's partitions moved {moved / 1e6:.3f}s after the pause"
    time.sleep(max(0.0, (paused + SESSION_MS * 1000) / 1e6 + 1 - time.time()))
    resumed = now_us()
    scenario.members["a"].resume()

    def lost_then_rejoined(events: list[Event]) -> bool:
        after = [e for e in events if e["t_us"] >= resumed]
        lost = [i for i, e in enumerate(after) if e["event"] == "lost"]
        return bool(lost) and any(e["event"] == "assigned" for e in after[lost[0]:])

    events = scenario.members["a"].wait_for(lost_then_rejoined, "a to be told it lost its partitions and to rejoin",
                                            timeout_s=SETTLE_TIMEOUT_S)
    lost = next(e for e in events if e["event"] == "lost" and e["t_us"] >= resumed)
    assert set(lost["partitions"]) == shares["a"]
    scenario.wait_shared(["a", "b"])
    scenario.wait_consuming(["a", "b"])
    scenario.finish(fenced_member_kept_consuming)


def test_the_coordinators_broker_killed_and_restarted_during_commits(scenario: Scenario) -> None:
    """Killed soon after the group settled: a coordinator move later than a session after the members' last
    change fences them (NEW_COORDINATOR_BUG; the test below pins it), which the move back to the restarted
    broker (leader balancing) can still be."""
    scenario.start_load()
    a = scenario.member("a", commit_interval_ms=20)
    b = scenario.member("b", commit_interval_ms=20)
    scenario.wait_shared(["a", "b"])
    scenario.wait_consuming(["a", "b"])
    coordinator = find_coordinator(scenario.cluster)
    assert describe(scenario.cluster).coordinator_id == coordinator
    before = committed_offsets(describe(scenario.cluster))
    killed = now_us()
    scenario.cluster.kill(coordinator)
    wait_until(lambda: commits_since(a, killed) > 5 and commits_since(b, killed) > 5, SETTLE_TIMEOUT_S,
               "both members to commit again at a new coordinator", 0.1)
    moved_to = find_coordinator(scenario.cluster)
    assert moved_to != coordinator
    after = committed_offsets(describe(scenario.cluster))
    moved_back = {p: (offset, after.get(p)) for p, offset in before.items() if behind(after.get(p), offset)}
    assert not moved_back, f"committed offsets (before, after) the kill: {moved_back}"
    scenario.cluster.restart(coordinator)
    restarted = now_us()
    wait_until(lambda: commits_since(a, restarted) > 5 and commits_since(b, restarted) > 5, SETTLE_TIMEOUT_S,
               "both members to commit after the broker came back", 0.1)
    scenario.wait_consuming(["a", "b"])
    summary = scenario.finish(fenced_at_coordinator_move)
    print(f"coordinator {coordinator} killed, moved to {moved_to}; commits ok {summary['commits ok']}, "
          f"failed {summary['commits failed']}; ownerships ended {summary['ended']}")


@pytest.mark.slow  # 25-35 s: make test-slow; the default suite keeps test_failover's rolling restart under load
def test_a_rolling_restart_of_every_broker_reassigns_nothing_among_static_members(scenario: Scenario) -> None:
    scenario.start_load()
    for name in ("a", "b", "c"):
        scenario.member(name, instance_id=f"pod-{name}")
    shares = scenario.wait_shared(["a", "b", "c"])
    scenario.wait_consuming(["a", "b", "c"])
    settled = now_us()
    time.sleep(SESSION_MS / 1000 + 1)  # a group that has been stable for a while, as most are
    with Admin(scenario.cluster.bootstrap) as admin:
        offsets_partitions = len(admin.describe_topics([OFFSETS_TOPIC])[0].partitions)
    topics = {TOPIC: PARTITIONS, OFFSETS_TOPIC: offsets_partitions}
    for node in sorted(scenario.cluster.brokers):
        scenario.cluster.terminate(node)
        scenario.cluster.restart(node)
        wait_until(in_sync_everywhere(scenario.cluster, node, topics), SETTLE_TIMEOUT_S,
                   f"broker {node} to be in sync on every partition again", 0.2)
        scenario.wait_consuming(["a", "b", "c"], records=5)
    restarted = now_us()  # what members give up when they close at the end is no move
    scenario.finish(fenced_at_coordinator_move)
    moves = [(name, e["event"], e["partitions"]) for name in shares for e in scenario.members[name].events()
             if e["event"] in ("assigned", "revoked", "lost") and settled < e["t_us"] < restarted]
    if any(kind == "lost" for _, kind, _ in moves):
        raise ExpiredByNewCoordinator(f"static members lost their partitions in the rolling restart: {moves}")
    assert not moves, f"partitions moved during the rolling restart: {moves}"


@pytest.mark.slow  # 11 s (it waits out a session): make test-slow; the default suite keeps the coordinator kill above
def test_stable_members_keep_their_partitions_when_the_coordinator_moves(scenario: Scenario) -> None:
    """The bug on its own: two members stable for longer than the session timeout; the coordinator's broker dies.
    The new coordinator must give them a fresh session (as the issue says, it serves them at once)."""
    scenario.member("a")
    scenario.member("b")
    scenario.wait_shared(["a", "b"])
    settled = now_us()
    time.sleep(SESSION_MS / 1000 + 1)
    coordinator = find_coordinator(scenario.cluster)
    scenario.cluster.kill(coordinator)
    assert find_coordinator(scenario.cluster) != coordinator
    time.sleep(SESSION_MS / 1000)
    lost = [(name, e["partitions"]) for name in ("a", "b") for e in scenario.members[name].events()
            if e["event"] == "lost" and e["t_us"] > settled]
    scenario.finish(fenced_at_coordinator_move)
    if lost:
        raise ExpiredByNewCoordinator(f"members lost their partitions when coordinator {coordinator} died: {lost}")


def test_every_committed_offset_survives_a_full_cluster_restart(scenario: Scenario) -> None:
    cluster = scenario.cluster
    scenario.start_load()
    scenario.member("a")
    scenario.member("b", commit="auto")
    scenario.wait_shared(["a", "b"])
    scenario.wait_consuming(["a", "b"], records=100)
    scenario.stop_load()
    scenario.wait_all_consumed()
    for name in ("a", "b"):
        scenario.members[name].stop()  # each commits what it consumed and leaves
    before = committed_offsets(describe(cluster))
    with Consumer(cluster.bootstrap, group_id=GROUP) as reader:
        tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
        read_before = committed_by_consumer(reader, tps)
        ends = reader.end_offsets(tps)
    assert read_before == before
    assert before == {tp.partition: ends[tp] for tp in tps}, "the members did not commit all they consumed"
    for node in cluster.brokers:
        cluster.kill(node)
    for node in cluster.brokers:
        cluster.restart(node, wait=False)
    cluster.wait_serving()
    assert committed_offsets(describe(cluster)) == before
    with Consumer(cluster.bootstrap, group_id=GROUP, request_timeout_ms=10_000) as reader:
        read_after = committed_by_consumer(reader, tps)
    assert read_after == before
    scenario.produce(200)  # more records; a new member resumes at the committed offsets, and reads only those
    resumed = scenario.member("c")
    scenario.wait_shared(["c"])
    starts = {p: o for e in resumed.events() if e["event"] == "assigned" for p, o in e["positions"]}
    assert starts == before
    scenario.finish()  # c consumes the new records (every acknowledged one must be consumed by someone)
    below = [(p, o) for e in resumed.events() if e["event"] == "consumed" for p, o, _ in e["records"]
             if o < (before[p] or 0)]
    assert not below, f"records consumed again after the restart, below the committed offsets: {below[:10]}"


def test_the_member_process_stops_cleanly_on_sigterm_and_sigint(scenario: Scenario) -> None:
    """The harness itself: SIGTERM and SIGINT both close the consumer (revoke, leave) and end the process."""
    a = scenario.member("a")
    scenario.wait_shared(["a"])
    a.signal(signal.SIGINT)
    assert a.proc is not None and a.proc.wait(20) == 0
    events = a.events()
    assert [e["event"] for e in events][-2:] == ["revoked", "closed"]
    assert held(events) == set()
    history = replay(events)
    assert [i.ended_by for i in history.intervals] == ["revoked"] * PARTITIONS
