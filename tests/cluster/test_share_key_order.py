"""Key-ordered share groups over three real brokers: a key's records one at a time, in log order."""

from __future__ import annotations

from pathlib import Path

from logbroker_client import Producer
from logbroker_client.proto import logbroker_pb2 as pb

from tests.cluster.test_share_groups import (  # noqa: F401  (jobs: the fixture these tests use)
    TOPIC,
    admin_call,
    configure_group,
    events_of,
    jobs,
    settings,
    stop_all,
    wait_settled,
)
from tests.support.brokers import wait_until
from tests.support.checker import AckLog, make_value
from tests.support.cluster import BrokerCluster
from tests.support.share_checker import assert_clean, produced_by_offset
from tests.support.share_worker import ShareWorker

KEYS = 12
RECORDS_PER_KEY = 15


def test_workers_of_a_key_ordered_group_never_hold_two_records_of_a_key(jobs: BrokerCluster,  # noqa: F811
                                                                        tmp_path: Path) -> None:
    group = "keyed"
    rules = configure_group(jobs, group)
    answer = admin_call(jobs, "AlterGroupConfigs",
                        pb.AlterGroupConfigsRequest(group_id=group, configs={"share.ordering": "key"}))
    assert not answer.error_code, answer.error_message
    wait_until(lambda: all(admin_call(jobs, "DescribeGroupConfigs", pb.DescribeGroupConfigsRequest(group_id=group),
                                      node).configs.get("share.ordering") == "key" for node in jobs.live()),
               20, "every broker to know the group is key-ordered", interval_s=0.1)
    acks = AckLog()
    key_of: dict[bytes, bytes] = {}
    with Producer(jobs.bootstrap, acks="all", linger_ms=5) as producer:
        for i in range(KEYS * RECORDS_PER_KEY):
            value, key = make_value(i, 32, b""), f"key-{i % KEYS}".encode()
            key_of[value] = key
            producer.send(TOPIC, value=value, key=key, partition=0).add_done_callback(acks.callback(value))
        producer.flush(timeout=30)
    workers = [ShareWorker(settings(jobs, tmp_path, group, f"w{i}", work_ms=5, max_records=4)).start()
               for i in range(3)]
    try:
        wait_settled(jobs, tmp_path, rules, acks)
    finally:
        stop_all(workers)
    events = events_of(tmp_path, group)
    assert_clean(events, produced_by_offset(acks.snapshot()), [], rules)
    offset_key = {offset: key_of[value] for value, (_, offset) in acks.snapshot().items()}
    assert_one_at_a_time_per_key(events, offset_key)
    holders = {e["member"] for e in events if e["event"] == "acquired"}
    assert len(holders) > 1, "one worker took everything: the test did not show keys running in parallel"


def assert_one_at_a_time_per_key(events: list[dict], offset_key: dict[int, bytes]) -> None:  # type: ignore[type-arg]
    """A key's next record reached a worker only after the acceptance of the one before it was sent."""
    first_acquired: dict[int, int] = {}
    accept_sent: dict[int, int] = {}
    for event in events:
        if event["event"] == "acquired":
            first_acquired.setdefault(event["offset"], event["received_ms"])
        elif event["event"] == "accepted":
            for offset in range(event["first_offset"], event["last_offset"] + 1):
                accept_sent[offset] = event["sent_ms"]
    by_key: dict[bytes, list[int]] = {}
    for offset in sorted(offset_key):
        by_key.setdefault(offset_key[offset], []).append(offset)
    for key, offsets in by_key.items():
        for earlier, later in zip(offsets, offsets[1:], strict=False):
            assert first_acquired[later] >= accept_sent[earlier], (
                f"key {key!r}: offset {later} reached a worker at {first_acquired[later]} ms, before the acceptance "
                f"of offset {earlier} was sent at {accept_sent[earlier]} ms")
