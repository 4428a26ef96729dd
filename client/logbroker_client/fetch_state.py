"""What a consumer knows about its partitions, without any I/O: shared by Consumer and AsyncConsumer.

For each assigned partition: the position (the next offset poll() hands out), the offset to fetch next
(ahead of the position while fetched records wait in the buffer), a generation bumped by every seek so
that answers to fetches sent before it are dropped, and whether it is paused. Fetched bytes are checked
(CRC-32C, as Kafka's check.crcs) and decoded here; control batches are stepped over, so a position moves
past a leader's no-op batch at the log end and a group's lag reaches 0. The I/O layers send the fetches
this module asks for, hand their answers back, and resolve positions it reports missing (offset reset).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any, NamedTuple

from logbroker_client import records as rec
from logbroker_client.errors import (
    CorruptBatchError,
    LogbrokerError,
    NotLeaderError,
    OffsetOutOfRangeError,
    error_for,
)
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.types import ConsumerRecord, TopicPartition

EARLIEST = -2  # ListOffsets' timestamp for the log start
LATEST = -1  # ListOffsets' timestamp for the high watermark
RESETS: dict[str, int | None] = {"earliest": EARLIEST, "latest": LATEST, "none": None}


def reset_policy(auto_offset_reset: str) -> int | None:
    """The ListOffsets timestamp a position without a committed offset starts from (None: raise instead)."""
    if auto_offset_reset not in RESETS:
        raise ValueError(f"auto_offset_reset must be one of {sorted(RESETS)}, got {auto_offset_reset!r}")
    return RESETS[auto_offset_reset]


def partition_names(tps: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}-{tp.partition}" for tp in sorted(tps))


def decode_batch(tp: TopicPartition, data: bytes, pos: int, header: rec.BatchHeader, start: int,
                 out: list[ConsumerRecord], check_crc: bool) -> None:
    """Append the records of the fetched batch at pos from offset start on to out.

    A batch that cannot be read (damaged bytes, or records that contradict its header, as an older broker
    stored them) appends nothing and raises CorruptBatchError naming it and the seek that skips it."""
    try:
        if check_crc:
            check_batch_crc(data, pos, header)
        rec.decode_records(data, pos, header, tp.topic, tp.partition, start, out)
    except rec.CorruptBatchError as exc:
        last = header.base_offset + header.last_offset_delta
        raise CorruptBatchError(
            f"{tp.topic}-{tp.partition}: the batch at offset {header.base_offset} (offsets {header.base_offset}.."
            f"{last}) cannot be read: {exc}; skip it with seek(TopicPartition({tp.topic!r}, {tp.partition}), "
            f"{last + 1})", tp.topic, tp.partition) from None


def check_batch_crc(data: bytes, pos: int, header: rec.BatchHeader) -> None:
    """As Kafka's check.crcs: bytes damaged on a broker's disk or on the way are refused, never decoded."""
    end = pos + header.batch_length + rec.LOG_OVERHEAD
    if rec.crc32c(memoryview(data)[pos + rec.CRC_START:end]) != header.crc:
        raise rec.CorruptBatchError("it fails its CRC check, so the broker's copy is damaged (after a leader "
                                    "change another replica may serve an intact one)")


class Chunk(NamedTuple):
    """Fetched records of one partition, and the offset after the last batch they came in."""

    tp: TopicPartition
    records: list[ConsumerRecord]
    next_offset: int


class PendingFetch:
    """A Fetch request in flight: where it went, the offsets it asked for, and the generations they had.
    `handle` is the I/O layer's own (a gRPC future, an asyncio task)."""

    __slots__ = ("address", "offsets", "generations", "handle")

    def __init__(self, address: str, offsets: dict[TopicPartition, int],
                 generations: dict[TopicPartition, int]) -> None:
        self.address = address
        self.offsets = offsets
        self.generations = generations
        self.handle: Any = None


