"""Prometheus metrics of a live three-broker cluster (real processes, each with --metrics-listen): the figures
move by the right amounts as records are produced, consumed by a group, and taken and acknowledged by a share
group; partitions show as under-replicated and offline once a broker is killed; and every metric name that the
alert rules and the Grafana dashboard use appears in a real scrape (a rename cannot break them silently)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from logbroker_client import Admin, Consumer, Producer, ShareConsumer, TopicPartition
from logbroker_client.connection import Connection
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.types import OffsetAndMetadata

from tests.support.brokers import wait_until
from tests.support.cluster import BrokerCluster
from tests.support.metrics_scrape import Samples, scrape, value

REPO_ROOT = Path(__file__).resolve().parents[2]
ALERTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "logbroker-dashboard.json"
TOPIC = "metered"
N = 300
DEADLINE_S = 20.0

def names_used(text: str) -> set[str]:
    return set(re.findall(r"\blogbroker_[a-z_]+\b", text))


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerCluster]:
    cluster = BrokerCluster(tmp_path / "cluster", size=3, raft_tick_ms=20, metrics=True)
    failed_before = request.session.testsfailed
    try:
        cluster.start()
        yield cluster
    finally:
        if request.session.testsfailed != failed_before:
            print(f"----- broker logs (full logs under {cluster.root}) -----\n{cluster.log_tails()}")
        cluster.stop_all()


def wait_for(cluster: BrokerCluster, node: int, what: str, check: Callable[[Samples], bool]) -> Samples:
    """Scrape broker `node` until check holds; return that scrape."""
    seen: list[Samples] = []

    def holds() -> bool:
        seen[:] = [scrape(cluster.brokers[node].metrics_url)]
        return check(seen[0])

    wait_until(holds, DEADLINE_S, f"broker {node}'s metrics: {what}", interval_s=0.1)
    return seen[0]


def part(name: str) -> dict[str, object]:
    return {"topic": name, "partition": 0}


def test_metrics_move_as_records_flow_and_name_what_alerts_and_dashboard_use(cluster: BrokerCluster) -> None:
    admin = Admin(cluster.bootstrap)
    admin.create_topic(TOPIC, partitions=1, replication_factor=3)
    leader = cluster.leader_of(TOPIC, 0)
    url = cluster.brokers[leader].metrics_url
    before = scrape(url)
    assert value(before, "logbroker_partition_leader", **part(TOPIC)) == 1
    produced_before = value(before, "logbroker_partition_produced_records_total", **part(TOPIC)) or 0
    hw_before = value(before, "logbroker_partition_high_watermark", **part(TOPIC))
    assert hw_before is not None

    # ---- produce N records: the leader counts N more, and its high watermark moves by N
    with Producer(cluster.bootstrap, acks="all") as producer:
        futures = [producer.send(TOPIC, value=f"record-{i}".encode(), partition=0) for i in range(N)]
        assert producer.flush() == 0
    first = futures[0].result().offset
    after = wait_for(cluster, leader, f"{N} more records produced and the high watermark at {hw_before + N}",
                     lambda s: value(s, "logbroker_partition_produced_records_total", **part(TOPIC))
                     == produced_before + N and value(s, "logbroker_partition_high_watermark", **part(TOPIC))
                     == hw_before + N)
    assert (value(after, "logbroker_partition_produced_bytes_total", **part(TOPIC)) or 0) > N * len("record-0")
    assert value(after, "logbroker_partition_log_end_offset", **part(TOPIC)) == hw_before + N
    assert (value(after, "logbroker_partition_log_size_bytes", **part(TOPIC)) or 0) > 0
    # the producer sent on the data port
    assert (value(after, "logbroker_request_duration_seconds_count", protocol="data", api="Produce") or 0) >= 1
    assert (value(after, "logbroker_fsync_duration_seconds_count") or 0) >= 1
    for node in cluster.brokers:  # every replica holds the records; followers report their own offsets
        wait_for(cluster, node, "its replica at the new high watermark",
                 lambda s: value(s, "logbroker_partition_high_watermark", **part(TOPIC)) == hw_before + N)
    wait_for(cluster, leader, "every replica in sync again", lambda s: value(
        s, "logbroker_partition_under_replicated", **part(TOPIC)) == 0 and value(
        s, "logbroker_partition_in_sync_replicas", **part(TOPIC)) == 3)
    end = int(hw_before) + N

    # ---- a consumer group reads everything; its coordinator reports committed offset and lag
    group = "metered-readers"
    tp = TopicPartition(TOPIC, 0)
    fetched_before = value(after, "logbroker_partition_fetched_records_total", **part(TOPIC)) or 0
    with Consumer(cluster.bootstrap, group_id=group, auto_offset_reset="earliest",
                  enable_auto_commit=False) as consumer:
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        got = gather(lambda: consumer.poll(0.5), N, "records consumed")
        assert [r.offset for r in got] == list(range(first, first + N))
        half = first + N // 2
        consumer.commit({tp: OffsetAndMetadata(half)})
        coordinator = find_coordinator(cluster, group)
        wait_for(cluster, coordinator, f"group {group} committed at {half}, {end - half} behind",
                 lambda s: value(s, "logbroker_group_committed_offset", group=group, **part(TOPIC)) == half
                 and value(s, "logbroker_group_lag_records", group=group, **part(TOPIC)) == end - half)
        consumer.commit({tp: OffsetAndMetadata(end)})
        wait_for(cluster, coordinator, f"group {group} with no lag after its commit",
                 lambda s: value(s, "logbroker_group_lag_records", group=group, **part(TOPIC)) == 0
                 and value(s, "logbroker_group_committed_offset", group=group, **part(TOPIC)) == end)
    wait_for(cluster, leader, f"{N} records fetched from the leader",
             lambda s: (value(s, "logbroker_partition_fetched_records_total", **part(TOPIC)) or 0)
             >= fetched_before + N)

    # ---- a share group: records taken leave "available" for "in flight"; acknowledged, they leave both
    queue = "metered-workers"
    taken_first = 40
    with ShareConsumer(queue, cluster.bootstrap, max_in_flight=taken_first) as worker:
        worker.subscribe([TOPIC])
        held = gather(lambda: worker.poll(0.5), taken_first, "queue records taken")
        assert len(held) == taken_first  # no more while max_in_flight records are unacknowledged
        wait_for(cluster, leader, f"{taken_first} in flight, {N - taken_first} available",
                 lambda s: value(s, "logbroker_share_in_flight_records", group=queue, **part(TOPIC)) == taken_first
                 and value(s, "logbroker_share_available_records", group=queue, **part(TOPIC)) == N - taken_first)
        for record in held:
            record.ack()
        worker.commit()
        wait_for(cluster, leader, "the acknowledged records gone from in flight",
                 lambda s: value(s, "logbroker_share_in_flight_records", group=queue, **part(TOPIC)) == 0
                 and value(s, "logbroker_share_available_records", group=queue, **part(TOPIC)) == N - taken_first)

        def take_and_ack() -> list[Any]:
            records = worker.poll(0.5)
            for record in records:
                record.ack()
            worker.commit()
            return records

        gather(take_and_ack, N - taken_first, "more queue records taken and acknowledged")
    drained = wait_for(cluster, leader, "an empty queue",
                       lambda s: value(s, "logbroker_share_available_records", group=queue, **part(TOPIC)) == 0
                       and value(s, "logbroker_share_in_flight_records", group=queue, **part(TOPIC)) == 0)
    assert value(drained, "logbroker_share_dead_lettered_records_total", group=queue, **part(TOPIC)) == 0
    assert value(drained, "logbroker_share_oldest_available_age_seconds", group=queue, **part(TOPIC)) == 0

    # ---- an error answered is counted per API and error code
    errors_before = value(drained, "logbroker_request_errors_total", protocol="grpc", api="Fetch",
                          error="OFFSET_OUT_OF_RANGE") or 0
    conn = Connection(cluster.address(leader))
    try:
        answer = conn.broker.Fetch(pb.FetchRequest(partitions=[
            pb.FetchPartition(topic=TOPIC, partition=0, fetch_offset=10**9, partition_max_bytes=1024)]), timeout=5)
    finally:
        conn.close()
    assert answer.results[0].error_code == pb.ErrorCode.OFFSET_OUT_OF_RANGE
    wait_for(cluster, leader, "the out-of-range fetch counted",
             lambda s: value(s, "logbroker_request_errors_total", protocol="grpc", api="Fetch",
                             error="OFFSET_OUT_OF_RANGE") == errors_before + 1)

    # ---- every metric the alert rules and the dashboard name is in a real scrape (of some broker)
    scraped = {name for node in cluster.brokers for name, _ in scrape(cluster.brokers[node].metrics_url)}
    used = names_used(ALERTS.read_text()) | names_used(DASHBOARD.read_text())
    assert used, "no logbroker_ metric found in the alert rules and the dashboard"
    assert not used - scraped, f"named by the alerts or the dashboard but in no scrape: {sorted(used - scraped)}"

    # ---- a broker killed: the partitions it shared are under-replicated on their leaders, and a partition
    # whose only replica it held is offline in the controller's view
    admin.create_topic("metered-single", partitions=3, replication_factor=1)
    placed = {p.partition: p.replicas[0] for p in admin.describe_topics(["metered-single"])[0].partitions}
    victim = placed[0]
    cluster.kill(victim)
    survivors = [node for node in cluster.brokers if node != victim]

    def offline_seen() -> bool:
        for node in survivors:
            samples = scrape(cluster.brokers[node].metrics_url)
            if value(samples, "logbroker_controller_active") == 1:
                return value(samples, "logbroker_partition_offline", **part("metered-single")) == 1
        return False

    wait_until(offline_seen, DEADLINE_S, f"metered-single-0 offline once broker {victim} is killed", interval_s=0.1)
    new_leader = cluster.leader_of(TOPIC, 0, exclude=(victim,))
    wait_for(cluster, new_leader, f"{TOPIC}-0 under-replicated without broker {victim}",
             lambda s: value(s, "logbroker_partition_under_replicated", **part(TOPIC)) == 1
             and value(s, "logbroker_partition_in_sync_replicas", **part(TOPIC)) == 2)
    admin.close()


def gather(poll: Callable[[], list[Any]], count: int, what: str) -> list[Any]:
    """Poll until count items came (within the deadline); return them."""
    got: list[Any] = []

    def enough() -> bool:
        got.extend(poll())
        return len(got) >= count

    wait_until(enough, DEADLINE_S, f"{count} {what}")
    return got


def find_coordinator(cluster: BrokerCluster, group: str) -> int:
    """The broker that reports the group's metrics (its coordinator)."""
    found: list[int] = []

    def reported() -> bool:
        for node in cluster.live():
            if value(scrape(cluster.brokers[node].metrics_url), "logbroker_group_members", group=group) is not None:
                found.append(node)
                return True
        return False

    wait_until(reported, DEADLINE_S, f"a broker reporting group {group}", interval_s=0.1)
    return found[-1]

