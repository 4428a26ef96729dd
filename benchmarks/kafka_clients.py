"""Kafka port against gRPC on the same broker: confluent-kafka (librdkafka) producing and consuming
`--size`-byte records (100) through the Kafka listener, and logbroker's own gRPC client doing the same.

    python -m benchmarks.kafka_clients                                   # a temporary broker
    python -m benchmarks.kafka_clients --bootstrap H:P --kafka H:P       # an existing broker

Both producers use acks=all, idempotence, no compression and a 5 ms linger; each pass writes `--records`
records (200,000) to a fresh one-partition topic and then reads them all back from the start. Printed as
one JSON line: records/s and MB/s for each client and direction, and the Kafka/gRPC ratios.
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any

from benchmarks.common import TemporaryBroker, emit, ensure_topic, free_port, payloads, rounded, run_main


def _confluent_produce(kafka: str, topic: str, values: list[bytes], count: int) -> float:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": kafka, "enable.idempotence": True, "linger.ms": 5,
                         "batch.size": 1 << 20, "queue.buffering.max.messages": 1_000_000})
    failed: list[Any] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(err)

    started = time.perf_counter()
    for i in range(count):
        while True:
            try:
                producer.produce(topic, value=values[i % len(values)], on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.01)
    if producer.flush(120) or failed:
        raise RuntimeError(f"confluent-kafka: {len(failed)} records failed ({failed[:1]})")
    return time.perf_counter() - started


def _confluent_consume(kafka: str, topic: str, count: int) -> float:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": kafka, "group.id": f"bench-{uuid.uuid4()}",
                         "enable.auto.commit": False, "fetch.min.bytes": 1})
    consumer.assign([TopicPartition(topic, 0, 0)])
    got = 0
    started = time.perf_counter()
    deadline = started + 300
    while got < count and time.perf_counter() < deadline:
        for message in consumer.consume(10_000, 0.5):
            if message.error() is None:
                got += 1
    elapsed = time.perf_counter() - started
    consumer.close()
    if got < count:
        raise RuntimeError(f"confluent-kafka read {got} of {count} records")
    return elapsed


def _grpc_produce(bootstrap: str, topic: str, values: list[bytes], count: int) -> float:
    from logbroker_client import Producer

    started = time.perf_counter()
    with Producer(bootstrap, acks="all", linger_ms=5) as producer:
        for i in range(count):
            producer.send(topic, value=values[i % len(values)], partition=0)
        failed = producer.flush()
    if failed:
        raise RuntimeError(f"gRPC producer: {failed} records failed")
    return time.perf_counter() - started


def _grpc_consume(bootstrap: str, topic: str, count: int) -> float:
    from logbroker_client import Consumer, TopicPartition

    tp = TopicPartition(topic, 0)
    got = 0
    started = time.perf_counter()
    with Consumer(bootstrap) as consumer:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        deadline = started + 300
        while got < count and time.perf_counter() < deadline:
            got += len(consumer.poll(timeout=0.5))
    if got < count:
        raise RuntimeError(f"gRPC consumer read {got} of {count} records")
    return time.perf_counter() - started


def _rates(count: int, size: int, seconds: float) -> dict[str, float]:
    return {"records_per_s": rounded(count / seconds, 0), "mb_per_s": rounded(count * size / seconds / 1e6, 2),
            "seconds": rounded(seconds, 2)}


def run(bootstrap: str, kafka: str, count: int, size: int) -> dict[str, Any]:
    values = payloads(size)
    result: dict[str, Any] = {"benchmark": "kafka_clients", "records": count, "record_bytes": size}
    for name, produce, consume, address in (
            ("kafka_confluent", _confluent_produce, _confluent_consume, kafka),
            ("grpc_logbroker_client", _grpc_produce, _grpc_consume, bootstrap)):
        topic = f"bench-{name}-{uuid.uuid4().hex[:8]}"
        ensure_topic(bootstrap, topic, 1, None)
        result[name] = {"produce": _rates(count, size, produce(address, topic, values, count)),  # type: ignore[operator]
                        "consume": _rates(count, size, consume(address, topic, count))}  # type: ignore[operator]
    for direction in ("produce", "consume"):
        result[f"{direction}_kafka_over_grpc"] = rounded(
            result["kafka_confluent"][direction]["records_per_s"] /
            result["grpc_logbroker_client"][direction]["records_per_s"], 2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", default=None, help="the broker's gRPC HOST:PORT (default: start one)")
    parser.add_argument("--kafka", default=None, help="the same broker's Kafka HOST:PORT")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=100)
    args = parser.parse_args()
    if args.bootstrap:
        if not args.kafka:
            parser.error("--kafka is needed with --bootstrap")
        emit(run(args.bootstrap, args.kafka, args.records, args.size))
        return 0
    kafka = f"127.0.0.1:{free_port()}"
    broker = TemporaryBroker(["--kafka-listen", kafka]).start()
    try:
        emit(run(broker.address, kafka, args.records, args.size))
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    run_main(main)
