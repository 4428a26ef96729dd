"""A share-partition's record states, step by step, and a model check of its promises."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logbroker.groups import delay_index
from logbroker.groups.share import (
    ACKED,
    ACQUIRED,
    AVAILABLE,
    DEAD_LETTER_PENDING,
    InvalidRecordState,
    InvalidShareConfig,
    ShareConfig,
    SharePartition,
    share_config_from,
)

CONFIG = ShareConfig(lock_ms=1_000, delivery_limit=3, backoff="fixed", backoff_ms=100)
T0 = 1_000_000


def new_partition(records: int = 10) -> tuple[SharePartition, list[tuple[int, int, bool]]]:
    return SharePartition("g", 0, 0), [(0, records - 1, True)]


def offsets(acquired: list) -> list[int]:  # type: ignore[type-arg]
    return [o for a in acquired for o in range(a.first_offset, a.last_offset + 1)]


def test_records_go_to_one_member_at_a_time_in_log_order() -> None:
    share, log = new_partition()
    a, _ = share.acquire("A", T0, log, 4, CONFIG)
    b, _ = share.acquire("B", T0, [(4, 9, True)], 100, CONFIG)
    assert offsets(a) == [0, 1, 2, 3] and offsets(b) == [4, 5, 6, 7, 8, 9]
    assert share.acquire("C", T0, [], 100, CONFIG)[0] == []


def test_acknowledged_records_are_never_delivered_again_and_the_start_moves() -> None:
    share, log = new_partition(4)
    share.acquire("A", T0, log, 4, CONFIG)
    share.acknowledge("A", 0, 3, "accept", T0, CONFIG)
    assert share.start == 4 and not share.records
    assert share.acquire("A", T0 + 10_000, [], 10, CONFIG)[0] == []


def test_a_released_record_comes_back_after_its_delay_with_its_count_raised() -> None:
    share, log = new_partition(1)
    share.acquire("A", T0, log, 1, CONFIG)
    share.acknowledge("A", 0, 0, "release", T0, CONFIG, delay_ms=500)
    assert share.acquire("B", T0 + 499, [], 1, CONFIG)[0] == []
    again, _ = share.acquire("B", T0 + 500, [], 1, CONFIG)
    assert offsets(again) == [0] and again[0].delivery_count == 2


def test_an_expired_lock_gives_the_record_back_after_the_backoff() -> None:
    share, log = new_partition(1)
    share.acquire("A", T0, log, 1, CONFIG)
    assert share.expire(T0 + 999, CONFIG) is None
    assert share.expire(T0 + 1_000, CONFIG) is not None
    assert share.records[0].state == AVAILABLE
    assert offsets(share.acquire("B", T0 + 1_100, [], 1, CONFIG)[0]) == [0]


def test_acks_for_records_not_held_are_refused_and_change_nothing() -> None:
    share, log = new_partition(4)
    share.acquire("A", T0, log, 4, CONFIG)
    with pytest.raises(InvalidRecordState, match="not held by member B"):
        share.acknowledge("B", 0, 0, "accept", T0, CONFIG)
    with pytest.raises(InvalidRecordState, match="lock on offset 0 expired"):
        share.acknowledge("A", 0, 0, "accept", T0 + 1_000, CONFIG)
    with pytest.raises(InvalidRecordState, match="offset 4 is not held"):
        share.acknowledge("A", 3, 4, "accept", T0, CONFIG)
    assert share.records[3].state == ACQUIRED  # the range 3..4 was refused whole
    with pytest.raises(InvalidRecordState, match="delay"):
        share.acknowledge("A", 0, 0, "release", T0, CONFIG, delay_ms=-1)
    share.expire(T0 + 1_000, CONFIG)  # even once the lock was taken back, a late ack is told why
    with pytest.raises(InvalidRecordState, match="lock on offset 0 expired"):
        share.acknowledge("A", 0, 0, "accept", T0 + 1_001, CONFIG)


def test_the_delivery_limit_and_a_reject_send_records_to_the_dead_letters_once() -> None:
    share, log = new_partition(2)
    share.acquire("A", T0, log, 2, CONFIG)
    share.acknowledge("A", 1, 1, "reject", T0, CONFIG, reason="bad json")
    now = T0
    for _ in range(CONFIG.delivery_limit - 1):
        share.acknowledge("A", 0, 0, "release", now, CONFIG)
        now += CONFIG.backoff_ms
        assert offsets(share.acquire("A", now, [], 1, CONFIG)[0]) == [0]
    share.acknowledge("A", 0, 0, "release", now, CONFIG)
    pending = share.pending_dead_letters()  # in the order they were given up: the order copies are written
    assert [(o, r.state, r.dlq_seq) for o, r in pending] == [(1, DEAD_LETTER_PENDING, 0),
                                                               (0, DEAD_LETTER_PENDING, 1)]
    assert pending[0][1].reason == "bad json" and "delivery limit 3" in pending[1][1].reason
    share.dead_lettered_delta([0, 1])
    assert share.pending_dead_letters() == [] and share.dead_lettered == 2 and share.start == 2


def test_renew_extends_the_lock() -> None:
    share, log = new_partition(1)
    share.acquire("A", T0, log, 1, CONFIG)
    share.acknowledge("A", 0, 0, "renew", T0 + 900, CONFIG)
    assert share.expire(T0 + 1_500, CONFIG) is None
    share.acknowledge("A", 0, 0, "accept", T0 + 1_800, CONFIG)


def test_control_batches_are_skipped_and_the_window_is_bounded() -> None:
    share = SharePartition("g", 0, 0)
    got, _ = share.acquire("A", T0, [(0, 0, False), (1, 3, True), (4, 4, False)], 10, CONFIG)
    assert offsets(got) == [1, 2, 3] and share.cursor == 5


def test_replaying_the_deltas_gives_the_same_state_and_so_does_a_snapshot() -> None:
    leader, log = new_partition(6)
    deltas = [leader.acquire("A", T0, log, 3, CONFIG)[1], leader.acquire("B", T0, [(3, 5, True)], 3, CONFIG)[1],
              leader.acknowledge("A", 0, 1, "accept", T0, CONFIG),
              leader.acknowledge("B", 4, 4, "release", T0, CONFIG)]
    follower = SharePartition("g", 0, 0)
    for delta in deltas:
        follower.replay(delta)
    restored = SharePartition("g", 0, 0)
    restored.replay(leader.snapshot())
    for other in (follower, restored):
        assert (other.start, other.cursor, other.records) == (leader.start, leader.cursor, leader.records)


def test_group_configs_are_checked() -> None:
    assert share_config_from({"share.delivery.count.limit": "7"}).delivery_limit == 7
    with pytest.raises(InvalidShareConfig, match="unknown group config"):
        share_config_from({"share.nope": "1"})
    with pytest.raises(InvalidShareConfig, match="between"):
        share_config_from({"share.record.lock.duration.ms": "5"})
    with pytest.raises(InvalidShareConfig, match="one of"):
        share_config_from({"share.retry.backoff": "linear"})


def test_exponential_backoff_doubles_up_to_its_cap() -> None:
    config = ShareConfig(backoff="exponential", backoff_ms=100, backoff_max_ms=350)
    assert [config.backoff_after(n) for n in (1, 2, 3, 4)] == [100, 200, 350, 350]


ACTIONS = st.lists(st.tuples(st.sampled_from(["fetch", "accept", "release", "reject", "renew", "time"]),
                             st.integers(min_value=0, max_value=2), st.integers(min_value=0, max_value=7)),
                   max_size=120)


@settings(max_examples=200, deadline=None)
@given(actions=ACTIONS)
def test_every_record_is_held_by_at_most_one_member_and_none_is_lost(actions: list[tuple[str, int, int]]) -> None:
    """Whatever members do, a record is acquired by at most one member at a time, never redelivered once
    accepted, delivered at most delivery_limit times, and in the end accepted, dead-lettered or available."""
    share = SharePartition("g", 0, 0)
    log_end = 8
    now = T0
    held: dict[int, str] = {}
    accepted: set[int] = set()
    for action, member_index, offset in actions:
        member = f"m{member_index}"
        if action == "time":
            now += 600
            share.expire(now, CONFIG)
            held = {o: m for o, m in held.items() if share.records.get(o) is not None
                    and share.records[o].state == ACQUIRED and share.records[o].member == m}
            continue
        if action == "fetch":
            new = [(share.cursor, log_end - 1, True)] if share.cursor < log_end else []
            got, _ = share.acquire(member, now, new, 3, CONFIG)
            for o in offsets(got):
                assert o not in held, f"offset {o} acquired by {member} while {held[o]} holds it"
                assert o not in accepted, f"offset {o} delivered again after it was accepted"
                assert share.records[o].count <= CONFIG.delivery_limit
                held[o] = member
            continue
        try:
            share.acknowledge(member, offset, offset, action, now, CONFIG)
        except InvalidRecordState:
            assert held.get(offset) != member or share.records[offset].deadline_ms <= now
            continue
        assert held.get(offset) == member
        if action != "renew":
            del held[offset]
        if action == "accept":
            accepted.add(offset)
    for offset in range(log_end):
        record = share.records.get(offset)
        if offset < share.start:
            continue
        assert record is None or record.state in (AVAILABLE, ACQUIRED, ACKED, DEAD_LETTER_PENDING)


def scan_of(deliver_at: dict[int, int]) -> Callable[[int, int], list[tuple[int, int]]]:
    """The log's side of the delay index: delivery times of records first..last, as the runtime reads them."""
    return lambda first, last: [(o, due) for o, due in sorted(deliver_at.items()) if first <= o <= last]


