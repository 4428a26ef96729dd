"""The consumer-group checker on hand-made event lists: a clean history passes, and each rule finds its violation."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.support.checker import Stored, make_value
from tests.support.group_checker import (
    check,
    describe_violations,
    load_events,
    replay,
    reset_event,
    summarize,
)

Event = dict[str, Any]
MS = 1000  # event times are microseconds; the lists below are written in milliseconds
LOG_OFFSETS = {0: [0, 1, 2, 3, 5, 6], 1: [0, 1, 2, 3]}  # partition 0 has no record at 4 (a leader's no-op batch)


def seq_at(partition: int, offset: int) -> int:
    return 1000 * partition + offset


LOG = {p: [Stored(o, make_value(seq_at(p, o))) for o in offsets] for p, offsets in LOG_OFFSETS.items()}
ACKED = {make_value(seq_at(p, o)): (p, o) for p, offsets in LOG_OFFSETS.items() for o in offsets}


def event(kind: str, member: str, t_ms: int, incarnation: str = "1", **fields: Any) -> Event:
    return {"event": kind, "member": member, "incarnation": incarnation, "pid": 1, "t_us": t_ms * MS, **fields}


def assigned(member: str, t_ms: int, positions: Mapping[int, int | None], incarnation: str = "1") -> Event:
    return event("assigned", member, t_ms, incarnation, partitions=sorted(positions),
                 positions=[[p, o] for p, o in sorted(positions.items())])


def revoked(member: str, t_ms: int, partitions: Iterable[int], kind: str = "revoked", incarnation: str = "1") -> Event:
    return event(kind, member, t_ms, incarnation, partitions=sorted(partitions))


def consumed(member: str, t_ms: int, records: Iterable[tuple[int, int]], incarnation: str = "1",
             seq: int | None = None) -> Event:
    return event("consumed", member, t_ms, incarnation, poll_start_us=(t_ms - 5) * MS,
                 records=[[p, o, seq_at(p, o) if seq is None else seq] for p, o in records])


def commit(member: str, t_ms: int, offsets: Mapping[int, int], ok: bool = True, incarnation: str = "1") -> Event:
    return event("commit", member, t_ms + 5, incarnation, sent_us=t_ms * MS,
                 offsets=[[p, o] for p, o in sorted(offsets.items())], ok=ok, error="" if ok else "FencedMemberEpoch")


def observed(t_ms: int, committed: Mapping[int, int], owners: Mapping[str, list[int]] | None = None) -> Event:
    return {"event": "observed", "member": "observer", "sent_us": t_ms * MS, "t_us": (t_ms + 10) * MS,
            "committed": [[p, o] for p, o in sorted(committed.items())],
            "owners": [[m, ps] for m, ps in (owners or {}).items()]}


def clean_events() -> list[Event]:
    """A owns both partitions and gives partition 1 to B when B joins; then A is stopped past its session: B takes
    partition 0 at 6 s while A, frozen since 3 s, is told it lost it only at 9 s, rejoins and gets nothing."""
    return [
        event("started", "A", 900),
        assigned("A", 1000, {0: 0, 1: 0}),
        consumed("A", 1100, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]),
        commit("A", 1200, {0: 3, 1: 2}),
        event("started", "B", 1500),
        commit("A", 1990, {1: 2}),
        revoked("A", 2000, [1]),
        assigned("B", 2100, {1: 2}),
        consumed("B", 2200, [(1, 2), (1, 3)]),
        observed(2500, {0: 3, 1: 2}, {"a-id": [0], "b-id": [1]}),
        commit("B", 2600, {1: 4}),
        consumed("A", 2700, [(0, 3), (0, 5)]),  # no record at 4: the position passed a no-op batch
        commit("A", 2800, {0: 6}),
        commit("A", 2950, {0: 6}),
        assigned("B", 6000, {0: 6}),
        consumed("B", 6100, [(0, 6)]),
        commit("B", 6200, {0: 7, 1: 4}),
        revoked("A", 9000, [0], kind="lost"),
        commit("A", 9100, {0: 6}, ok=False),  # a fenced member's commit is refused: proves nothing
        observed(9500, {0: 7, 1: 4}, {"b-id": [0, 1]}),
        event("closed", "A", 9800),
        commit("B", 9900, {0: 7, 1: 4}),
        revoked("B", 9950, [0, 1]),
        event("closed", "B", 10000),
    ]


def kinds(violations: list[str]) -> set[str]:
    return {v.split(":", 1)[0] for v in violations}


def with_changes(events: list[Event], add: Iterable[tuple[int, Event]]) -> list[Event]:
    """Insert events (each before an index of the original list)."""
    out = list(events)
    for index, extra in sorted(add, key=lambda item: -item[0]):
        out.insert(index, extra)
    return out


def index_of(events: list[Event], kind: str, member: str, t_ms: int) -> int:
    for i, e in enumerate(events):
        if e["event"] == kind and e.get("member") == member and e["t_us"] in (t_ms * MS, (t_ms + 5) * MS):
            return i
    raise AssertionError(f"no {kind} of {member} at {t_ms}")


# ---------------------------------------------------------------------------------------------- clean


def test_a_clean_history_passes_with_the_log_and_the_acknowledgements() -> None:
    assert check(clean_events(), ACKED, LOG) == []
    assert check(clean_events()) == []


def test_the_summary_counts_owners_ownerships_records_and_commits() -> None:
    summary = summarize(clean_events(), LOG)
    assert summary["owners"] == 2 and summary["ownerships"] == 4
    assert summary["ended"] == {"revoked": 3, "lost": 1}
    assert summary["distinct records"] == 10 and summary["consumed again"] == 0
    assert summary["commits ok"] == 7 and summary["commits failed"] == 1


# ------------------------------------------------------------------------------------------ ownership


def test_consuming_a_revoked_partition_is_not_owned() -> None:
    events = with_changes(clean_events(), [(index_of(clean_events(), "assigned", "B", 2100),
                                                consumed("A", 2050, [(1, 2)]))])
    assert "not-owned" in kinds(check(events))


def test_consuming_after_being_told_of_the_loss_is_not_owned() -> None:
    events = clean_events()
    events.insert(index_of(events, "commit", "A", 9100), consumed("A", 9050, [(0, 6)]))
    violations = check(events)
    assert "not-owned" in kinds(violations), describe_violations(violations)


def test_consuming_a_partition_never_assigned_is_not_owned() -> None:
    events = clean_events()
    events.insert(1, consumed("A", 950, [(0, 0)]))
    assert any("never been assigned" in v for v in check(events))


def test_a_new_owner_before_the_old_one_revoked_is_an_overlap() -> None:
    events = clean_events()
    events[index_of(events, "assigned", "B", 2100)] = assigned("B", 1950, {1: 2})
    assert kinds(check(events)) == {"overlap"}


def test_a_fenced_member_that_kept_consuming_after_the_new_owner_took_over_is_an_overlap() -> None:
    """A was told at 9 s, but it still returned records of partition 0 at 7 s, after B took it at 6 s."""
    events = clean_events()
    events.insert(index_of(events, "consumed", "B", 6100) + 1, consumed("A", 7000, [(0, 6)]))
    violations = check(events)
    assert "overlap" in kinds(violations) and "not-owned" not in kinds(violations), describe_violations(violations)


def test_records_checked_before_a_pause_end_the_fenced_ownership_at_the_check_not_at_the_return() -> None:
    """A's poll confirmed its session at 2.99 s, then A was stopped; it returned the records at 7 s, after B
    took partition 0 at 6 s. The member reports the check's instant (owned_at_us): no overlap, since no client
    can close the window between its last check and the return. Had the check been at 6.5 s, it would be one."""
    for checked_ms, expected in ((2990, set()), (6500, {"overlap"})):
        events = clean_events()
        late = consumed("A", 7000, [(0, 6)])
        late["owned_at_us"] = checked_ms * MS
        events.insert(index_of(events, "consumed", "B", 6100) + 1, late)
        violations = check(events)
        assert kinds(violations) == expected, describe_violations(violations)


def test_a_fenced_member_whose_commit_succeeded_after_the_takeover_is_an_overlap() -> None:
    events = clean_events()
    events.insert(index_of(events, "consumed", "B", 6100) + 1, commit("A", 6500, {0: 6}))
    assert "overlap" in kinds(check(events))


def test_a_killed_member_holds_its_partitions_until_its_last_sign_of_life() -> None:
    """A is SIGKILLed (its events just end); B takes over after A's last poll: clean. If B had taken over before
    A's last poll, both consumed at once."""
    killed = [
        assigned("A", 1000, {0: 0}), consumed("A", 1100, [(0, 0), (0, 1)]), commit("A", 1200, {0: 2}),
        assigned("B", 5000, {0: 2}), consumed("B", 5100, [(0, 2)]), revoked("B", 5200, [0]),
        event("closed", "B", 5300),
    ]
    assert check(killed) == []
    early = [killed[0], killed[1], assigned("B", 1050, {0: 0}), revoked("B", 1060, [0]), event("closed", "B", 1070)]
    assert kinds(check(early)) == {"overlap"}


