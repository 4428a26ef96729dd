"""Key-ordered share groups (share.ordering=key): one record per key in flight, each key in log order."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from logbroker.groups.share import ACQUIRED, ShareConfig, SharePartition

KEYED = ShareConfig(lock_ms=1_000, delivery_limit=3, backoff="fixed", backoff_ms=0, ordering="key")
T0 = 1_000_000


def offsets(acquired: list) -> list[int]:  # type: ignore[type-arg]
    return [o for a in acquired for o in range(a.first_offset, a.last_offset + 1)]


def scan_of(keys: dict[int, bytes | None]) -> Callable[[int, int], list[tuple[int, bytes | None]]]:
    return lambda first, last: [(o, k) for o, k in sorted(keys.items()) if first <= o <= last]


# offsets 0..5: keys a a b a - b (offset 4 has no key)
KEYS: dict[int, bytes | None] = {0: b"a", 1: b"a", 2: b"b", 3: b"a", 4: None, 5: b"b"}
LOG = [(0, 5, True)]


def test_a_key_has_one_record_in_flight_while_other_keys_and_keyless_records_flow() -> None:
    share = SharePartition("g", 0, 0)
    got, delta = share.acquire("A", T0, LOG, 10, KEYED, keys=KEYS)
    assert offsets(got) == [0, 2, 4]  # the first of a, the first of b, and the keyless one
    assert share.acquire("B", T0, [], 10, KEYED)[0] == []  # a and b are each in flight with A
    share.acknowledge("A", 0, 0, "accept", T0, KEYED)
    assert offsets(share.acquire("B", T0, [], 10, KEYED)[0]) == [1]  # a's next, only now
    share.acknowledge("A", 2, 2, "accept", T0, KEYED)
    assert offsets(share.acquire("C", T0, [], 10, KEYED)[0]) == [5]


def test_a_released_or_expired_record_keeps_its_keys_place() -> None:
    share = SharePartition("g", 0, 0)
    share.acquire("A", T0, LOG, 10, KEYED, keys=KEYS)
    share.acknowledge("A", 0, 0, "release", T0, KEYED)
    again, _ = share.acquire("B", T0, [], 10, KEYED)
    assert offsets(again) == [0] and again[0].delivery_count == 2  # 0 again, not 1 overtaking it
    share.expire(T0 + 1_000, KEYED)  # B's lock (and A's on 2 and 4) runs out
    later, _ = share.acquire("C", T0 + 1_000, [], 10, KEYED)
    assert offsets(later) == [0, 2, 4]


def test_a_dead_lettered_record_lets_its_key_go_on() -> None:
    share = SharePartition("g", 0, 0)
    share.acquire("A", T0, LOG, 10, KEYED, keys=KEYS)
    share.acknowledge("A", 0, 0, "reject", T0, KEYED, reason="poison")
    assert offsets(share.acquire("B", T0, [], 10, KEYED)[0]) == [1]


def test_a_new_leader_rebuilds_the_key_order_from_its_log() -> None:
    leader = SharePartition("g", 0, 0)
    follower = SharePartition("g", 0, 0)
    follower.replay(leader.acquire("A", T0, LOG, 10, KEYED, keys=KEYS)[1])
    # The follower takes over while A holds 0, 2 and 4: a's and b's next records must still wait.
    assert follower.acquire("B", T0, [], 10, KEYED, key_scan=scan_of(KEYS))[0] == []
    follower.acknowledge("A", 0, 0, "accept", T0, KEYED)
    assert offsets(follower.acquire("B", T0, [], 10, KEYED, key_scan=scan_of(KEYS))[0]) == [1]


def test_turning_the_mode_off_and_on_again_rebuilds_the_order() -> None:
    share = SharePartition("g", 0, 0)
    share.acquire("A", T0, [(0, 1, True)], 10, KEYED, keys=KEYS)  # 0 in flight, 1 waits
    unordered = ShareConfig(lock_ms=1_000, delivery_limit=3, backoff="fixed", backoff_ms=0)
    assert offsets(share.acquire("B", T0, [], 10, unordered)[0]) == [1]  # off: 1 is just available
    share.acknowledge("B", 1, 1, "release", T0, unordered)
    assert share.acquire("C", T0, [], 10, KEYED, key_scan=scan_of(KEYS))[0] == []  # on: 0 is still held


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"b", b"c", None]), min_size=1, max_size=30),
       st.lists(st.tuples(st.sampled_from("ABC"), st.sampled_from(["take", "accept", "release", "reject", "tick"]),
                          st.integers(0, 29)), max_size=60))
def test_model_one_holder_per_key_and_first_deliveries_in_log_order(keys_list: list[bytes | None],
                                                                    steps: list[tuple[str, str, int]]) -> None:
    keys = dict(enumerate(keys_list))
    share = SharePartition("g", 0, 0)
    pending = [(0, len(keys) - 1, True)]
    now = T0
    first_delivered: dict[bytes, list[int]] = {}
    for member, action, pick in steps:
        now += 100
        if action == "take":
            got, _ = share.acquire(member, now, pending, 3, KEYED, keys=keys)
            pending = [(share.cursor, len(keys) - 1, True)] if share.cursor < len(keys) else []
            for offset in offsets(got):
                key = keys[offset]
                if key is not None and offset not in first_delivered.get(key, []):
                    first_delivered.setdefault(key, []).append(offset)
        elif action == "tick":
            share.expire(now + 1_000, KEYED)
            now += 1_000
        else:
            held = [o for o, r in share.records.items() if r.state == ACQUIRED and r.member == member]
            if held:
                offset = held[pick % len(held)]
                share.acknowledge(member, offset, offset, action, now, KEYED)
        in_flight = [keys[o] for o, r in share.records.items() if r.state == ACQUIRED and keys[o] is not None]
        assert len(in_flight) == len(set(in_flight)), f"a key in flight twice: {in_flight}"
    for key, delivered in first_delivered.items():
        assert delivered == sorted(delivered), f"key {key!r} delivered out of log order: {delivered}"