def test_a_delayed_record_waits_in_the_delay_index_while_the_window_moves_on() -> None:
    share, log = new_partition(4)
    got, delta = share.acquire("A", T0, log, 10, CONFIG, deliver_at={1: T0 + 5_000})
    assert offsets(got) == [0, 2, 3] and delta["park"] == [[1, 1, T0, 1]]
    share.acknowledge("A", 0, 0, "accept", T0, CONFIG)
    share.acknowledge("A", 2, 3, "accept", T0, CONFIG)
    assert share.start == 4  # the parked record does not hold the window back
    assert share.acquire("B", T0 + 4_999, [], 10, CONFIG)[0] == []
    due, delta = share.acquire("B", T0 + 5_000, [], 10, CONFIG)
    assert offsets(due) == [1] and delta["unpark"] == [1] and delta["dw"] == [T0 + 5_000, 1]
    share.acknowledge("B", 1, 1, "release", T0 + 5_000, CONFIG)  # back below start, after the backoff
    again, _ = share.acquire("C", T0 + 5_100, [], 10, CONFIG)
    assert offsets(again) == [1] and again[0].delivery_count == 2
    share.acknowledge("C", 1, 1, "accept", T0 + 5_100, CONFIG)
    assert not share.records and share.delays.parked_count() == 0 and not share.delays.spans


