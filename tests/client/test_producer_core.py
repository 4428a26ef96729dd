"""The producer's core (producer_core.py) fed with hand-made answers: no broker, no thread, no event loop."""

from __future__ import annotations

from typing import Any

import pytest
from logbroker_client import records as rec
from logbroker_client.errors import (
    NotLeaderError,
    OutOfOrderSequenceError,
    PartitionOfflineError,
    RecordTooLargeError,
    RequestTimedOutError,
    UnknownTopicOrPartitionError,
)
from logbroker_client.producer_core import (
    DEFAULT_MAX_IN_FLIGHT,
    RETRY_BACKOFF_MS,
    CoreBatch,
    ProducerCore,
    complete_all,
    partition_count_stale,
    requests_by_leader,
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


def make(first_batch_stored: bool = True, **options: Any) -> tuple[ProducerCore, Clock, list[int]]:
    """A core for SLOT; by default one whose first batch of the epoch was stored, so its pipeline is open (a
    fresh partition sends one batch at a time until then: tested on its own)."""
    clock = Clock()
    wakes: list[int] = []
    core = ProducerCore(new_batch=Batch, new_future=lambda batch, index, ts: (batch, index, ts),
                        wake=lambda: wakes.append(1), clock=clock, producer_id=77, **options)
    if first_batch_stored:
        core.confirmed.add(SLOT)
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


def epochs_and_sequences(data: bytes) -> list[tuple[int, int]]:
    return [(header.producer_epoch, header.base_sequence) for _, header in rec.iter_batch_headers(data)]


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


def test_partition_counts_older_than_the_max_age_are_forgotten_so_send_asks_again() -> None:
    core, _, _ = make()
    core.set_partition_count("t", 3, now_s=10.0)
    core.set_partition_count("u", 1, now_s=12.0)
    assert not partition_count_stale(core.partition_counts.get("t"), None)
    assert partition_count_stale(core.partition_counts.get("t"), 3)  # beyond the count: partitions were added
    core.forget_old_partition_counts(max_age_s=1.5, now_s=12.0)
    assert "t" not in core.partition_counts and core.partition_counts["u"] == 1
    assert partition_count_stale(core.partition_counts.get("t"), None) and "t" in core.counts_asked_s


# ------------------------------------------------------------------------------------------ sending

def sealed(core: ProducerCore, clock: Clock, batches: int) -> None:
    for _ in range(batches):
        send(core, b"v")
        core.seal_all()


def entries(core: ProducerCore) -> list[list[CoreBatch]]:
    """What take_sendable hands out for SLOT: at most one entry of the partition per call."""
    taken = core.take_sendable()
    assert all(slot == SLOT for slot, _ in taken) and len(taken) <= 1
    return [batches for _, batches in taken]


def entry(core: ProducerCore) -> list[CoreBatch]:
    (batches,) = entries(core)
    return batches


def answer(core: ProducerCore, batches: list[CoreBatch], result: pb.PartitionProduceResult | None,
           error: Any = None) -> Any:
    verdict = core.on_answer(SLOT, batches, result, error)
    complete_all(verdict.completions)
    core.release(SLOT, verdict.finished)
    return verdict


def test_a_partitions_new_batches_travel_in_one_entry_and_at_most_five_are_in_flight() -> None:
    core, clock, _ = make()
    sealed(core, clock, 2)
    first = entry(core)  # both ready batches, one entry, consecutive sequences
    assert len(first) == 2 and sequences(core.request_records(SLOT, first)) == [(77, 0), (77, 1)]
    sealed(core, clock, DEFAULT_MAX_IN_FLIGHT)
    second = entry(core)  # only three more fit in the window of five batches
    assert len(second) == 3 and sequences(core.request_records(SLOT, second)) == [(77, 2), (77, 3), (77, 4)]
    assert entries(core) == [] and len(core.ready[SLOT]) == 2  # five in flight
    answer(core, first, ok(0, 1))  # two batches answered: two more may go
    third = entry(core)
    assert sequences(core.request_records(SLOT, third)) == [(77, 5), (77, 6)]
    assert [b.outcome for b in first] == [(0, None), (1, None)]  # type: ignore[attr-defined]


def test_a_slow_oldest_batch_holds_the_window_so_its_retry_stays_within_the_brokers_last_five() -> None:
    core, clock, _ = make()
    oldest_and_later = []
    for _ in range(DEFAULT_MAX_IN_FLIGHT):  # one batch per request: five requests in flight
        sealed(core, clock, 1)
        oldest_and_later.append(entry(core))
    oldest, later = oldest_and_later[0], oldest_and_later[1:]
    for offset, batches in enumerate(later, start=1):  # gRPC answers them first; the oldest's answer is slow
        answer(core, batches, ok(offset))
    sealed(core, clock, 3)
    # Five batches are unanswered no more, yet none may go: a retry of the oldest must find it among the
    # broker's last five batches, so nothing goes more than four batches past it.
    assert entries(core) == []
    answer(core, oldest, ok(0))
    assert len(entry(core)) == 3


def test_until_one_batch_of_the_epoch_is_stored_the_partition_sends_one_at_a_time() -> None:
    core, clock, _ = make(first_batch_stored=False)
    sealed(core, clock, 3)
    first = entry(core)
    assert len(first) == 1 and entries(core) == []  # a later batch must not overtake the first one
    answer(core, first, refused(pb.ErrorCode.NOT_LEADER))
    clock.now += RETRY_BACKOFF_MS / 1000
    assert entry(core) == first  # the retry, alone
    answer(core, first, ok(0))
    assert len(entry(core)) == 2  # stored: the pipeline opens


def test_an_entry_stays_within_max_request_bytes_and_the_next_batch_waits_for_the_next_request() -> None:
    core, clock, _ = make(max_request_bytes=250)
    for value in (b"x" * 100, b"y" * 100, b"z" * 100):
        send(core, value)
        core.seal_all()
    one = entry(core)  # two batches of about 180 bytes do not fit in 250
    assert len(one) == 1
    two = entry(core)  # the window has room: the next one goes in the next request
    assert len(two) == 1 and sequences(core.request_records(SLOT, one + two)) == [(77, 0), (77, 1)]


def test_a_lingering_batch_keeps_taking_records_while_the_window_is_full_and_goes_once_there_is_room() -> None:
    core, clock, _ = make(linger_ms=5, max_in_flight_requests_per_connection=1)
    send(core, b"a")
    clock.now += 0.005
    core.seal_lingering()
    first = entry(core)
    lingering = send(core, b"b")[0]
    clock.now += 0.010
    core.seal_lingering()  # past linger_ms, but the window is full: it stays open
    assert core.open[SLOT] is lingering and entries(core) == []
    assert send(core, b"c")[0] is lingering  # and takes more records
    answer(core, first, ok(0))
    core.seal_lingering()  # room now: sealed and sent
    assert entry(core) == [lingering] and lingering.builder.count == 2


def test_a_lingering_batch_is_not_sealed_during_a_backoff() -> None:
    core, clock, _ = make(linger_ms=0)
    sealed(core, clock, 1)
    batches = entry(core)
    assert core.on_answer(SLOT, batches, refused(pb.ErrorCode.NOT_LEADER), None).retry
    lingering = send(core, b"b")[0]
    core.seal_lingering()
    assert core.open[SLOT] is lingering
    clock.now += RETRY_BACKOFF_MS / 1000
    core.seal_lingering()
    assert list(core.ready[SLOT]) == [batches[0], lingering]


def test_retries_go_back_in_sequence_order_and_reach_the_new_leader_one_at_a_time() -> None:
    core, clock, _ = make()
    sealed(core, clock, 2)
    first = entry(core)
    send(core, b"a")
    send(core, b"b")
    core.seal_all()  # a third batch of two records, in an entry of its own
    second = entry(core)
    batches = first + second
    datas = [core.request_records(SLOT, [b]) for b in batches]
    assert [sequences(d) for d in datas] == [[(77, 0)], [(77, 1)], [(77, 2)]]
    # The leader died: the answers come back in any order.
    for lost in (second, first):
        verdict = core.on_answer(SLOT, lost, refused(pb.ErrorCode.NOT_LEADER, leader="b2:9092"), None)
        assert verdict.retry and verdict.refresh_metadata and verdict.completions == []
        assert isinstance(verdict.error, NotLeaderError)
    sealed(core, clock, 1)  # a new batch waits behind the retries
    assert entries(core) == []  # backing off
    clock.now += RETRY_BACKOFF_MS / 1000
    for expected, data in zip(batches[:-1], datas, strict=False):
        again = entry(core)  # alone: the next retry (and the new batch) waits for this one's answer
        assert again == [expected] and entries(core) == []
        assert core.request_records(SLOT, again) == data and expected.attempts == 2
        answer(core, again, ok(5))
    last = entry(core)
    assert last == [batches[-1]] and core.request_records(SLOT, last) == datas[-1]
    later = entry(core)  # no retry left queued: the new batch follows the last retry in flight
    assert sequences(core.request_records(SLOT, later)) == [(77, 4)]
    assert core.in_flight[SLOT] == [batches[-1], *later]


def test_a_batch_that_overtook_an_earlier_one_is_resent_after_it_without_asking_for_metadata() -> None:
    core, clock, _ = make()
    sealed(core, clock, 1)
    first = entry(core)
    sealed(core, clock, 2)
    overtaking = entry(core)
    core.request_records(SLOT, first + overtaking)
    gap = core.on_answer(SLOT, overtaking, refused(pb.ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER, "expected 0"), None)
    assert gap.retry and not gap.refresh_metadata and isinstance(gap.error, OutOfOrderSequenceError)
    assert entries(core) == []  # the first is still in flight
    answer(core, first, ok(0))
    assert core.resetting == set()
    for expected in overtaking:
        again = entry(core)
        assert again == [expected] and sequences(core.request_records(SLOT, again))[0][1] == expected.sequence
        answer(core, again, ok(1))
    assert core.unfinished == 0


def test_a_batch_failed_for_good_makes_the_partition_start_a_new_epoch_at_sequence_zero() -> None:
    core, clock, _ = make()
    sealed(core, clock, 1)
    first = entry(core)
    sealed(core, clock, 2)
    rest = entry(core)
    core.request_records(SLOT, first + rest)
    message = "batch of 2000 bytes exceeds max.message.bytes=1000; send smaller batches"
    verdict = answer(core, first, refused(pb.ErrorCode.RECORD_TOO_LARGE, message))
    assert not verdict.retry and isinstance(verdict.completions[0][2], RecordTooLargeError)
    # The broker refuses the rest: the sequence before theirs never arrives.
    assert core.on_answer(SLOT, rest, refused(pb.ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER), None).retry
    # Numbered afresh under the next epoch, one at a time until the epoch's first batch is stored.
    renumbered = entry(core)
    assert renumbered == rest[:1] and entries(core) == []
    assert epochs_and_sequences(core.request_records(SLOT, renumbered)) == [(1, 0)]
    answer(core, renumbered, ok(0))
    last = entry(core)
    assert last == rest[1:] and epochs_and_sequences(core.request_records(SLOT, last)) == [(1, 1)]
    answer(core, last, ok(1))
    assert core.take_failures().records == 1 and core.unfinished == 0


def test_an_entry_refused_as_too_large_is_resent_batch_by_batch_so_only_the_one_at_fault_fails() -> None:
    core, clock, _ = make()
    for value in (b"a", b"b" * 500, b"c"):
        send(core, value)
        core.seal_all()
    batches = entry(core)
    core.request_records(SLOT, batches)
    too_large = len(batches[1].data or b"")
    message = f"batch of {too_large} bytes exceeds max.message.bytes=300; send smaller batches"
    split = core.on_answer(SLOT, batches, refused(pb.ErrorCode.RECORD_TOO_LARGE, message), None)
    assert split.retry and not split.refresh_metadata and split.completions == []
    assert entry(core) == [batches[0]]  # no backoff: the first goes again at once, alone
    assert entries(core) == [] and core.in_flight[SLOT] == [batches[0]]
    answer(core, [batches[0]], ok(0))
    assert entry(core) == [batches[1]]
    failed = answer(core, [batches[1]], refused(pb.ErrorCode.RECORD_TOO_LARGE, message))
    assert not failed.retry and isinstance(failed.completions[0][2], RecordTooLargeError)
    last = entry(core)  # after the hole: a new epoch from sequence 0
    assert last == [batches[2]] and epochs_and_sequences(core.request_records(SLOT, last)) == [(1, 0)]
    answer(core, last, ok(2))
    assert [b.outcome[0] for b in batches] == [0, -1, 2]  # type: ignore[attr-defined]
    assert core.take_failures().records == 1


def test_an_out_of_order_answer_with_nothing_earlier_pending_starts_a_new_epoch() -> None:
    """An acks=1 leader lost acknowledged batches in a failover: the new one expects an older sequence."""
    core, clock, _ = make(acks=1)
    sealed(core, clock, 1)
    batches = entry(core)
    core.request_records(SLOT, batches)
    assert core.on_answer(SLOT, batches, refused(pb.ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER), None).retry
    again = entry(core)
    assert epochs_and_sequences(core.request_records(SLOT, again)) == [(1, 0)]


def test_requests_carry_one_entry_of_each_partition_a_leader_leads() -> None:
    core, clock, _ = make()
    for partition in (0, 1, 2):
        send(core, b"v", partition=partition, count=3)
        core.seal_all()
    send(core, b"w", partition=0, count=3)
    core.seal_all()
    leaders = {0: "a", 1: "a", 2: "b"}
    items = [(slot, batches, leaders[slot[1]]) for slot, batches in core.take_sendable()]
    assert [(slot[1], len(batches)) for slot, batches, _ in items] == [(0, 2), (1, 1), (2, 1)]
    grouped = requests_by_leader(items, core.max_request_bytes)
    shape = [(leader, [slot[1] for slot, _ in parts]) for leader, parts in grouped]
    assert shape == [("a", [0, 1]), ("b", [2])]
    assert len(requests_by_leader(items, 1)) == 3  # no room for two entries in one request


def test_without_answers_or_idempotence_one_batch_of_a_partition_is_in_flight() -> None:
    for options in ({"acks": 0}, {"enable_idempotence": False}):
        core, clock, _ = make(**options)
        sealed(core, clock, 3)
        batches = entry(core)
        assert len(batches) == 1 and sequences(core.request_records(SLOT, batches)) == [(-1, -1)]
        assert core.take_sendable() == []


def test_max_in_flight_is_checked() -> None:
    with pytest.raises(ValueError, match="max_in_flight_requests_per_connection must be 1..5"):
        make(max_in_flight_requests_per_connection=6)


def test_without_idempotence_batches_carry_no_producer_id() -> None:
    core, clock, _ = make(enable_idempotence=False)
    sealed(core, clock, 1)
    (slot, batches), = core.take_sendable()
    assert sequences(core.request_records(slot, batches)) == [(-1, -1)]


# ------------------------------------------------------------------------------------------ answers

def in_flight(core: ProducerCore, clock: Clock, batches: int = 1) -> list[CoreBatch]:
    sealed(core, clock, batches)
    taken = entry(core)
    core.request_records(SLOT, taken)
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
    again = entry(core)
    slot = SLOT
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


def test_acks_0_completes_without_offsets() -> None:
    core, clock, _ = make(acks=0)
    batches = in_flight(core, clock)
    complete_all(core.unacknowledged(batches))
    core.release(SLOT, batches)
    assert batches[0].outcome == (-1, None)  # type: ignore[attr-defined]
    assert core.unfinished == 0 and not core.has_work()
