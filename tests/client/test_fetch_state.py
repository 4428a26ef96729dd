"""The consumer's fetch state (fetch_state.py) fed with hand-made fetch answers: no broker involved."""

from __future__ import annotations

import pytest
from logbroker_client import records as rec
from logbroker_client.errors import CorruptBatchError, OffsetOutOfRangeError, UnknownTopicOrPartitionError
from logbroker_client.fetch_state import EARLIEST, FetchOutcome, FetchState
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.types import TopicPartition

TP = TopicPartition("t", 0)


def batch(base_offset: int, *values: bytes) -> bytes:
    return rec.build_batch([(1_000, None, v, []) for v in values], base_offset=base_offset)


def answer(data: bytes = b"", error: int = pb.ErrorCode.NONE) -> pb.PartitionFetchResult:
    return pb.PartitionFetchResult(topic="t", partition=0, records=data, error_code=error, error_message="no")


def fetched(state: FetchState, data: bytes = b"", error: int = pb.ErrorCode.NONE) -> FetchOutcome:
    (tp, offset), = state.to_fetch()
    fetch = state.begin_fetch("broker-1", {tp: offset})
    state.end_fetch(fetch)
    return state.absorb(fetch, answer(data, error))


def at(offset: int) -> FetchState:
    state = FetchState(reset=EARLIEST)
    state.assign([TP])
    state.seek(TP, offset)
    return state


def test_the_position_moves_past_a_control_batch_that_ends_the_log() -> None:
    state = at(0)
    fetched(state, batch(0, b"a", b"b") + rec.build_control_batch(2, 1, 1_000))
    assert [r.value for r in state.take(10)] == [b"a", b"b"]
    assert state.consumed() == {TP: 3}  # a group committing this has lag 0 at log end 3
    assert fetched(state, rec.build_control_batch(3, 2, 1_000)) is FetchOutcome.DONE
    assert state.take(10) == [] and state.consumed() == {TP: 4}


def test_take_hands_out_at_most_the_limit_and_the_position_follows_what_was_handed_out() -> None:
    state = at(10)
    fetched(state, batch(10, b"a", b"b", b"c"))
    assert [r.offset for r in state.take(2)] == [10, 11]
    assert state.consumed() == {TP: 12}
    assert state.to_fetch() == []  # records still buffered: no fetch yet
    assert [r.offset for r in state.take(2)] == [12]
    assert state.to_fetch() == [(TP, 13)]


def test_an_answer_to_a_fetch_sent_before_a_seek_is_dropped() -> None:
    state = at(0)
    fetch = state.begin_fetch("broker-1", {TP: 0})
    state.seek(TP, 100)
    state.absorb(fetch, answer(batch(0, b"old")))
    assert state.take(10) == [] and state.consumed() == {TP: 100}


def test_out_of_range_forgets_the_position_for_the_reset_policy_and_without_one_raises() -> None:
    state = at(5)
    fetched(state, error=pb.ErrorCode.OFFSET_OUT_OF_RANGE)
    assert state.missing_positions() == [TP] and state.reset_timestamp([TP]) == EARLIEST
    strict = FetchState(reset=None)
    strict.assign([TP])
    with pytest.raises(OffsetOutOfRangeError, match="auto_offset_reset='none'"):
        strict.reset_timestamp([TP])


def test_leader_moves_ask_for_new_metadata_and_other_errors_are_raised() -> None:
    assert fetched(at(0), error=pb.ErrorCode.NOT_LEADER) is FetchOutcome.FIND_LEADER
    with pytest.raises(UnknownTopicOrPartitionError):
        fetched(at(0), error=pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION)


def test_a_damaged_batch_fails_its_crc_and_records_before_it_come_first() -> None:
    good = batch(0, b"a")
    damaged = bytearray(batch(1, b"x" * 50))
    damaged[-10] ^= 0xFF
    state = at(0)
    fetched(state, good + bytes(damaged))
    assert [r.value for r in state.take(10)] == [b"a"]
    with pytest.raises(CorruptBatchError, match=r"CRC.*seek\(TopicPartition\('t', 0\), 2\)"):
        fetched(state, bytes(damaged))
    unchecked = FetchState(reset=EARLIEST, check_crcs=False)
    unchecked.assign([TP])
    unchecked.seek(TP, 1)
    fetched(unchecked, bytes(damaged))
    assert len(unchecked.take(10)) == 1  # as stored, when asked not to check


def test_reassignment_keeps_positions_of_partitions_that_stay_and_drops_the_rest() -> None:
    other = TopicPartition("t", 1)
    state = at(7)
    assert state.assign([TP, other]) == [other]
    assert state.consumed() == {TP: 7}
    state.remove([TP])
    assert state.assigned == [other] and state.consumed() == {}