class FetchOutcome(Enum):
    """What the I/O layer does after a partition's fetch answer was taken in."""

    DONE = "done"
    FIND_LEADER = "find leader"  # leadership moved: refresh the topic's metadata, fetch again


class FetchState:
    def __init__(self, reset: int | None, check_crcs: bool = True) -> None:
        self.reset = reset
        self.check_crcs = check_crcs
        self.assigned: list[TopicPartition] = []
        self.positions: dict[TopicPartition, int] = {}  # next offset poll() returns
        self.fetch_offsets: dict[TopicPartition, int] = {}  # next offset to fetch
        self.generations: dict[TopicPartition, int] = {}  # bumped by seek: stale answers are dropped
        self.paused: set[TopicPartition] = set()
        self.buffer: deque[Chunk] = deque()
        self.in_flight: list[PendingFetch] = []

    # ------------------------------------------------------------------------------ assignment

    def assign(self, partitions: Iterable[TopicPartition]) -> list[TopicPartition]:
        """Replace the assignment; returns the partitions new to it."""
        wanted = list(dict.fromkeys(partitions))
        added = [tp for tp in wanted if tp not in self.assigned]
        self.remove(set(self.assigned) - set(wanted))
        self.assigned = wanted
        return added

    def add(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            if tp not in self.assigned:
                self.assigned.append(tp)

    def remove(self, partitions: Iterable[TopicPartition]) -> None:
        gone = set(partitions)
        if not gone:
            return
        self.assigned = [tp for tp in self.assigned if tp not in gone]
        for tp in gone:
            self.positions.pop(tp, None)
            self.fetch_offsets.pop(tp, None)
            self.generations[tp] = self.generations.get(tp, 0) + 1  # answers in flight for it are dropped
        self.paused -= gone
        self._drop_buffered(lambda tp: tp in gone)

    def require_assigned(self, partition: TopicPartition) -> TopicPartition:
        tp = TopicPartition(*partition)
        if tp not in self.assigned:
            raise LogbrokerError(f"{tp.topic}-{tp.partition} is not assigned to this consumer; assign() it "
                                 "first (or, in a group, wait until the coordinator assigns it)")
        return tp

    # --------------------------------------------------------------------------------- positions

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset
        self.fetch_offsets[tp] = offset
        self.generations[tp] = self.generations.get(tp, 0) + 1
        self._drop_buffered(lambda other: other == tp)

    def forget_position(self, tp: TopicPartition) -> None:
        """The position is out of the log's range: resolve it again by the reset policy."""
        self.positions.pop(tp, None)
        self.fetch_offsets.pop(tp, None)
        self.generations[tp] = self.generations.get(tp, 0) + 1
        self._drop_buffered(lambda other: other == tp)

    def missing_positions(self) -> list[TopicPartition]:
        return [tp for tp in self.assigned if tp not in self.positions]

    def reset_timestamp(self, tps: Iterable[TopicPartition]) -> int:
        """The ListOffsets timestamp that resolves missing positions, or an error when the policy is 'none'."""
        if self.reset is None:
            raise OffsetOutOfRangeError(
                f"no position for {partition_names(tps)} and auto_offset_reset='none'; seek() first")
        return self.reset

    def consumed(self) -> dict[TopicPartition, int]:
        """The position of every assigned partition that has one: what poll() has handed out up to."""
        return {tp: self.positions[tp] for tp in self.assigned if tp in self.positions}

    def _drop_buffered(self, drop: Callable[[TopicPartition], bool]) -> None:
        self.buffer = deque(chunk for chunk in self.buffer if not drop(chunk.tp))

    # ------------------------------------------------------------------------------------ records

    def take(self, limit: int) -> list[ConsumerRecord]:
        """Up to limit buffered records of unpaused partitions; their positions move past them."""
        out: list[ConsumerRecord] = []
        held: list[Chunk] = []  # chunks of paused partitions, and a partly taken one
        positions = self.positions
        while self.buffer and len(out) < limit:
            chunk = self.buffer.popleft()
            if chunk.tp in self.paused:
                held.append(chunk)
                continue
            room = limit - len(out)
            records = chunk.records
            if len(records) > room:
                held.append(Chunk(chunk.tp, records[room:], chunk.next_offset))
                out.extend(records[:room])
                positions[chunk.tp] = records[room - 1].offset + 1
            else:
                out.extend(records)
                positions[chunk.tp] = chunk.next_offset  # past any control batches after the last record, too
        self.buffer.extendleft(reversed(held))
        return out

    def has_buffered(self) -> bool:
        return any(chunk.tp not in self.paused for chunk in self.buffer)

    def fetchable(self) -> list[TopicPartition]:
        return [tp for tp in self.assigned if tp not in self.paused]

    def to_fetch(self) -> list[tuple[TopicPartition, int]]:
        """(partition, offset) for every partition with a position, nothing buffered and no fetch in flight."""
        busy = {tp for fetch in self.in_flight for tp in fetch.offsets}
        buffered = {chunk.tp for chunk in self.buffer}
        return [(tp, self.fetch_offsets[tp]) for tp in self.assigned
                if tp not in busy and tp not in buffered and tp not in self.paused and tp in self.fetch_offsets]

    def begin_fetch(self, address: str, offsets: dict[TopicPartition, int]) -> PendingFetch:
        fetch = PendingFetch(address, offsets, {tp: self.generations.get(tp, 0) for tp in offsets})
        self.in_flight.append(fetch)
        return fetch

    def end_fetch(self, fetch: PendingFetch) -> None:
        if fetch in self.in_flight:
            self.in_flight.remove(fetch)

    def absorb(self, fetch: PendingFetch, result: pb.PartitionFetchResult) -> FetchOutcome:
        """Take in one partition's answer: buffer its records, step over control batches, or say what to do.
        Raises the partition's error when waiting will not help (and CorruptBatchError at a broken batch)."""
        tp = TopicPartition(result.topic, result.partition)
        if fetch.generations.get(tp) != self.generations.get(tp, 0) or tp not in self.fetch_offsets:
            return FetchOutcome.DONE  # a seek or reassignment happened after this fetch was sent
        if result.error_code:
            return self._on_error(tp, result)
        if result.records:
            self._take_in(tp, fetch.offsets[tp], result.records)
        return FetchOutcome.DONE

    def _take_in(self, tp: TopicPartition, start: int, data: bytes) -> None:
        records: list[ConsumerRecord] = []
        next_offset = start
        try:
            for pos, header in rec.iter_batch_headers(data):
                last = header.base_offset + header.last_offset_delta
                if last < start:
                    continue
                if not header.attributes & rec.CONTROL_FLAG:
                    decode_batch(tp, data, pos, header, start, records, self.check_crcs)
                next_offset = last + 1
        except CorruptBatchError:
            if not records:  # the position is at the broken batch: the error names the seek past it
                raise
            # Hand out the records before it first; the next fetch starts at the broken batch and raises then.
        self.fetch_offsets[tp] = next_offset
        if records:
            self.buffer.append(Chunk(tp, records, next_offset))
        elif self.positions.get(tp, next_offset) < next_offset and not any(c.tp == tp for c in self.buffer):
            self.positions[tp] = next_offset  # only control batches: step over them

    def _on_error(self, tp: TopicPartition, result: pb.PartitionFetchResult) -> FetchOutcome:
        error = error_for(result.error_code, result.error_message, tp.topic, tp.partition)
        if isinstance(error, OffsetOutOfRangeError) and self.reset is not None:
            self.forget_position(tp)
            return FetchOutcome.DONE
        if isinstance(error, NotLeaderError) or error.retriable:
            return FetchOutcome.FIND_LEADER
        raise error