def test_the_delay_index_survives_replay_and_snapshots_reading_due_times_back_from_the_log() -> None:
    leader, log = new_partition(3)
    deliver_at = {0: T0 + 100, 2: T0 + 200}
    deltas = [leader.acquire("A", T0, log, 10, CONFIG, deliver_at=deliver_at)[1]]
    follower = SharePartition("g", 0, 0)
    for delta in deltas:
        follower.replay(delta)
    restored = SharePartition("g", 0, 0)
    restored.replay(leader.snapshot())
    for other in (follower, restored):
        assert other.delays.parked_count() == leader.delays.parked_count() == 2
        assert other.acquire("B", T0 + 99, [], 10, CONFIG, scan=scan_of(deliver_at))[0] == []
        got, delta = other.acquire("B", T0 + 200, [], 10, CONFIG, scan=scan_of(deliver_at))
        assert offsets(got) == [0, 2] and delta["unpark"] == [0, 2]


def test_a_record_due_when_read_is_never_taken_for_a_parked_one() -> None:
    share, log = new_partition(3)
    deliver_at = {0: T0 - 50, 1: T0 + 100, 2: T0 + 10}  # 0 is due already when read: delivered at once
    got, _ = share.acquire("A", T0, log, 10, CONFIG, deliver_at=deliver_at)
    assert offsets(got) == [0]
    follower = SharePartition("g", 0, 0)
    follower.replay(share.snapshot())
    got, _ = follower.acquire("B", T0 + 1_000, [], 10, CONFIG, scan=scan_of(deliver_at))
    assert offsets(got) == [1, 2]  # 0 is not among them


def test_parked_records_beyond_the_cache_bound_stay_in_the_log_until_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delay_index, "MAX_CACHED_DELAYED", 100)
    share = SharePartition("g", 0, 0)
    deliver_at = {o: T0 + 10_000 - o for o in range(1_000)}  # later offsets are due first
    for first in range(0, 1_000, 250):
        share.acquire("A", T0, [(first, first + 249, True)], 250, CONFIG, deliver_at=deliver_at)
    assert share.delays.parked_count() == 1_000 and len(share.delays._cache) <= 200
    scans = []

    def counting_scan(first: int, last: int) -> list[tuple[int, int]]:
        scans.append((first, last))
        return scan_of(deliver_at)(first, last)

    delivered: list[int] = []
    while len(delivered) < 1_000:
        got, _ = share.acquire("A", T0 + 10_000, [], 64, CONFIG, scan=counting_scan)
        assert got, f"{1_000 - len(delivered)} parked records never came back"
        # By delivery time across fetches: every record of this fetch is due no earlier than the last one's.
        assert not delivered or max(offsets(got)) < min(delivered)
        delivered.extend(offsets(got))
        assert len(share.delays._cache) <= 200
    assert sorted(delivered) == list(range(1_000))  # each exactly once
    assert share.delays.parked_count() == 0 and len(scans) >= 8  # reloads, one pass per 100 delivered


def test_old_delay_index_rows_of_single_records_still_replay() -> None:
    share = SharePartition("g", 0, 0)
    share.replay({"g": "g", "full": True, "start": 2, "cursor": 2, "set": [], "park": [[1, T0 + 100]]})
    got, _ = share.acquire("A", T0 + 100, [], 10, CONFIG, scan=scan_of({1: T0 + 100}))
    assert offsets(got) == [1]


def test_states_are_kept_as_runs_not_per_record() -> None:
    share = SharePartition("g", 0, 0)
    share.acquire("A", T0, [(0, 9_999, True)], 10_000, CONFIG)
    assert len(share._states) == 1
    share.acknowledge("A", 0, 4_999, "accept", T0, CONFIG)
    share.acknowledge("A", 6_000, 6_000, "release", T0, CONFIG)
    assert share.start == 5_000 and len(share._states) == 3  # acquired, released, acquired
    assert share.state_of(6_000).state == AVAILABLE  # type: ignore[union-attr]
    assert share.state_of(5_999).state == ACQUIRED  # type: ignore[union-attr]
