"""The share consumer's core (share_state.py), the priority lanes (lanes.py) and the producer's delivery-time and
lane helpers, fed with hand-made answers: no broker, no clock, no threads."""

from __future__ import annotations

from collections import Counter

import pytest
from logbroker_client import records as rec
from logbroker_client.errors import InvalidRecordStateError, LogbrokerError
from logbroker_client.lanes import LaneScheduler, lane_topic, lane_topics
from logbroker_client.producer import DELIVER_AT_HEADER, delivery_headers, priority_lane
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.share_state import (
    ACCEPT,
    CLOSE_RELEASE_DELAY_MS,
    QUICK_LOOK_MS,
    Ack,
    SharePlan,
    ShareRecord,
    ShareSession,
    ack_ranges,
    weighted_shares,
)
from logbroker_client.types import TopicPartition

T0, T1 = TopicPartition("jobs", 0), TopicPartition("jobs", 1)
NOW_MS = 1_000_000
LOCK_MS = 30_000


def session(max_in_flight: int = 10, partitions: int = 1) -> ShareSession:
    state = ShareSession("workers", "member-1", max_in_flight)
    state.subscribe([("jobs", 0)])
    state.set_partition_count("jobs", partitions)
    return state


def batch(base_offset: int, count: int) -> bytes:
    return rec.build_batch([(1_000, None, b"v%d" % (base_offset + i), []) for i in range(count)],
                           base_offset=base_offset)


def acquired(first: int, last: int, count: int = 1, deadline_ms: int = NOW_MS + LOCK_MS) -> pb.AcquiredRange:
    return pb.AcquiredRange(first_offset=first, last_offset=last, delivery_count=count, lock_deadline_ms=deadline_ms)


def answer(tp: TopicPartition = T0, records: bytes = b"", ranges: tuple[pb.AcquiredRange, ...] = (),
           results: tuple[pb.AckResult, ...] = (), error: int = pb.ErrorCode.NONE) -> pb.SharePartitionData:
    return pb.SharePartitionData(topic=tp.topic, partition=tp.partition, records=records, acquired=list(ranges),
                                 ack_results=list(results), error_code=error, error_message="told so" if error else "")


def fetch(state: ShareSession, *answers: pb.SharePartitionData, now_ms: int = NOW_MS) -> SharePlan:
    """Plan the next requests (every partition led by broker-1) and answer the one to broker-1."""
    plans = state.plan_fetches({tp: "broker-1" for tp in state.partitions})
    plan = plans[0]
    state.absorb(plan, answers, now_ms)
    return plan


def held_records(state: ShareSession, first: int, count: int) -> list[ShareRecord]:
    fetch(state, answer(records=batch(first, count), ranges=(acquired(first, first + count - 1),)))
    return state.take()


def sent_ranges(plan: SharePlan, tp: TopicPartition = T0) -> list[tuple[int, int, str]]:
    return [(r.first_offset, r.last_offset, pb.AckType.Name(r.type)) for r in ack_ranges(plan.acks.get(tp, {}))]


# --------------------------------------------------------------------------- records and acquired ranges


def test_only_records_inside_the_acquired_ranges_are_handed_out_and_control_batches_are_skipped() -> None:
    state = session()
    data = batch(0, 5) + rec.build_control_batch(5, 1, 1_000) + batch(6, 3)
    fetch(state, answer(records=data, ranges=(acquired(1, 2), acquired(7, 7, count=3))))
    records = state.take()
    assert [(r.offset, r.value, r.delivery_count) for r in records] == [(1, b"v1", 1), (2, b"v2", 1), (7, b"v7", 3)]
    assert all(r.lock_deadline_ms == NOW_MS + LOCK_MS for r in records)
    assert state.unfinished() == 3


def test_an_acquired_record_missing_from_the_batches_is_released_at_once() -> None:
    state = session()
    fetch(state, answer(records=batch(0, 2), ranges=(acquired(0, 3),)))
    assert [r.offset for r in state.take()] == [0, 1]
    plan = state.plan_fetches({T0: "broker-1"})[0]
    assert sent_ranges(plan) == [(2, 3, "RELEASE")]
    assert plan.acks[T0][2].delay_ms == CLOSE_RELEASE_DELAY_MS


