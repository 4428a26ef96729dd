"""The share-group checker on hand-made event lists: a clean history passes, each violation is found."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.share_checker import (
    DeadLetter,
    ShareRules,
    check,
    load_events,
    produced_by_offset,
    summarize,
)

RULES = ShareRules(group="g", topic="jobs", lock_ms=2000, delivery_limit=3)
Event = dict[str, Any]


def value(offset: int) -> str:
    return f"job-{offset}"


def acquired(member: str, offset: int, count: int, sent_ms: int, received_ms: int | None = None,
             shown: str | None = "same") -> Event:
    """An acquisition by a fetch sent at sent_ms; the broker took it then (deadline = sent + lock)."""
    return {"event": "acquired", "member": member, "group": "g", "topic": "jobs", "partition": 0, "offset": offset,
            "delivery_count": count, "lock_deadline_ms": sent_ms + RULES.lock_ms, "sent_ms": sent_ms,
            "received_ms": received_ms if received_ms is not None else sent_ms + 5,
            "value": value(offset) if shown == "same" else shown}


def acked(kind: str, member: str, offset: int, sent_ms: int, outcome: str = "ok", error: str = "") -> Event:
    event = {"event": kind, "member": member, "group": "g", "topic": "jobs", "partition": 0,
             "first_offset": offset, "last_offset": offset, "sent_ms": sent_ms, "received_ms": sent_ms + 5}
    if outcome != "ok":
        event.update(event="ack_error" if outcome == "error" else "ack_unknown", ack_type=kind,
                     error=error or "INVALID_RECORD_STATE", message="")
    return event


def letter(offset: int, count: int = 1, dlq_offset: int = 0, drop: str = "") -> DeadLetter:
    headers = {"lb.dlq.topic": "jobs", "lb.dlq.partition": "0", "lb.dlq.offset": str(offset),
               "lb.dlq.delivery.count": str(count), "lb.dlq.group": "g", "lb.dlq.reason": "poison"}
    headers.pop(drop, None)
    return DeadLetter(0, dlq_offset, headers, value(offset))


PRODUCED = {(0, 0): b"job-0", (0, 1): b"job-1", (0, 2): b"job-2"}


def clean_events() -> list[Event]:
    """A takes 0 and 1, accepts 0 and dies; 1 comes back to B after A's lock (deadline 3000) expired; B
    accepts it, and rejects the poison record 2, which is dead-lettered once."""
    return [
        acquired("A", 0, 1, 1000), acquired("A", 1, 1, 1000),
        acked("accepted", "A", 0, 1100),
        acquired("B", 1, 2, 3100), acquired("B", 2, 1, 3100),
        acked("accepted", "B", 1, 3200), acked("rejected", "B", 2, 3200),
    ]


def clean_letters() -> list[DeadLetter]:
    return [letter(2, count=1)]


def kinds(events: list[Event], letters: list[DeadLetter] | None = None,
          produced: dict[tuple[int, int], bytes] | None = None) -> set[str]:
    found = check(events, PRODUCED if produced is None else produced,
                  clean_letters() if letters is None else letters, RULES)
    return {line.split(":", 1)[0] for line in found}


def test_a_clean_history_passes_and_is_summarized() -> None:
    assert check(clean_events(), PRODUCED, clean_letters(), RULES) == []
    summary = summarize(clean_events(), clean_letters(), RULES)
    assert (summary.acquisitions, summary.redeliveries, summary.records_accepted) == (4, 1, 2)
    assert (summary.records_rejected, summary.dead_letters, summary.by_member) == (1, 1, {"A": 2, "B": 2})


def test_a_release_ends_the_lock_so_another_member_may_take_the_record_at_once() -> None:
    events = [acquired("A", 0, 1, 1000), acked("released", "A", 0, 1500), acquired("B", 0, 2, 1600),
              acked("accepted", "B", 0, 1700)]
    assert kinds(events, [], {(0, 0): b"job-0"}) == set()


def test_a_second_holder_within_the_lock_is_an_overlap() -> None:
    events = clean_events()
    events[3] = acquired("B", 1, 2, 2000)  # A's lock on 1 lasts until 3000 and A never let it go
    assert kinds(events) == {"overlap"}


def test_a_refused_release_does_not_end_the_lock() -> None:
    events = clean_events()
    events[3:3] = [acked("released", "A", 1, 1500, outcome="error")]
    events[4] = acquired("B", 1, 2, 2000)
    assert kinds(events) == {"overlap"}


def test_the_same_member_given_a_record_it_still_holds_is_an_overlap() -> None:
    events = [*clean_events(), acquired("A", 0, 2, 1050)]
    assert "overlap" in kinds(events)


def test_an_accepted_record_delivered_again_is_found() -> None:
    events = [*clean_events(), acquired("C", 0, 2, 1200), acked("accepted", "C", 0, 1300)]
    assert kinds(events) == {"redelivered"}


def test_a_rejected_record_delivered_again_is_found() -> None:
    events = [*clean_events(), acquired("C", 2, 2, 3300)]
    assert kinds(events) == {"redelivered", "dlq-stale-count"}  # and the dead letter missed that delivery


def test_a_confirmed_ack_of_a_record_never_acquired_by_that_member() -> None:
    events = [*clean_events(), acked("accepted", "B", 0, 3300)]
    assert kinds(events) == {"ack-not-held"}


def test_a_confirmed_ack_sent_after_the_lock_deadline() -> None:
    events = clean_events()
    events[2] = acked("accepted", "A", 0, 3500)  # A's lock on 0 ended at 3000
    assert kinds(events) == {"ack-after-expiry"}


def test_a_refused_late_ack_is_no_violation() -> None:
    events = [*clean_events(), acked("accepted", "A", 1, 3050, outcome="error")]
    assert kinds(events) == set()


def test_a_renewal_extends_the_lock() -> None:
    events = [acquired("A", 0, 1, 1000), acked("renewed", "A", 0, 2500), acked("accepted", "A", 0, 4000)]
    assert kinds(events, [], {(0, 0): b"job-0"}) == set()
    late_taker = [*events[:2], acquired("B", 0, 2, 3100)]
    assert "overlap" in kinds(late_taker, [], {})


def test_a_delivery_count_above_the_limit() -> None:
    events = [*clean_events(), acquired("C", 1, 4, 3300)]
    assert "over-limit" in kinds(events)


def test_a_dead_letter_with_a_count_above_the_limit() -> None:
    events = clean_events()
    events[4] = acquired("B", 2, 4, 3100)
    assert kinds(events, [letter(2, count=4)]) == {"over-limit"}


def test_delivery_counts_must_grow() -> None:
    events = clean_events()
    events[3] = acquired("B", 1, 1, 3100)
    assert kinds(events) == {"count-order"}


def test_an_acquired_record_missing_from_the_batches() -> None:
    events = [*clean_events(), acquired("C", 3, 1, 5200, shown=None), acquired("C", 3, 2, 7300),
              acked("accepted", "C", 3, 7400)]
    assert kinds(events, produced={**PRODUCED, (0, 3): b"job-3"}) == {"no-data"}


def test_a_record_delivered_with_another_value() -> None:
    events = clean_events()
    events[0] = acquired("A", 0, 1, 1000, shown="job-7")
    assert kinds(events) == {"wrong-value"}


def test_a_record_never_accepted_nor_dead_lettered_is_lost() -> None:
    events = [e for e in clean_events() if not (e["event"] == "accepted" and e["member"] == "B")]
    assert kinds(events) == {"lost"}


def test_a_produced_record_nobody_ever_saw_is_lost() -> None:
    produced = {**PRODUCED, (0, 3): b"job-3"}
    found = check(clean_events(), produced, clean_letters(), RULES)
    assert found == ["lost: 0/3 ('job-3') was never accepted nor dead-lettered (0 acquisitions)"]


def test_a_rejected_record_missing_from_the_dead_letters_is_lost() -> None:
    found = check(clean_events(), PRODUCED, [], RULES)
    assert found == ["lost: 0/2 was rejected but is not in the dead-letter topic"]


def test_an_accept_of_unknown_outcome_settles_the_record() -> None:
    events = clean_events()
    events[5] = acked("accepted", "B", 1, 3200, outcome="unknown")
    assert kinds(events) == set()
    assert summarize(events, clean_letters(), RULES).acks_unknown == 1


def test_a_record_dead_lettered_twice() -> None:
    assert kinds(clean_events(), [letter(2), letter(2, dlq_offset=1)]) == {"dlq-duplicate"}


def test_a_dead_letter_missing_a_header() -> None:
    assert kinds(clean_events(), [letter(2, drop="lb.dlq.reason")]) == {"dlq-headers"}
    assert kinds(clean_events(), [letter(2, drop="lb.dlq.offset")]) == {"dlq-headers", "lost"}


def test_an_accepted_record_in_the_dead_letters() -> None:
    events = [*clean_events(), acked("rejected", "A", 0, 1050, outcome="unknown")]
    assert kinds(events, [*clean_letters(), letter(0, count=1, dlq_offset=1)]) == {"dlq-accepted"}


def test_a_dead_letter_below_the_limit_needs_a_reject() -> None:
    events = clean_events()
    events[6] = acked("released", "B", 2, 3200)
    assert kinds(events) == {"dlq-no-cause"}


def test_a_dead_letter_at_the_limit_needs_no_reject() -> None:
    events = [acquired("A", 0, 1, 1000), acked("released", "A", 0, 1100), acquired("A", 0, 2, 1200),
              acked("released", "A", 0, 1300), acquired("B", 0, 3, 1400), acked("released", "B", 0, 1500)]
    assert kinds(events, [letter(0, count=3)], {(0, 0): b"job-0"}) == set()


def test_a_dead_letter_with_a_stale_delivery_count() -> None:
    events = [*clean_events()[:6], acquired("A", 2, 2, 5200), acked("rejected", "A", 2, 5300)]
    events.insert(6, acked("released", "B", 2, 3200))
    assert kinds(events, [letter(2, count=1)]) == {"dlq-stale-count"}


def test_a_dead_letter_with_another_value() -> None:
    wrong = DeadLetter(0, 0, letter(2).headers, "job-9")
    assert kinds(clean_events(), [wrong]) == {"wrong-value"}


def test_an_answer_without_a_result_for_an_ack() -> None:
    events = [*clean_events(), acked("accepted", "A", 1, 1200, outcome="unknown", error="NO_RESULT")]
    assert kinds(events) == {"protocol"}


def test_other_groups_and_topics_are_ignored() -> None:
    stranger = {**acquired("Z", 0, 1, 1050), "group": "other"}
    elsewhere = {**acquired("Z", 0, 1, 1050), "topic": "other"}
    other_letter = DeadLetter(0, 5, {**letter(0).headers, "lb.dlq.group": "other"}, "job-0")
    assert kinds([*clean_events(), stranger, elsewhere], [*clean_letters(), other_letter]) == set()


def test_events_files_are_read_and_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "worker.jsonl"
    path.write_text('{"event": "started", "member": "A"}\n{"event": "acquired", "memb')
    assert load_events([path, tmp_path / "missing.jsonl"]) == [{"event": "started", "member": "A"}]


def test_produced_records_are_keyed_by_place() -> None:
    assert produced_by_offset({b"job-0": (0, 0), b"job-1": (1, 7)}) == {(0, 0): b"job-0", (1, 7): b"job-1"}
