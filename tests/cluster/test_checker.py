"""The acknowledged-records checker on hand-made inputs: each kind of violation is found, a clean log passes."""

from __future__ import annotations

import threading
from concurrent.futures import Future

from logbroker_client.types import RecordMetadata

from tests.support.checker import AckLog, Stored, check, describe_violations, make_value, sequence_of


def v(seq: int) -> bytes:
    return make_value(seq, size=20)


def clean_case() -> tuple[dict[bytes, tuple[int, int]], dict[int, list[Stored]]]:
    """Two partitions; offsets skip the leaders' no-op control batches (1 and 4 in partition 0)."""
    acked = {v(0): (0, 0), v(2): (0, 2), v(4): (0, 3), v(6): (0, 5), v(1): (1, 1), v(3): (1, 2)}
    log = {
        0: [Stored(0, v(0)), Stored(2, v(2)), Stored(3, v(4)), Stored(5, v(6)), Stored(6, v(8))],
        1: [Stored(1, v(1)), Stored(2, v(3))],
    }
    return acked, log


def kinds(violations: list[str]) -> set[str]:
    return {line.split(":", 1)[0] for line in violations}


def test_values_carry_their_sequence_number() -> None:
    assert sequence_of(make_value(42)) == 42
    assert sequence_of(make_value(7, size=100, tag=b"x")) == 7
    assert len(make_value(7, size=100)) == 100


def test_a_clean_log_passes_even_with_gaps_and_unacknowledged_records() -> None:
    acked, log = clean_case()
    assert check(acked, log) == []  # v(8) is stored but was never acknowledged: allowed (its ack was lost)


def test_an_empty_run_passes() -> None:
    assert check({}, {}) == []
    assert check({}, {0: []}) == []


def test_a_missing_acknowledged_record_is_found() -> None:
    acked, log = clean_case()
    log[0] = [r for r in log[0] if r.value != v(4)]
    violations = check(acked, log)
    assert kinds(violations) == {"lost"}
    assert "0/3" in violations[0]


def test_a_record_at_another_offset_is_found() -> None:
    acked, log = clean_case()
    log[1] = [Stored(1, v(1)), Stored(3, v(3))]
    assert kinds(check(acked, log)) == {"moved"}


def test_a_record_in_another_partition_is_found() -> None:
    acked, log = clean_case()
    log[1] = [Stored(1, v(1))]
    log[0] = [*log[0], Stored(7, v(3))]
    assert kinds(check(acked, log)) == {"moved"}


def test_an_acknowledged_record_stored_twice_is_found() -> None:
    acked, log = clean_case()
    log[0] = [*log[0], Stored(7, v(6))]  # a retried batch appended again after a leader change
    violations = check(acked, log)
    assert kinds(violations) == {"duplicate"}
    assert "0/5, 0/7" in violations[0]


def test_a_duplicate_that_took_the_acknowledged_place_is_found_too() -> None:
    acked, log = clean_case()
    log[0] = [Stored(0, v(0)), Stored(1, v(2)), Stored(2, v(2)), Stored(3, v(4)), Stored(5, v(6))]
    assert kinds(check(acked, log)) == {"duplicate"}


def test_offsets_that_do_not_strictly_increase_are_found() -> None:
    acked, log = clean_case()
    log[0] = [Stored(0, v(0)), Stored(3, v(4)), Stored(2, v(2)), Stored(5, v(6))]
    violations = check(acked, log)
    assert [line for line in violations if "strictly increase" in line]
    log[0] = [Stored(0, v(0)), Stored(2, v(2)), Stored(2, v(10)), Stored(3, v(4)), Stored(5, v(6))]
    assert kinds(check(acked, log)) == {"partition 0"}


def test_acknowledgements_out_of_send_order_are_found() -> None:
    # The log agrees with the acknowledgements, but sequence 4 landed before sequence 2.
    acked = {v(0): (0, 0), v(2): (0, 3), v(4): (0, 2)}
    log = {0: [Stored(0, v(0)), Stored(2, v(4)), Stored(3, v(2))]}
    violations = check(acked, log)
    assert kinds(violations) == {"reordered"}
    assert "sequence 4" in violations[0]


def test_several_violations_are_all_reported_and_summarised() -> None:
    acked, log = clean_case()
    log[0] = [Stored(0, v(0)), Stored(2, v(2)), Stored(5, v(6)), Stored(6, v(6))]
    log[1] = [Stored(1, v(1)), Stored(4, v(3))]
    violations = check(acked, log)
    assert kinds(violations) == {"lost", "duplicate", "moved"}
    text = describe_violations(violations, limit=1)
    assert text.startswith(f"{len(violations)} violation(s)") and "more" in text


def test_ack_log_counts_acknowledgements_and_failures_from_callbacks() -> None:
    acks = AckLog()
    ok: Future[RecordMetadata] = Future()
    bad: Future[RecordMetadata] = Future()
    ok.add_done_callback(acks.callback(v(1)))
    bad.add_done_callback(acks.callback(v(2)))
    ok.set_result(RecordMetadata("t", 1, 41, 0))
    bad.set_exception(TimeoutError("no answer"))
    assert acks.snapshot() == {v(1): (1, 41)}
    assert (acks.count(), acks.failed, acks.completed) == (1, 1, 2)
    assert "TimeoutError" in acks.summary()


def test_ack_log_is_safe_across_threads() -> None:
    acks = AckLog()

    def ack_many(start: int) -> None:
        for i in range(start, start + 2000):
            acks.ack(v(i), 0, i)

    threads = [threading.Thread(target=ack_many, args=(n * 2000,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert acks.count() == 8000 and acks.completed == 8000
