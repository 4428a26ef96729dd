"""The producer's core (producer_core.py) fed with hand-made answers: no broker, no thread, no event loop."""

from __future__ import annotations

from typing import Any

import pytest
from logbroker_client import records as rec
from logbroker_client.errors import (
    NotLeaderError,
    PartitionOfflineError,
    RecordTooLargeError,
    RequestTimedOutError,
    UnknownTopicOrPartitionError,
)
from logbroker_client.producer_core import (
    MAX_BATCHES_PER_REQUEST,
    RETRY_BACKOFF_MS,
    CoreBatch,
    ProducerCore,
    complete_all,
)
from logbroker_client.proto import logbroker_pb2 as pb

SLOT = ("t", 0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Batch(CoreBatch):
    __slots__ = ("outcome",)

    def __init__(self, topic: str, partition: int, compression: int, created: float) -> None:
        super().__init__(topic, partition, compression, created)
        self.outcome: tuple[int, BaseException | None] | None = None

    def complete(self, base_offset: int, error: BaseException | None) -> None:
        assert self.outcome is None, "completed twice"
        self.outcome = (base_offset, error)


def make(**options: Any) -> tuple[ProducerCore, Clock, list[int]]:
    clock = Clock()
    wakes: list[int] = []
    core = ProducerCore(new_batch=Batch, new_future=lambda batch, index, ts: (batch, index, ts),
                        wake=lambda: wakes.append(1), clock=clock, producer_id=77, **options)
    return core, clock, wakes


def send(core: ProducerCore, value: bytes | str = b"v", partition: int | None = 0, count: int = 1,
         **kwargs: Any) -> tuple[Batch, int, int]:
    return core.append("t", value, kwargs.get("key"), kwargs.get("headers"), partition, kwargs.get("ts"), count)


def ok(*base_offsets: int, base_offset: int = -1) -> pb.PartitionProduceResult:
    return pb.PartitionProduceResult(topic="t", partition=0, base_offset=base_offset,
                                     batch_base_offsets=list(base_offsets))


def refused(code: int, message: str = "no", leader: str = "") -> pb.PartitionProduceResult:
    result = pb.PartitionProduceResult(topic="t", partition=0, error_code=code, error_message=message)
    if leader:
        result.leader.leader_address = leader
    return result


def sequences(data: bytes) -> list[tuple[int, int]]:
    """(producer id, base sequence) of each batch in a request's records."""
    return [(header.producer_id, header.base_sequence) for _, header in rec.iter_batch_headers(data)]


# ------------------------------------------------------------------------------------------ accumulator

def test_records_share_an_open_batch_until_linger_seals_it_and_the_sender_is_woken_once_per_batch() -> None:
    core, clock, wakes = make(linger_ms=5)
    first = send(core, b"a", ts=10)
    second = send(core, "b", ts=11)  # a str value is encoded
    assert first[0] is second[0] and (first[1], second[1]) == (0, 1) and first[2] == 10
    assert len(wakes) == 1 and core.unfinished == 1 and core.buffered_bytes > 0
    assert core.take_sendable() == []  # still lingering
    assert core.seal_lingering() == pytest.approx(0.005)
    clock.now += 0.005
    core.seal_lingering()
    (slot, batches), = core.take_sendable()
    assert slot == SLOT and batches == [first[0]] and first[0].builder.count == 2


def test_a_record_that_would_overfill_the_batch_starts_a_new_one_and_a_full_batch_is_sealed_at_once() -> None:
    core, _, wakes = make(batch_size=200)
    first = send(core, b"x" * 100)
    second = send(core, b"y" * 100)  # 100 + 2 x 21 bytes of overhead > 200: a batch of its own
    assert first[0] is not second[0]
    assert list(core.ready[SLOT]) == [first[0]] and core.open[SLOT] is second[0]
    third = send(core, b"z" * 250)  # alone past batch_size: sealed as soon as it is appended
    assert list(core.ready[SLOT]) == [first[0], second[0], third[0]] and SLOT not in core.open
    assert len(wakes) >= 3


def test_the_buffer_limit_counts_appended_bytes_until_release() -> None:
    core, clock, _ = make(buffer_memory=1000, linger_ms=0, max_block_ms=250)
    while not core.buffer_full():
        send(core, b"x" * 100)
    assert core.buffered_bytes >= 1000
    assert "buffer full" in str(core.buffer_full_error()) and "0.25s" in str(core.buffer_full_error())
    clock.now += 1
    core.seal_lingering()
    (slot, batches), = core.take_sendable()
    core.request_records(slot, batches)
    verdict = core.on_answer(slot, batches, ok(0), None)
    complete_all(verdict.completions)
    core.release(slot, verdict.finished)
    assert core.buffered_bytes == 0 and core.unfinished == 0 and not core.buffer_full()


def test_an_oversized_record_and_bad_options_are_refused_before_anything_is_queued() -> None:
    core, _, _ = make(max_request_bytes=100)
    with pytest.raises(RecordTooLargeError, match="max_request_bytes=100"):
        send(core, b"x" * 101)
    assert core.unfinished == 0 and core.buffered_bytes == 0
    for bad in ({"acks": 2}, {"compression": "brotli"}, {"partitioner": "random"}):
        with pytest.raises(ValueError):
            make(**bad)


def test_null_key_records_stick_to_a_partition_until_its_batch_is_sealed() -> None:
    core, clock, _ = make(linger_ms=1)
    core.partition_counts["t"] = 3
    chosen = {send(core, b"a", partition=None, count=3)[0].partition for _ in range(5)}
    assert len(chosen) == 1
    keyed = send(core, b"a", partition=None, count=3, key="user-1")
    assert keyed[0].partition == send(core, b"b", partition=None, count=3, key=b"user-1")[0].partition


# ------------------------------------------------------------------------------------------ sending

def sealed(core: ProducerCore, clock: Clock, batches: int) -> None:
    for _ in range(batches):
        send(core, b"v")
        core.seal_all()


def test_one_request_in_flight_per_partition_of_at_most_max_batches_per_request() -> None:
    core, clock, _ = make()
    sealed(core, clock, MAX_BATCHES_PER_REQUEST + 2)
    (slot, first), = core.take_sendable()
    assert len(first) == MAX_BATCHES_PER_REQUEST
    assert core.take_sendable() == []  # in flight
    core.request_records(slot, first)
    complete_all(core.on_answer(slot, first, ok(*range(16)), None).completions)
    core.release(slot, first)
    (_, rest), = core.take_sendable()
    assert len(rest) == 2


def test_sequences_are_taken_when_a_batch_is_first_built_and_a_retry_resends_the_same_bytes() -> None:
    core, clock, _ = make()
    sealed(core, clock, 2)
    send(core, b"a")
    send(core, b"b")
    core.seal_all()  # a third batch of two records
    (slot, batches), = core.take_sendable()
    data = core.request_records(slot, batches)
    assert sequences(data) == [(77, 0), (77, 1), (77, 2)]
    verdict = core.on_answer(slot, batches, refused(pb.ErrorCode.NOT_LEADER, leader="b2:9092"), None)
    assert verdict.retry and not verdict.leaderless and verdict.completions == []
    assert isinstance(verdict.error, NotLeaderError)
    assert core.take_sendable() == []  # backing off
    clock.now += RETRY_BACKOFF_MS / 1000
    (_, again), = core.take_sendable()
    assert again == batches and again[0].attempts == 1
    assert core.request_records(slot, again) == data and again[0].attempts == 2
    complete_all(core.on_answer(slot, again, ok(5, 6, 7), None).completions)
    core.release(slot, again)
    send(core, b"c")
    core.seal_all()
    (_, later), = core.take_sendable()
    assert sequences(core.request_records(slot, later)) == [(77, 4)]


def test_without_idempotence_batches_carry_no_producer_id() -> None:
    core, clock, _ = make(enable_idempotence=False)
    sealed(core, clock, 1)
    (slot, batches), = core.take_sendable()
    assert sequences(core.request_records(slot, batches)) == [(-1, -1)]


# ------------------------------------------------------------------------------------------ answers

def in_flight(core: ProducerCore, clock: Clock, batches: int = 1) -> list[CoreBatch]:
    sealed(core, clock, batches)
    (slot, taken), = core.take_sendable()
    core.request_records(slot, taken)
    return taken


def test_offsets_come_per_batch_or_contiguously_from_the_base_offset() -> None:
    core, clock, _ = make()
    batches = in_flight(core, clock, 2)
    verdict = core.on_answer(SLOT, batches, ok(10, 30), None)
    assert [(offset, error) for _, offset, error in verdict.completions] == [(10, None), (30, None)]
    core.release(SLOT, verdict.finished)
    batches = in_flight(core, clock, 2)
    verdict = core.on_answer(SLOT, batches, ok(base_offset=40), None)
    assert [offset for _, offset, _ in verdict.completions] == [40, 41]


def test_a_leader_that_cannot_name_the_new_leader_is_reported_leaderless() -> None:
    core, clock, _ = make()
    batches = in_flight(core, clock)
    verdict = core.on_answer(SLOT, batches, refused(pb.ErrorCode.NOT_ENOUGH_REPLICAS), None)
    assert verdict.retry and verdict.leaderless


def test_a_lost_connection_is_retried_until_the_delivery_timeout_then_fails_with_its_error() -> None:
    core, clock, _ = make(delivery_timeout_ms=1000)
    batches = in_flight(core, clock)
    lost = RequestTimedOutError("no answer")
    assert core.on_answer(SLOT, batches, None, lost).retry
    clock.now += 1.0
    (slot, again), = core.take_sendable()
    verdict = core.on_answer(slot, again, None, lost)
    assert not verdict.retry and verdict.completions == [(batches[0], -1, lost)]
    complete_all(verdict.completions)
    core.release(slot, verdict.finished)
    assert batches[0].outcome == (-1, lost)  # type: ignore[attr-defined]
    assert core.take_failures().records == 1 and core.failures.records == 0


def test_errors_that_retrying_cannot_fix_fail_at_once_typed_and_a_closed_producer_retries_nothing() -> None:
    core, clock, _ = make()
    batches = in_flight(core, clock)
    verdict = core.on_answer(SLOT, batches, refused(pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION), None)
    assert not verdict.retry and isinstance(verdict.completions[0][2], UnknownTopicOrPartitionError)
    core.release(SLOT, verdict.finished)
    offline = PartitionOfflineError("t-0: no replica answers", "t", 0)
    batches = in_flight(core, clock)
    assert core.on_answer(SLOT, batches, None, offline).completions[0][2] is offline
    core.release(SLOT, batches)
    batches = in_flight(core, clock)
    core.closed = True
    assert not core.on_answer(SLOT, batches, None, RequestTimedOutError("late")).retry


def test_one_oversized_batch_of_a_request_fails_alone_and_the_others_go_again_at_once_in_order() -> None:
    core, clock, _ = make()
    send(core, b"small")
    core.seal_all()
    send(core, b"x" * 5000)
    core.seal_all()
    send(core, b"after")
    core.seal_all()
    (slot, batches), = core.take_sendable()
    core.request_records(slot, batches)
    size = len(batches[1].data or b"")
    message = f"batch of {size} bytes exceeds max.message.bytes=1000; send smaller batches"
    verdict = core.on_answer(slot, batches, refused(pb.ErrorCode.RECORD_TOO_LARGE, message), None)
    assert not verdict.retry and verdict.finished == [batches[1]]
    error = verdict.completions[0][2]
    assert isinstance(error, RecordTooLargeError) and "a single record of" in str(error)
    complete_all(verdict.completions)
    core.release(slot, verdict.finished)
    (_, rest), = core.take_sendable()  # no backoff: they were not at fault
    assert rest == [batches[0], batches[2]]
    assert core.take_failures().records == 1


def test_acks_0_completes_without_offsets() -> None:
    core, clock, _ = make(acks=0)
    batches = in_flight(core, clock)
    complete_all(core.unacknowledged(batches))
    core.release(SLOT, batches)
    assert batches[0].outcome == (-1, None)  # type: ignore[attr-defined]
    assert core.unfinished == 0 and not core.has_work()