def test_a_restarted_member_is_a_new_owner_that_must_not_overlap_its_previous_run() -> None:
    events = [
        assigned("S", 1000, {0: 0}, incarnation="run1"), consumed("S", 1100, [(0, 0)], incarnation="run1"),
        assigned("S", 1050, {0: 0}, incarnation="run2"), consumed("S", 1200, [(0, 0)], incarnation="run2"),
    ]
    assert kinds(check(events)) == {"overlap"}


# --------------------------------------------------------------------------------------------- commits


def test_a_commit_of_a_partition_not_owned_is_found_and_a_refused_one_proves_nothing() -> None:
    events = clean_events()
    events.insert(index_of(events, "assigned", "B", 2100), commit("A", 2050, {1: 2}))
    assert kinds(check(events)) == {"commit-not-owned"}
    events = clean_events()
    events.insert(index_of(events, "assigned", "B", 2100), commit("A", 2050, {1: 2}, ok=False))
    assert check(events) == []


def test_a_commit_beyond_what_was_polled_is_ahead() -> None:
    events = clean_events()
    events[index_of(events, "commit", "A", 1200)] = commit("A", 1200, {0: 5, 1: 2})  # polled 0/0..0/2 only
    violations = check(events, log=LOG)
    assert "commit-ahead" in kinds(violations), describe_violations(violations)
    assert any("record at 3 not polled" in v for v in violations)