def test_poll_hands_out_at_most_max_records_and_keeps_the_rest_buffered() -> None:
    state = session()
    fetch(state, answer(records=batch(0, 5), ranges=(acquired(0, 4),)))
    assert [r.offset for r in state.take(2)] == [0, 1]
    assert [r.offset for r in state.take()] == [2, 3, 4]


# ---------------------------------------------------------------------------------- acknowledgements


def test_acks_travel_with_the_next_fetch_coalesced_into_ranges_of_one_kind() -> None:
    state = session()
    records = held_records(state, 0, 6)
    for record in records[:3]:
        record.ack()
    records[3].release(500)
    records[4].reject("bad")
    records[5].renew()
    plan = state.plan_fetches({T0: "broker-1"})[0]
    assert sent_ranges(plan) == [(0, 2, "ACCEPT"), (3, 3, "RELEASE"), (4, 4, "REJECT"), (5, 5, "RENEW")]
    request = plan.fetch_request("workers", "member-1", 500, "c-1")
    ranges = request.partitions[0].acks
    assert (ranges[1].delay_ms, ranges[2].reason) == (500, "bad")
    assert state.unfinished() == 1  # the renewed record is still held


def test_releases_with_different_delays_are_separate_ranges() -> None:
    acks = {1: Ack(pb.RELEASE, 100), 2: Ack(pb.RELEASE, 100), 3: Ack(pb.RELEASE, 200), 5: ACCEPT}
    assert [(r.first_offset, r.last_offset, r.delay_ms) for r in ack_ranges(acks)] == [(1, 2, 100), (3, 3, 200),
                                                                                         (5, 5, 0)]


def test_a_second_ack_of_a_record_is_refused_at_once() -> None:
    state = session()
    record, = held_records(state, 0, 1)
    record.ack()
    with pytest.raises(InvalidRecordStateError, match="already finished with it"):
        record.release()


def test_a_record_of_another_consumer_cannot_be_acknowledged_here() -> None:
    mine, theirs = session(), session()
    held_records(mine, 0, 1)
    record, = held_records(theirs, 0, 1)
    with pytest.raises(InvalidRecordStateError, match="another consumer"):
        mine.acknowledge(record, ACCEPT)


def test_a_record_whose_lock_expired_is_dropped_and_acking_it_says_why() -> None:
    state = session()
    record, = held_records(state, 0, 1)
    assert state.expire_locks(NOW_MS + LOCK_MS - 1) == 0
    assert state.expire_locks(NOW_MS + LOCK_MS) == 1
    assert state.unfinished() == 0
    with pytest.raises(InvalidRecordStateError, match="lock expired.*another consumer"):
        record.ack()


def test_a_renewed_lock_moves_its_deadline_and_survives_the_old_one() -> None:
    state = session()
    record, = held_records(state, 0, 1)
    record.renew()
    later_ms = NOW_MS + 10_000
    fetch(state, answer(results=(pb.AckResult(first_offset=0, last_offset=0),)), now_ms=later_ms)
    assert record.lock_deadline_ms == later_ms + LOCK_MS
    assert state.expire_locks(NOW_MS + LOCK_MS) == 0
    record.ack()


def test_refused_acks_are_kept_as_failures_and_a_refused_renew_drops_the_record() -> None:
    state = session()
    first, second = held_records(state, 0, 2)
    first.ack()
    second.renew()
    refused = pb.ErrorCode.INVALID_RECORD_STATE
    fetch(state, answer(results=(pb.AckResult(first_offset=0, last_offset=0, error_code=refused, error_message="no"),
                                 pb.AckResult(first_offset=1, last_offset=1, error_code=refused, error_message="no"))))
    failures = state.take_failures()
    assert [(f.first_offset, f.kind, type(f.error)) for f in failures] == [(0, "ack", InvalidRecordStateError),
                                                                          (1, "renew", InvalidRecordStateError)]
    assert state.unfinished() == 0 and state.take_failures() == []


def test_acks_of_a_request_that_failed_go_with_the_next_one() -> None:
    state = session()
    for record in held_records(state, 0, 3):
        record.ack()
    plan = state.plan_fetches({T0: "broker-1"})[0]
    state.failed(plan)
    assert sent_ranges(state.plan_fetches({T0: "broker-2"})[0]) == [(0, 2, "ACCEPT")]


