"""The idempotent-producer table, rule by rule as Kafka 3.x applies them: gaps, epochs, duplicates in a
window of 5, unknown producers, truncation, eviction, and the rebuild from a replica's log."""

from __future__ import annotations

from pathlib import Path

from logbroker_client import records as rec

from logbroker.cluster.producer_state import (
    BATCHES_PER_PRODUCER,
    BatchIdentity,
    Outcome,
    ProducerStateTable,
    rebuild_from_log,
)
from logbroker.storage.config import LogConfig
from logbroker.storage.log import PartitionLog

TOP_SEQUENCE = 0x7FFFFFFF


def batch(sequence: int, count: int = 10, producer_id: int = 7, epoch: int = 0) -> BatchIdentity:
    return BatchIdentity(producer_id, epoch, sequence, count)


def table_with(*batches: BatchIdentity) -> ProducerStateTable:
    """A table that has recorded the batches one after the other in a log starting at offset 100."""
    table = ProducerStateTable()
    offset = 100
    for b in batches:
        table.record(b, offset, offset + b.record_count - 1)
        offset += b.record_count
    return table


def test_a_producer_never_seen_is_accepted_at_any_sequence_as_kafka_3_does() -> None:
    table = ProducerStateTable()
    assert table.check(batch(0)).outcome is Outcome.APPEND
    assert table.check(batch(500)).outcome is Outcome.APPEND


def test_the_next_sequence_is_appended_and_a_gap_is_out_of_order() -> None:
    table = table_with(batch(0))
    assert table.check(batch(10)).outcome is Outcome.APPEND
    gap = table.check(batch(20))
    assert gap.outcome is Outcome.OUT_OF_ORDER
    assert gap.expected_sequence == 10


def test_producers_are_independent() -> None:
    table = table_with(batch(0, producer_id=7))
    assert table.check(batch(30, producer_id=8)).outcome is Outcome.APPEND
    assert table.check(batch(30, producer_id=7)).outcome is Outcome.OUT_OF_ORDER


def test_a_retry_of_each_of_the_last_five_batches_gets_its_first_offsets() -> None:
    table = table_with(*(batch(i * 10) for i in range(BATCHES_PER_PRODUCER)))
    for i in range(BATCHES_PER_PRODUCER):
        verdict = table.check(batch(i * 10))
        assert verdict.outcome is Outcome.DUPLICATE
        assert verdict.duplicate_of is not None
        assert (verdict.duplicate_of.base_offset, verdict.duplicate_of.last_offset) == (100 + i * 10, 109 + i * 10)


def test_a_batch_behind_the_window_of_five_is_stored_long_ago_not_appended() -> None:
    table = table_with(*(batch(i * 10) for i in range(BATCHES_PER_PRODUCER + 1)))
    assert table.check(batch(0)).outcome is Outcome.STORED_LONG_AGO
    assert table.check(batch(10)).outcome is Outcome.DUPLICATE


def test_a_retry_with_other_bounds_than_the_stored_batch_is_not_a_duplicate() -> None:
    table = table_with(batch(0), batch(10))
    assert table.check(batch(0, count=5)).outcome is Outcome.STORED_LONG_AGO


def test_an_older_epoch_is_fenced() -> None:
    table = table_with(batch(0, epoch=0), batch(0, epoch=1))
    verdict = table.check(batch(10, epoch=0))
    assert verdict.outcome is Outcome.FENCED_EPOCH
    assert verdict.known_epoch == 1


def test_a_newer_epoch_starts_at_sequence_zero_and_resets_the_window() -> None:
    table = table_with(batch(0, epoch=0), batch(10, epoch=0))
    assert table.check(batch(20, epoch=1)).outcome is Outcome.OUT_OF_ORDER
    assert table.check(batch(0, epoch=1)).outcome is Outcome.APPEND
    table.record(batch(0, epoch=1), 200, 209)
    assert table.epoch_of(7) == 1
    assert table.check(batch(10, epoch=1)).outcome is Outcome.APPEND
    assert table.check(batch(10, epoch=0)).outcome is Outcome.FENCED_EPOCH
    assert table.check(batch(0, epoch=1)).outcome is Outcome.DUPLICATE


def test_non_idempotent_batches_are_never_tracked() -> None:
    table = table_with(BatchIdentity(-1, -1, -1, 10))
    assert len(table) == 0
    assert table.check(BatchIdentity(-1, -1, -1, 10)).outcome is Outcome.APPEND


