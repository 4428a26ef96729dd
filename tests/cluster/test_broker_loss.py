"""Losing a broker, as a client sees it: a dead bootstrap address is passed over by every client path, a
partition whose only replica is down is shown offline and refuses writes within seconds, and `lb cluster
describe` says which broker is down."""

from __future__ import annotations

import asyncio
import io
import sys
import time

import pytest
from logbroker_client import Admin, Consumer, Producer, TopicPartition, cli
from logbroker_client.aio import AsyncProducer
from logbroker_client.errors import PartitionOfflineError

from tests.support.brokers import wait_until
from tests.support.cluster import BrokerCluster

FAIL_FAST_LIMIT_S = 5.0


def lb(capsys: pytest.CaptureFixture[str], *argv: str, stdin: str | None = None) -> tuple[int, str, str]:
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode()), encoding="utf-8")
    try:
        code = cli.main(list(argv))
    finally:
        sys.stdin = sys.__stdin__
    out, err = capsys.readouterr()
    return code, out, err


def no_partition_offline(bootstrap: str, topic: str) -> bool:
    with Admin(bootstrap, request_timeout_ms=5000) as admin:
        return not any(p.offline for p in admin.describe_topics([topic])[0].partitions)


def test_a_dead_first_bootstrap_address_is_passed_over_by_admin_producer_consumer_and_cli(
        cluster: BrokerCluster, capsys: pytest.CaptureFixture[str]) -> None:
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("orders", partitions=3, replication_factor=3)
    cluster.kill(1)
    bootstrap = cluster.bootstrap  # broker 1, now dead, comes first
    assert bootstrap.startswith(cluster.address(1))

    with Admin(bootstrap) as admin:
        assert admin.list_topics() == ["orders"]
        assert admin.broker_states() == {1: "down", 2: "up", 3: "up"}
    # The partitions broker 1 led get new leaders; until then they are shown offline.
    wait_until(lambda: no_partition_offline(bootstrap, "orders"), 20, "leaders for every partition of orders")

    with Producer(bootstrap, acks="all") as producer:
        futures = [producer.send("orders", value=b"v%d" % i, key=b"k%d" % i) for i in range(30)]
        assert producer.flush(timeout=60) == 0
    assert all(f.result(timeout=0).offset >= 0 for f in futures)

    with Consumer(bootstrap, auto_offset_reset="earliest") as consumer:  # a fresh consumer, from scratch
        consumer.assign([TopicPartition("orders", p) for p in range(3)])
        consumer.seek_to_beginning()
        values: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(values) < 30 and time.monotonic() < deadline:
            values.extend(r.value or b"" for r in consumer.poll(timeout=1.0))
    assert sorted(values) == sorted(b"v%d" % i for i in range(30))

    code, out, err = lb(capsys, "topic", "describe", "orders", "--bootstrap", bootstrap)
    assert code == 0, err
    leaders = [line.split()[1] for line in out.splitlines()[2:5]]
    assert all(leader in ("2", "3") for leader in leaders), out
    code, out, err = lb(capsys, "consume", "orders", "--from-beginning", "--max-messages", "30",
                        "--bootstrap", bootstrap)
    assert code == 0, err
    assert sorted(out.split()) == sorted(f"v{i}" for i in range(30))


def test_a_partition_whose_only_replica_is_down_is_offline_and_refuses_writes_fast(
        cluster: BrokerCluster, capsys: pytest.CaptureFixture[str]) -> None:
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("single", partitions=1, replication_factor=1)
        holder = admin.describe_topics(["single"])[0].partitions[0].replicas[0]
    # The create is answered once the controller leader applied it; the others apply it a moment later.
    wait_until(lambda: all(cluster.describe(node, "single") is not None for node in cluster.live()), 20,
               "every broker to know topic single")
    cluster.kill(holder)
    holder_at = f"broker {holder} at {cluster.address(holder)}"

    code, out, err = lb(capsys, "topic", "describe", "single", "--bootstrap", cluster.bootstrap)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[2].split() == ["0", "offline", str(holder), "-", "-", "-", "-"]
    assert lines[3] == (f"partition 0 is offline: every broker holding a replica of it is down ({holder_at}); "
                        "nothing can be written to it or read from it until one is back: start it again")
    with Admin(cluster.bootstrap) as admin:
        described = admin.describe_topics(["single"])[0].partitions[0]
    assert described.offline and described.leader_id == -1 and described.isr == []

    started = time.monotonic()
    with Producer(cluster.bootstrap, acks="all") as producer:
        error = producer.send("single", value=b"nowhere to go").exception(timeout=60)
        elapsed = time.monotonic() - started
        assert producer.flush(timeout=10) == 1
    assert isinstance(error, PartitionOfflineError), f"{type(error).__name__}: {error}"
    assert str(error).startswith(f"single-0 is offline: its only replica is on broker {holder} "
                                 f"({cluster.address(holder)}), which is down")
    assert elapsed < FAIL_FAST_LIMIT_S, f"the produce failed only after {elapsed:.1f}s"

    asyncio.run(async_produce_fails_fast(cluster.bootstrap, holder))

    started = time.monotonic()
    code, out, err = lb(capsys, "produce", "single", "--bootstrap", cluster.bootstrap, stdin="a\n")
    assert code == 1 and "produced 0 record(s), 1 failed" in out
    assert "single-0 is offline" in err and time.monotonic() - started < FAIL_FAST_LIMIT_S

    code, out, err = lb(capsys, "cluster", "describe", "--bootstrap", cluster.bootstrap)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[2:5]]
    assert [row[:3] for row in rows] == [[str(n), cluster.address(n), "down" if n == holder else "up"]
                                         for n in sorted(cluster.brokers)]
    assert f"1 of 3 broker(s) down ({holder})" in out


async def async_produce_fails_fast(bootstrap: str, holder: int) -> None:
    started = time.monotonic()
    async with AsyncProducer(bootstrap) as producer:
        future = await producer.send("single", value=b"nowhere either")
        with pytest.raises(PartitionOfflineError, match=f"only replica is on broker {holder} "):
            await future
        assert time.monotonic() - started < FAIL_FAST_LIMIT_S
        assert await producer.flush() == 1


def test_a_paused_broker_is_shown_as_not_answering_not_as_down(cluster: BrokerCluster,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cluster.pause(3)  # SIGSTOP: its port accepts connections, but nothing answers
    try:
        code, out, err = lb(capsys, "cluster", "describe", "--bootstrap", cluster.bootstrap)
    finally:
        cluster.resume(3)
    assert code == 0, err
    statuses = {line.split()[0]: line.split(maxsplit=2)[2].removesuffix("*").strip()
                for line in out.splitlines()[2:5]}
    assert statuses == {"1": "up", "2": "up", "3": "no answer"}, out
    assert "1 broker(s) did not answer within 2 s (3)" in out and "down" not in out