def test_a_moved_leader_asks_for_a_metadata_refresh_and_keeps_the_acks() -> None:
    state = session()
    held_records(state, 0, 1)[0].ack()
    plan = state.plan_fetches({T0: "broker-1"})[0]
    outcome = state.absorb(plan, [answer(error=pb.ErrorCode.NOT_LEADER)], NOW_MS)
    assert outcome.find_leader == {"jobs"} and outcome.errors == []
    assert state.with_pending_acks() == [T0]


def test_an_error_waiting_does_not_cure_is_raised_by_poll() -> None:
    state = session()
    plan = state.plan_fetches({T0: "broker-1"})[0]
    outcome = state.absorb(plan, [answer(error=pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION)], NOW_MS)
    assert [type(e).__name__ for e in outcome.errors] == ["UnknownTopicOrPartitionError"]


# ------------------------------------------------------------------------------------- max_in_flight


def test_fetches_never_ask_for_more_than_max_in_flight_leaves() -> None:
    state = session(max_in_flight=5)
    assert state.plan_fetches({T0: "broker-1"})[0].max_records == 5
    state.absorb(state.in_flight[0], [answer(records=batch(0, 3), ranges=(acquired(0, 2),))], NOW_MS)
    records = state.take()
    assert state.plan_fetches({T0: "broker-1"})[0].max_records == 2
    state.failed(state.in_flight[0])
    records[0].ack()  # the ack travels with the fetch, so its record's room is free in that same request
    assert state.plan_fetches({T0: "broker-1"})[0].max_records == 3


def test_with_no_room_left_acks_go_alone_and_nothing_is_fetched() -> None:
    state = session(max_in_flight=2)
    first, _ = held_records(state, 0, 2)
    assert state.plan_fetches({T0: "broker-1"}) == []
    first.renew()
    plan, = state.plan_fetches({T0: "broker-1"})
    assert not plan.is_fetch and sent_ranges(plan) == [(0, 0, "RENEW")]


def test_one_fetch_per_leader_and_a_leader_that_found_nothing_gets_one_record_of_room() -> None:
    state = session(max_in_flight=10, partitions=2)
    leaders = {T0: "broker-1", T1: "broker-2"}
    plans = {plan.address: plan for plan in state.plan_fetches(leaders)}
    assert {a: p.max_records for a, p in plans.items()} == {"broker-1": 5, "broker-2": 5}
    state.absorb(plans["broker-1"], [answer(records=batch(0, 2), ranges=(acquired(0, 1),))], NOW_MS)
    state.absorb(plans["broker-2"], [answer(tp=T1)], NOW_MS)
    plans = {plan.address: plan for plan in state.plan_fetches(leaders, now_ms=1_000)}
    assert {a: p.max_records for a, p in plans.items()} == {"broker-1": 7, "broker-2": 1}
    waits = {a: p.fetch_request("g", "m", 500, "c").max_wait_ms for a, p in plans.items()}
    assert waits == {"broker-1": 500, "broker-2": 0}  # only a look where nothing was, while broker-1 has records
    state.absorb(plans["broker-2"], [answer(tp=T1)], NOW_MS)
    assert state.plan_fetches(leaders, now_ms=1_000 + QUICK_LOOK_MS - 1) == []  # not again so soon
    plan, = state.plan_fetches(leaders, now_ms=1_000 + QUICK_LOOK_MS)
    assert plan.address == "broker-2" and plan.quick


def test_with_less_room_than_leaders_the_leaders_take_turns() -> None:
    state = session(max_in_flight=1, partitions=2)
    leaders = {T0: "broker-1", T1: "broker-2"}
    asked = []
    for _ in range(4):
        plan, = state.plan_fetches(leaders)
        asked.append(plan.address)
        state.absorb(plan, [answer(tp=plan.partitions[0])], NOW_MS)  # nothing there
    assert asked == ["broker-1", "broker-2", "broker-1", "broker-2"]


def test_weighted_shares_add_up_to_the_room() -> None:
    assert weighted_shares(10, {"a": 4, "b": 2, "c": 1}) == {"a": 6, "b": 3, "c": 1}
    assert weighted_shares(0, {"a": 1}) == {}


