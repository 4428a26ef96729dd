"""What one costly client may do to a cluster of three real brokers: large produces, a flood of 1 MB batches,
slow and stalled HTTP/2 connections. None of it may cost a leader its leadership, grow a broker's memory
past what its configuration allows, or fail a well-behaved producer's request.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from logbroker_client import Admin, Producer
from logbroker_client import records as rec
from logbroker_client.connection import Connection
from logbroker_client.producer import RecordFuture
from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.server.config import DEFAULT_MAX_REQUEST_BYTES
from tests.support.cluster import BrokerCluster
from tests.support.rss import peak_rss, rss_mb
from tests.support.slowloris import slow_clients

BATCH_VALUE_BYTES = 1_000_000
# Peak during the load, and what stays once it is over. Brokers fix malloc's mmap threshold
# (logbroker/server/malloc_tuning.py): measured peaks 183-237 MiB, idle 71-72 MiB. With glibc's sliding
# threshold the peaks reached 311 MiB, and 150-245 MiB stayed resident after the load.
RSS_PEAK_LIMIT_MB = 280
RSS_IDLE_LIMIT_MB = 150
PRODUCE_TIMEOUT_S = 60.0
IDLE_SETTLE_S = 2.0
MEMORY_PARTITIONS = 16
REQUEST_BYTES = 1 << 20  # one 1 MB batch per request, as the issue describes the load
SLOW_CLIENTS = 150  # a third of them hold as many stalled streams as the broker lets one connection open
STALLED_STREAMS_PER_CLIENT = 200
SLOW_PHASE_S = 6.0
SEND_INTERVAL_S = 0.005
DAWDLE_INTERVAL_S = 0.5  # how often a slow-preface client sends its next byte


def create_topic(cluster: BrokerCluster, name: str, partitions: int) -> None:
    with Admin(cluster.bootstrap, request_timeout_ms=20_000) as admin:
        admin.create_topic(name, partitions=partitions, replication_factor=3)
    for partition in range(partitions):
        cluster.leader_of(name, partition)


def leader_and_term(cluster: BrokerCluster, topic: str, leader: int) -> tuple[int, int] | None:
    """(leader, term) of partition 0 as the given broker itself reports it."""
    return cluster.metadata_view(leader, topic, 0)


def one_mb_batch() -> bytes:
    return rec.build_batch([(int(time.time() * 1000), None, os.urandom(BATCH_VALUE_BYTES), [])])


def produce(connection: Connection, topic: str, records: bytes) -> pb.PartitionProduceResult:
    request = pb.ProduceRequest(acks=-1, timeout_ms=int(PRODUCE_TIMEOUT_S * 1000), partitions=[
        pb.PartitionRecords(topic=topic, partition=0, records=records)])
    return connection.broker.Produce(request, timeout=PRODUCE_TIMEOUT_S).results[0]


def test_64_mib_of_1_mb_batches_keeps_the_leader(cluster_at_default_ticks: BrokerCluster) -> None:
    cluster = cluster_at_default_ticks
    create_topic(cluster, "big", partitions=1)
    leader = cluster.leader_of("big", 0)
    before = leader_and_term(cluster, "big", leader)
    batch = one_mb_batch()
    connection = Connection(cluster.address(leader))
    try:
        # As one request, 64 MiB is over max_request_bytes: refused before the broker reads it.
        with pytest.raises(grpc.RpcError) as refused:
            produce(connection, "big", batch * ((64 << 20) // len(batch)))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The same 64 batches as four requests of the largest size allowed, all at once: all acknowledged.
        per_request = DEFAULT_MAX_REQUEST_BYTES // len(batch)
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: produce(connection, "big", batch * per_request), range(4)))
    finally:
        connection.close()
    assert [(r.error_code, r.error_message) for r in results] == [(pb.ErrorCode.NONE, "")] * 4
    assert len({r.base_offset for r in results}) == 4
    assert leader_and_term(cluster, "big", leader) == before, "the leader lost its leadership to the load"
    cluster.wait_caught_up("big", 0)


@pytest.mark.parametrize("batches", [40, pytest.param(130, marks=pytest.mark.slow)])
def test_memory_is_bounded_by_configuration_not_by_data(cluster: BrokerCluster, batches: int) -> None:
    """Each broker holds a replica of all 16 partitions, so it takes in 16 x `batches` MB; before the recent-entry
    cache was bounded in bytes, its RSS grew by about that much."""
    create_topic(cluster, "mem", partitions=MEMORY_PARTITIONS)
    value = os.urandom(BATCH_VALUE_BYTES)
    with peak_rss(cluster.pids().values()) as rss, Producer(cluster.bootstrap, acks="all", linger_ms=0,
                                                              max_request_bytes=REQUEST_BYTES) as producer:
        futures = [producer.send("mem", value=value, partition=i % MEMORY_PARTITIONS)
                   for i in range(MEMORY_PARTITIONS * batches)]
        producer.flush()
    failed = [f.exception() for f in futures if f.exception() is not None]
    assert not failed, f"{len(failed)} of {len(futures)} records failed, e.g. {failed[0]}"
    time.sleep(IDLE_SETTLE_S)  # the measurement the issue names: brokers idle after the load
    idle = {node: rss_mb(pid) for node, pid in cluster.pids().items()}
    peak = {node: rss.peak_mb[pid] for node, pid in cluster.pids().items()}
    print(f"broker RSS (MiB) peak {peak}, idle {idle}")
    assert max(peak.values()) < RSS_PEAK_LIMIT_MB, f"peak RSS {peak} MiB"
    assert max(idle.values()) < RSS_IDLE_LIMIT_MB, f"idle RSS {idle} MiB: freed request buffers stayed resident"


def test_slow_clients_do_not_fail_a_producer(cluster: BrokerCluster) -> None:
    create_topic(cluster, "steady", partitions=1)
    leader = cluster.leader_of("steady", 0)
    futures: list[RecordFuture] = []
    with Producer(cluster.bootstrap, acks="all", linger_ms=0) as producer:
        producer.send("steady", value=b"warm-up", partition=0).result(timeout=PRODUCE_TIMEOUT_S)
        with slow_clients(cluster.address(leader), SLOW_CLIENTS, STALLED_STREAMS_PER_CLIENT) as clients:
            deadline = time.monotonic() + SLOW_PHASE_S
            next_dawdle = 0.0
            while time.monotonic() < deadline:
                futures.append(producer.send("steady", value=b"v%d" % len(futures), partition=0))
                time.sleep(SEND_INTERVAL_S)
                if time.monotonic() >= next_dawdle:
                    next_dawdle = time.monotonic() + DAWDLE_INTERVAL_S
                    for client in clients:
                        client.dawdle()
            producer.flush()
    failed = [f.exception() for f in futures if f.exception() is not None]
    assert not failed, f"{len(failed)} of {len(futures)} records failed during the slow clients, e.g. {failed[0]}"