def test_recording_the_same_batch_twice_keeps_one_copy() -> None:
    table = ProducerStateTable()
    table.record(batch(0), 100, 109)
    table.record(batch(10), 110, 119)
    table.record(batch(0), 100, 109)  # at propose time, then again once persisted
    for i in range(2, BATCHES_PER_PRODUCER):
        table.record(batch(i * 10), 100 + i * 10, 109 + i * 10)
    assert table.check(batch(0)).outcome is Outcome.DUPLICATE
    assert table.check(batch(BATCHES_PER_PRODUCER * 10)).outcome is Outcome.APPEND


def test_batches_of_one_request_are_checked_as_if_the_earlier_ones_were_stored() -> None:
    table = table_with(batch(0))
    verdicts = table.check_request([batch(10), batch(20), batch(40), batch(0)])
    assert [v.outcome for v in verdicts] == [Outcome.APPEND, Outcome.APPEND, Outcome.OUT_OF_ORDER,
                                             Outcome.DUPLICATE]


def test_a_request_with_an_unknown_producer_chains_its_batches() -> None:
    verdicts = ProducerStateTable().check_request([batch(50), batch(60), batch(80)])
    assert [v.outcome for v in verdicts] == [Outcome.APPEND, Outcome.APPEND, Outcome.OUT_OF_ORDER]


def test_truncation_forgets_batches_at_or_after_the_cut() -> None:
    table = table_with(batch(0), batch(10))  # offsets 100-109, 110-119
    table.truncate(110)
    assert table.check(batch(10)).outcome is Outcome.APPEND
    assert table.check(batch(0)).outcome is Outcome.DUPLICATE
    table.truncate(0)
    assert len(table) == 0
    assert table.check(batch(90)).outcome is Outcome.APPEND


def test_truncating_an_epoch_bump_forgets_the_producer() -> None:
    table = ProducerStateTable()
    table.record(batch(0, epoch=0), 100, 109)
    table.record(batch(0, epoch=1), 110, 119)
    table.truncate(110)  # the bump had replaced epoch 0's batches; once it is cut, nothing is known
    assert table.epoch_of(7) is None
    assert table.check(batch(0, epoch=1)).outcome is Outcome.APPEND
    assert table.check(batch(10, epoch=0)).outcome is Outcome.APPEND


def test_the_least_recently_heard_producer_is_evicted_at_the_limit() -> None:
    table = ProducerStateTable(max_producers=2)
    table.record(batch(0, count=1, producer_id=1), 0, 0)
    table.record(batch(0, count=1, producer_id=2), 1, 1)
    table.record(batch(1, count=1, producer_id=1), 2, 2)
    table.record(batch(0, count=1, producer_id=3), 3, 3)
    assert len(table) == 2
    assert table.epoch_of(2) is None
    assert table.check(batch(1, count=1, producer_id=1)).outcome is Outcome.DUPLICATE


def test_sequences_wrap_around_like_kafkas() -> None:
    table = table_with(batch(TOP_SEQUENCE - 9))  # sequences top-9 .. top
    assert table.check(batch(0, count=5)).outcome is Outcome.APPEND
    table.record(batch(0, count=5), 110, 114)
    assert table.check(batch(TOP_SEQUENCE - 9)).outcome is Outcome.DUPLICATE
    assert table.check(batch(5, count=5)).outcome is Outcome.APPEND
    assert table.check(batch(TOP_SEQUENCE - 100)).outcome is Outcome.STORED_LONG_AGO


def test_a_replica_rebuilds_the_table_from_its_log_at_start_up(tmp_path: Path) -> None:
    """Two producers' batches written to a partition log, then read back the way Replica does at start-up
    (headers only); the rebuilt table judges retries and gaps as the live one did."""
    log = PartitionLog.open(tmp_path / "t-0", LogConfig(), "t", 0)
    try:
        for producer_id, sequence in ((7, 0), (8, 0), (7, 3), (7, 6)):
            builder = rec.BatchBuilder(rec.COMPRESSION_NONE)
            for i in range(3):
                builder.append(1_000 + i, None, b"v%d" % i, ())
            log.append(bytearray(builder.build(producer_id=producer_id, producer_epoch=2, base_sequence=sequence)),
                       leader_epoch=1, now_ms=2_000)
        table = ProducerStateTable()
        rebuild_from_log(log, table)
    finally:
        log.close()
    retry = table.check(BatchIdentity(7, 2, 3, 3))
    assert retry.outcome is Outcome.DUPLICATE and retry.duplicate_of is not None
    assert retry.duplicate_of.base_offset == 6
    assert table.check(BatchIdentity(7, 2, 9, 3)).outcome is Outcome.APPEND
    assert table.check(BatchIdentity(7, 2, 12, 3)).outcome is Outcome.OUT_OF_ORDER
    assert table.check(BatchIdentity(8, 1, 3, 3)).outcome is Outcome.FENCED_EPOCH
