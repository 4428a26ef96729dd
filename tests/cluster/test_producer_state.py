"""The idempotent-producer table: retried batches are recognised, new ones pass, truncation forgets."""

from __future__ import annotations

from logbroker_client.producer import MAX_BATCHES_PER_REQUEST

from logbroker.cluster.producer_state import BATCHES_PER_PRODUCER, ProducerStateTable


def test_a_batch_from_a_producer_never_seen_is_appended() -> None:
    assert ProducerStateTable().check(7, 0, 10).duplicate_of is None


def test_a_retried_batch_is_answered_with_the_offsets_of_its_first_copy() -> None:
    table = ProducerStateTable()
    table.record(7, 0, 10, base_offset=100, last_offset=109)
    table.record(7, 10, 5, base_offset=111, last_offset=115)
    verdict = table.check(7, 0, 10)
    assert verdict.duplicate_of is not None
    assert (verdict.duplicate_of.base_offset, verdict.duplicate_of.last_offset) == (100, 109)
    assert table.check(7, 10, 5).duplicate_of.base_offset == 111  # type: ignore[union-attr]


def test_the_next_sequence_is_appended_and_other_producers_are_independent() -> None:
    table = ProducerStateTable()
    table.record(7, 0, 10, 100, 109)
    assert table.check(7, 10, 3).duplicate_of is None
    assert table.check(8, 0, 10).duplicate_of is None


def test_non_idempotent_batches_are_never_deduplicated() -> None:
    table = ProducerStateTable()
    table.record(-1, -1, 10, 100, 109)
    assert len(table) == 0
    assert table.check(-1, -1, 10).duplicate_of is None


def test_a_sequence_older_than_the_kept_window_is_flagged_not_appended() -> None:
    table = ProducerStateTable()
    for i in range(BATCHES_PER_PRODUCER + 2):
        table.record(7, i * 10, 10, i * 10, i * 10 + 9)
    verdict = table.check(7, 0, 10)
    assert verdict.duplicate_of is None and verdict.already_written_unknown_offset


def test_recording_the_same_batch_twice_keeps_one_copy() -> None:
    table = ProducerStateTable()
    table.record(7, 0, 10, 100, 109)
    table.record(7, 0, 10, 100, 109)  # at propose time, then again when persisted
    for i in range(1, BATCHES_PER_PRODUCER):
        table.record(7, i * 10, 10, 100 + i * 10, 109 + i * 10)
    assert table.check(7, 0, 10).duplicate_of is not None


def test_truncation_forgets_batches_at_or_after_the_cut() -> None:
    table = ProducerStateTable()
    table.record(7, 0, 10, 100, 109)
    table.record(7, 10, 10, 110, 119)
    table.truncate(110)
    assert table.check(7, 10, 10).duplicate_of is None
    assert table.check(7, 0, 10).duplicate_of is not None
    table.truncate(0)
    assert len(table) == 0


def test_the_least_recently_heard_producer_is_evicted_at_the_limit() -> None:
    table = ProducerStateTable(max_producers=2)
    table.record(1, 0, 1, 0, 0)
    table.record(2, 0, 1, 1, 1)
    table.record(1, 1, 1, 2, 2)
    table.record(3, 0, 1, 3, 3)
    assert table.check(2, 0, 1).duplicate_of is None
    assert table.check(1, 1, 1).duplicate_of is not None


def test_sequences_wrap_around_like_kafkas() -> None:
    table = ProducerStateTable()
    top = 0x7FFFFFFF
    table.record(7, top - 9, 10, 100, 109)  # sequences top-9 .. top
    assert table.check(7, 0, 5).duplicate_of is None  # the next batch after the wrap is new
    assert not table.check(7, 0, 5).already_written_unknown_offset
    table.record(7, 0, 5, 110, 114)
    assert table.check(7, top - 9, 10).duplicate_of is not None
    assert table.check(7, top - 100, 10).already_written_unknown_offset


def test_a_whole_retried_request_of_the_largest_size_is_recognised() -> None:
    """The window must hold every batch of one request (the producer caps how many it puts in one)."""
    assert 2 * MAX_BATCHES_PER_REQUEST <= BATCHES_PER_PRODUCER
    table = ProducerStateTable()
    table.record(7, 0, 10, 0, 9)  # an earlier, acknowledged request
    for i in range(1, MAX_BATCHES_PER_REQUEST + 1):
        table.record(7, i * 10, 10, i * 10, i * 10 + 9)
    verdicts = [table.check(7, i * 10, 10) for i in range(1, MAX_BATCHES_PER_REQUEST + 1)]
    assert all(v.duplicate_of is not None for v in verdicts)