# --------------------------------------------------------------------------------------------- closing


def test_closing_releases_every_held_record_at_once_buffered_ones_too() -> None:
    state = session()
    fetch(state, answer(records=batch(0, 4), ranges=(acquired(0, 3),)))
    first, second = state.take(2)
    first.ack()
    assert state.release_everything() == 3
    plan, = state.plan_acks({T0: "broker-1"})
    assert sent_ranges(plan) == [(0, 0, "ACCEPT"), (1, 3, "RELEASE")]
    assert plan.acks[T0][1].delay_ms == CLOSE_RELEASE_DELAY_MS
    with pytest.raises(LogbrokerError, match="closed"):
        second.ack()


def test_release_delays_are_checked() -> None:
    state = session()
    record, = held_records(state, 0, 1)
    with pytest.raises(ValueError, match="release delay must be 0"):
        record.release(-1)
    with pytest.raises(ValueError, match="7 days"):
        record.release(8 * 24 * 3_600_000)
    record.release(0)


# ------------------------------------------------------------------------------------------------ lanes


def test_lanes_are_the_topic_and_its_p_topics_most_urgent_first() -> None:
    assert lane_topics("jobs", 3) == [("jobs.p2", 2), ("jobs.p1", 1), ("jobs", 0)]
    assert lane_topic("jobs", 0) == "jobs" and priority_lane("jobs", None) == "jobs"
    assert priority_lane("jobs", 4) == "jobs.p4"
    with pytest.raises(ValueError, match="from 0 .* to 9"):
        priority_lane("jobs", 10)
    with pytest.raises(ValueError, match="priorities must be"):
        lane_topics("jobs", 0)


def test_each_lane_leads_its_weight_of_the_fetches_and_no_lane_is_starved() -> None:
    scheduler = LaneScheduler()
    assert scheduler.order([0, 1, 2]) == scheduler.order([0, 1, 2])  # looking does not move it on
    leads = []
    for _ in range(70):
        leads.append(scheduler.order([0, 1, 2])[0])
        assert scheduler.advance([0, 1, 2]) == leads[-1]
    assert Counter(leads) == {2: 40, 1: 20, 0: 10}
    assert leads[:7] == [2, 1, 2, 0, 2, 1, 2]  # spread out; the least urgent leads once every 2**3 - 1
    assert scheduler.order([0, 1, 2])[1:] in ([1, 0], [2, 0], [2, 1])  # the others, most urgent first


def test_the_fetch_order_moves_on_only_when_a_fetch_is_made() -> None:
    state = ShareSession("workers", "member-1", 10)
    state.subscribe([("jobs.p1", 1), ("jobs", 0)])
    state.set_partition_count("jobs.p1", 2)
    state.set_partition_count("jobs", 1)
    leaders = {tp: "broker-1" for tp in state.partitions}
    orders = []
    for _ in range(3):
        plan, = state.plan_fetches(leaders)
        orders.append(plan.partitions)
        state.absorb(plan, [], NOW_MS)
        assert state.fetch_order() == state.fetch_order()
    assert [order[0].topic for order in orders] == ["jobs.p1", "jobs", "jobs.p1"]
    assert orders[0][0] != orders[2][0]  # jobs.p1's two partitions take turns at the front


# ------------------------------------------------------------------------------------ delivery times


def test_a_delay_becomes_the_delivery_time_header() -> None:
    headers = delivery_headers([("trace", b"x")], None, 1_000)
    assert headers is not None and headers[0] == ("trace", b"x")
    key, value = headers[1]
    assert key == DELIVER_AT_HEADER and value is not None and int(value) > 1_000
    assert delivery_headers(None, 1_700_000_000_000, None) == [(DELIVER_AT_HEADER, b"1700000000000")]
    assert delivery_headers(None, None, None) is None


@pytest.mark.parametrize(("deliver_at_ms", "delay_ms", "message"), [
    (None, -1, "delay_ms must not be negative"),
    (-5, None, "deliver_at_ms must not be negative"),
    (1, 1, "not both"),
])
def test_bad_delivery_times_are_refused(deliver_at_ms: int | None, delay_ms: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        delivery_headers(None, deliver_at_ms, delay_ms)
