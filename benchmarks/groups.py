"""Consumer-group benchmarks: rebalance time, offset commits per second, and the offsets log's size.

    python -m benchmarks.groups                     # a temporary broker, default sizes
    python -m benchmarks.groups --bootstrap H:P     # an existing cluster (no log size then)

- rebalance: `--members` members (10) share a topic of `--partitions` partitions (100); one more joins, and
  the time is taken until every partition is owned again with the newcomer holding its share (KIP-848's
  hand-over: only the partitions that move stop, each after its owner released it).
- commits: `--commits` synchronous commits (each answered once committed by Raft), latency percentiles and
  commits/s, from `--committers` concurrent groups.
- offsets log: the size of __consumer_offsets on disk after all that (snapshots keep it bounded).

Members speak the Groups gRPC service directly, as a client library would, each heartbeating on its own
thread at the interval the coordinator asks for (and at once after an assignment change).
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

from benchmarks.common import TemporaryBroker, emit, ensure_topic, percentiles_ms, rounded, run_main

RETRIABLE = {pb.ErrorCode.NOT_COORDINATOR, pb.ErrorCode.COORDINATOR_LOAD_IN_PROGRESS,
             pb.ErrorCode.COORDINATOR_NOT_AVAILABLE}
REBALANCE_TIMEOUT_S = 60.0


class Coordinator:
    """The group's coordinator stub, found again whenever it moves."""

    def __init__(self, bootstrap: str, group: str) -> None:
        self.bootstrap = bootstrap.split(",")
        self.group = group
        self._stub: Any = None

    def call(self, method: str, request: Any) -> Any:
        deadline = time.monotonic() + REBALANCE_TIMEOUT_S
        while True:
            if self._stub is None:
                self._stub = self._find()
            answer = getattr(self._stub, method)(request, timeout=30)
            if answer.error_code not in RETRIABLE:
                return answer
            self._stub = None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{method}: {answer.error_message}")
            time.sleep(0.05)

    def _find(self) -> Any:
        for address in self.bootstrap:
            channel = grpc.insecure_channel(address)
            found = pb_grpc.GroupsStub(channel).FindCoordinator(
                pb.FindCoordinatorRequest(group_ids=[self.group]), timeout=30).coordinators[0]
            if not found.error_code:
                return pb_grpc.GroupsStub(grpc.insecure_channel(found.address))
        time.sleep(0.1)
        return None


class Member:
    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.coordinator = Coordinator(bootstrap, group)
        self.group, self.topic = group, topic
        self.member_id = uuid.uuid4().hex
        self.epoch = 0
        self.owned: frozenset[int] = frozenset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Member:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            interval_ms, changed = self._heartbeat()
            if not changed:
                self._stop.wait(interval_ms / 1000)

    def _heartbeat(self) -> tuple[int, bool]:
        owned = [pb.TopicPartitions(topic=self.topic, partitions=sorted(self.owned))] if self.owned else []
        answer = self.coordinator.call("Heartbeat", pb.GroupHeartbeatRequest(
            group_id=self.group, member_id=self.member_id, member_epoch=self.epoch, full_request=self.epoch == 0,
            subscribed_topic_names=[self.topic], owned_partitions=owned))
        if answer.error_code:
            raise RuntimeError(f"heartbeat: {answer.error_message}")
        self.epoch = answer.member_epoch
        if not answer.has_assignment:
            return answer.heartbeat_interval_ms, False
        new = frozenset(p for t in answer.assignment for p in t.partitions)
        changed = new != self.owned
        self.owned = new
        return answer.heartbeat_interval_ms, changed


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + REBALANCE_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.002)


def balanced(members: list[Member], partitions: int) -> bool:
    owned = [m.owned for m in members]
    union: set[int] = set().union(*owned)
    sizes = [len(o) for o in owned]
    return len(union) == partitions == sum(sizes) and max(sizes) - min(sizes) <= 1


def measure_rebalance(bootstrap: str, topic: str, partitions: int, count: int) -> dict[str, Any]:
    group = f"bench-rebalance-{uuid.uuid4().hex[:8]}"
    members = [Member(bootstrap, group, topic).start() for _ in range(count)]
    try:
        wait_until(lambda: balanced(members, partitions), f"{count} members to share {partitions} partitions")
        started = time.monotonic()
        members.append(Member(bootstrap, group, topic).start())
        wait_until(lambda: balanced(members, partitions), "the group to settle after a join")
        join_s = time.monotonic() - started
        leaving = members.pop(0)
        started = time.monotonic()
        leaving.stop()
        leaving.coordinator.call("Heartbeat", pb.GroupHeartbeatRequest(
            group_id=group, member_id=leaving.member_id, member_epoch=-1))
        wait_until(lambda: balanced(members, partitions), "the group to settle after a leave")
        leave_s = time.monotonic() - started
    finally:
        for member in members:
            member.stop()
    return {"members": count, "partitions": partitions, "join_settled_ms": rounded(join_s * 1000, 1),
            "leave_settled_ms": rounded(leave_s * 1000, 1)}


def measure_commits(bootstrap: str, topic: str, commits: int, committers: int) -> dict[str, Any]:
    latencies: list[float] = []
    lock = threading.Lock()

    def commit_loop(index: int) -> None:
        coordinator = Coordinator(bootstrap, f"bench-commits-{index}")
        mine: list[float] = []
        for i in range(commits // committers):
            started = time.monotonic()
            answer = coordinator.call("CommitOffsets", pb.CommitOffsetsRequest(
                group_id=coordinator.group, member_epoch=-1,
                offsets=[pb.OffsetToCommit(topic=topic, partition=0, offset=i)]))
            if answer.error_code:
                raise RuntimeError(f"commit: {answer.error_message}")
            mine.append(time.monotonic() - started)
        with lock:
            latencies.extend(mine)

    started = time.monotonic()
    with ThreadPoolExecutor(committers) as pool:
        list(pool.map(commit_loop, range(committers)))
    elapsed = time.monotonic() - started
    return {"commits": len(latencies), "committers": committers,
            "commits_per_s": rounded(len(latencies) / elapsed, 1), "latency_ms": percentiles_ms(latencies)}


def offsets_log_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.glob("__consumer_offsets-*/*.log"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", default=None, help="an existing cluster (default: a temporary broker)")
    parser.add_argument("--topic", default="bench-groups")
    parser.add_argument("--partitions", type=int, default=100)
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--commits", type=int, default=20_000)
    parser.add_argument("--committers", type=int, default=8)
    args = parser.parse_args()
    broker = TemporaryBroker().start() if args.bootstrap is None else None
    try:
        bootstrap = args.bootstrap or (broker.address if broker else "")
        ensure_topic(bootstrap, args.topic, args.partitions, None)
        result: dict[str, Any] = {"tool": "groups", "rebalance": measure_rebalance(
            bootstrap, args.topic, args.partitions, args.members)}
        result["commits"] = measure_commits(bootstrap, args.topic, args.commits, args.committers)
        if broker is not None:
            result["offsets_log_bytes"] = offsets_log_bytes(broker.workdir / "data")
        emit(result)
    finally:
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    run_main(main)