def test_a_commit_past_offsets_without_records_is_not_ahead_with_the_log_and_is_without_it() -> None:
    events = clean_events()
    events[index_of(events, "commit", "A", 2800)] = commit("A", 2800, {0: 7})  # polled 0/5; 6 holds a record
    assert "commit-ahead" in kinds(check(events, log=LOG))
    events = clean_events()
    events.insert(index_of(events, "consumed", "A", 2700),
                  consumed("A", 2650, [(0, 3)]))
    events[index_of(events, "consumed", "A", 2700)] = consumed("A", 2700, [(0, 5)])
    events.insert(index_of(events, "consumed", "A", 2700), commit("A", 2660, {0: 5}))  # 4 holds no record
    assert check(events, log=LOG) == []
    assert "commit-ahead" in kinds(check(events))  # without the log, 5 > 4 is all the checker can see


def test_a_commit_of_an_untouched_partition_is_held_to_its_start_position() -> None:
    events = [assigned("A", 1000, {0: 2}), commit("A", 1100, {0: 2}), commit("A", 1200, {0: 3})]
    assert kinds(check(events)) == {"commit-ahead"}


def test_a_committed_offset_shown_with_an_unconsumed_record_below_it_is_ahead() -> None:
    events = clean_events()
    events.insert(index_of(events, "consumed", "B", 2200), observed(2150, {0: 3, 1: 3}))
    violations = check(events, log=LOG)
    assert kinds(violations) >= {"commit-ahead"}, describe_violations(violations)
    assert any("record at 2 below it was first consumed" in v for v in violations)


def test_a_member_starting_past_a_record_nobody_consumed_is_ahead() -> None:
    events = clean_events()
    events[index_of(events, "assigned", "B", 2100)] = assigned("B", 2100, {1: 3})
    events[index_of(events, "consumed", "B", 2200)] = consumed("B", 2200, [(1, 3)])
    violations = check(events, ACKED, LOG)
    assert {"commit-ahead", "lost"} <= kinds(violations), describe_violations(violations)


def test_a_committed_offset_moving_back_is_found_unless_a_reset_came_between() -> None:
    events = clean_events()
    events.append(observed(10500, {0: 3, 1: 4}))
    violations = check(events)
    assert kinds(violations) == {"backwards"} and "partition 0" in violations[0], describe_violations(violations)
    events = clean_events()
    events.append(reset_event({0: 0}, 10100 * MS, 10200 * MS))
    events.append(observed(10500, {0: 0, 1: 4}))
    assert check(events) == []
    events.append(observed(10700, {0: 0, 1: 2}))  # partition 1 was not reset
    assert kinds(check(events)) == {"backwards"}


