"""Run by tests/kafka/test_kafka_python_2.py in a subprocess whose path holds kafka-python 2.0.2 (it cannot be
imported beside the 3.x the venv has): produce, then consume in a consumer group with committed offsets, as an
application written for that release does. Prints one JSON line: what was sent, received and committed.

    python -m tests.kafka.legacy_kafka_python BOOTSTRAP TOPIC GROUP COUNT
"""

from __future__ import annotations

import json
import sys
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # kafka-python 2.0.2 (checked below)
from kafka import __version__ as kafka_python_version

POLL_DEADLINE_S = 30.0


def main(bootstrap: str, topic: str, group: str, count: int) -> dict[str, object]:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, retries=5)
    futures = [producer.send(topic, key=b"k%d" % (i % 5), value=b"v%d" % i) for i in range(count)]
    producer.flush(30)
    sent = sorted((m.partition, m.offset) for m in (f.get(timeout=10) for f in futures))
    producer.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
                             enable_auto_commit=False)
    received: dict[tuple[int, int], str] = {}
    deadline = time.monotonic() + POLL_DEADLINE_S
    while len(received) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            for message in batch:
                received[(message.partition, message.offset)] = message.value.decode()
    consumer.commit()
    partitions = consumer.partitions_for_topic(topic) or set()
    committed = {p: consumer.committed(TopicPartition(topic, p)) for p in sorted(partitions)}
    consumer.close()
    return {"version": kafka_python_version, "sent": sent, "received": sorted(received),
            "values": sorted(received.values()), "committed": committed}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))))