def test_a_commit_below_the_previous_one_of_another_member_is_backwards() -> None:
    events = clean_events()
    events[index_of(events, "commit", "B", 2600)] = commit("B", 2600, {1: 1})
    assert "backwards" in kinds(check(events))


def test_commits_that_overlap_in_time_are_not_ordered() -> None:
    """The second commit was sent before the first was answered: their order at the coordinator is unknown."""
    events = [assigned("A", 1000, {0: 0}), consumed("A", 1010, [(0, 0), (0, 1)]),
              event("commit", "A", 1100, sent_us=1020 * MS, offsets=[[0, 2]], ok=True, error=""),
              event("commit", "A", 1110, sent_us=1050 * MS, offsets=[[0, 1]], ok=True, error="")]
    assert check(events) == []


# --------------------------------------------------------------------------------------- the records


def test_a_skipped_record_within_an_ownership_is_found() -> None:
    events = clean_events()
    events[index_of(events, "consumed", "A", 1100)] = consumed("A", 1100, [(0, 0), (0, 2), (1, 0), (1, 1)])
    violations = check(events, log=LOG)
    assert "skipped" in kinds(violations), describe_violations(violations)


def test_a_first_record_past_the_start_position_is_skipped() -> None:
    events = clean_events()
    events[index_of(events, "consumed", "B", 2200)] = consumed("B", 2200, [(1, 3)])
    violations = check(events, ACKED, LOG)
    assert {"skipped", "lost"} <= kinds(violations), describe_violations(violations)


def test_a_record_repeated_within_one_ownership_is_out_of_order() -> None:
    events = clean_events()
    events.insert(index_of(events, "commit", "A", 1200), consumed("A", 1150, [(0, 1)]))
    assert "order" in kinds(check(events))


def test_a_record_consumed_again_by_the_next_owner_is_fine() -> None:
    """At-least-once: A's consumption of 1/2 was never committed, so B consumes it again."""
    events = clean_events()
    events.insert(index_of(events, "commit", "A", 1990), consumed("A", 1980, [(1, 2)]))
    assert check(events, ACKED, LOG) == []
    assert summarize(events)["consumed again"] == 1


def test_an_acknowledged_record_nobody_consumed_is_lost_and_a_wrong_value_is_found() -> None:
    events = clean_events()
    events[index_of(events, "consumed", "B", 6100)] = consumed("B", 6100, [(0, 6)], seq=77)
    violations = check(events, ACKED, LOG)
    assert kinds(violations) == {"wrong-value"}, describe_violations(violations)
    acked = dict(ACKED) | {make_value(99): (1, 9)}
    assert any(v.startswith("lost: the record at 1/9") for v in check(clean_events(), acked, LOG))


# ----------------------------------------------------------------------------- observer and protocol


def test_the_coordinator_showing_two_owners_of_a_partition_is_found() -> None:
    events = clean_events() + [observed(9600, {}, {"x": [0], "y": [0, 1]})]
    assert kinds(check(events)) == {"coordinator-overlap"}


@pytest.mark.parametrize("extra", [
    assigned("A", 1050, {0: 0}),  # assigned while it owns it
    revoked("B", 1600, [1]),  # revoked before it was assigned
    event("consumed", "A", 1150),  # no records field
])
def test_events_that_contradict_themselves_are_protocol_violations(extra: Event) -> None:
    events = clean_events()
    events.insert(index_of(events, "commit", "A", 1200), extra)
    assert "protocol" in kinds(check(events))


def test_load_events_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"event":"started","member":"A","incarnation":"1","t_us":1}\n{"event":"assig')
    assert [e["event"] for e in load_events([path, tmp_path / "missing.jsonl"])] == ["started"]


def test_replay_exposes_each_ownership() -> None:
    history = replay(clean_events())
    zero = [(i.owner, i.ended_by) for i in history.intervals_of(0)]
    assert zero == [("A#1", "lost"), ("B#1", "revoked")]
    lost = history.intervals_of(0)[0]
    assert lost.effective_end_us() == 2950 * MS  # its last successful commit's sending, not the 9 s it was told
