"""Idempotent producers, as Kafka 3.x checks them: per producer id, its epoch and its last batches.

A producer stamps each batch with its producerId, producerEpoch and a per-partition baseSequence. The
leader checks every incoming batch against this table before proposing it (Broker.produce), in order:
- an epoch older than the one known is refused (INVALID_PRODUCER_EPOCH): a newer incarnation took over;
- a newer epoch must start at sequence 0, else OUT_OF_ORDER_SEQUENCE_NUMBER; it replaces what was known;
- a copy of one of the producer's last BATCHES_PER_PRODUCER (5) batches is a retry after a lost answer:
  it is answered with the offset of its first copy and not stored again;
- otherwise the batch must continue the last one (base sequence = last sequence + 1, modulo 2**31), else
  OUT_OF_ORDER_SEQUENCE_NUMBER: a gap means an earlier batch of a pipelining producer has not arrived (yet);
- a producer id the table does not know is accepted at any sequence. This is what Kafka 3.x does
  (ProducerAppendInfo: "If there is no current producer epoch ... accept writes with any sequence number"),
  not UNKNOWN_PRODUCER_ID: the table forgets producers (the size bound, the start-up scan's reach, a
  truncation), and refusing them then would fail producers that did nothing wrong.
A batch behind the window (older than the last 5, so its offset is no longer known) is answered as stored
long ago (errors.DuplicateSequence), as before: the dead-letter writer relies on it.

The table is derived from the log: every replica records the batches it appends, so a follower that
becomes leader already knows what its log holds, a truncation forgets what it removes, and start-up
rebuilds it from the log's tail. The leader also records a batch when it proposes it, so a check sees
batches proposed and not yet committed: a producer may have up to 5 requests in flight per partition.

Everything here is O(1) per batch (at most 5 comparisons); MAX_PRODUCERS bounds the table per partition.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import NamedTuple, Protocol

from logbroker_client import records as rec

BATCHES_PER_PRODUCER = 5  # Kafka's window: the producer keeps at most 5 requests in flight per partition
MAX_PRODUCERS = 2_000  # per partition: at most 2,000 x 5 small tuples
SEQUENCE_MASK = 0x7FFFFFFF  # sequences are 31-bit and wrap, as in Kafka
_HALF_SEQUENCE_SPACE = 1 << 30
SCAN_OFFSETS = 200_000  # how far back start-up looks for producer sequences
SCAN_BYTES = 4 << 20  # read at a time by that scan


class StoredBatch(NamedTuple):
    epoch: int
    base_sequence: int
    last_sequence: int
    base_offset: int
    last_offset: int


class Outcome(enum.Enum):
    APPEND = "append"
    DUPLICATE = "duplicate"  # a retry of a batch in the window: answer with its first copy's offsets
    STORED_LONG_AGO = "stored long ago"  # behind the window: stored, offset unknown
    OUT_OF_ORDER = "out of order"  # a gap, or a new epoch not starting at 0
    FENCED_EPOCH = "fenced epoch"  # older than the producer's known epoch


class SequenceVerdict(NamedTuple):
    """What to do with an incoming batch, and what the table expected (for the refusal's message)."""

    outcome: Outcome
    duplicate_of: StoredBatch | None = None
    known_epoch: int = -1
    expected_sequence: int = -1


APPEND = SequenceVerdict(Outcome.APPEND)


class BatchIdentity(NamedTuple):
    producer_id: int
    epoch: int
    base_sequence: int
    record_count: int

    @property
    def idempotent(self) -> bool:
        return self.producer_id >= 0 and self.base_sequence >= 0

    @property
    def last_sequence(self) -> int:
        return (self.base_sequence + self.record_count - 1) & SEQUENCE_MASK


class ProducerStateTable:
    def __init__(self, max_producers: int = MAX_PRODUCERS) -> None:
        # Each producer's kept batches, oldest first, all of its newest epoch; least recently heard first.
        self._producers: OrderedDict[int, deque[StoredBatch]] = OrderedDict()
        self._max_producers = max_producers

    def __len__(self) -> int:
        return len(self._producers)

    def epoch_of(self, producer_id: int) -> int | None:
        batches = self._producers.get(producer_id)
        return batches[-1].epoch if batches else None

    def check(self, batch: BatchIdentity) -> SequenceVerdict:
        """Is this batch next, a retry, or refused? Reads the table only."""
        if not batch.idempotent:
            return APPEND
        kept = self._producers.get(batch.producer_id)
        if not kept:
            return APPEND
        return _verdict(batch, kept[-1].epoch, kept[-1].last_sequence, kept)

    def check_request(self, batches: Iterable[BatchIdentity]) -> list[SequenceVerdict]:
        """check() each batch of one request in order, as if the ones accepted before it were stored: a
        request may carry several consecutive batches of one producer."""
        verdicts = []
        accepted: dict[int, tuple[int, int]] = {}  # producer id -> (epoch, last sequence) accepted so far
        for batch in batches:
            if batch.producer_id in accepted and batch.idempotent:
                epoch, last_sequence = accepted[batch.producer_id]
                verdict = _verdict(batch, epoch, last_sequence, self._producers.get(batch.producer_id, ()))
            else:
                verdict = self.check(batch)
            if verdict.outcome is Outcome.APPEND and batch.idempotent:
                accepted[batch.producer_id] = (batch.epoch, batch.last_sequence)
            verdicts.append(verdict)
        return verdicts

    def record(self, batch: BatchIdentity, base_offset: int, last_offset: int) -> None:
        """Learn a batch the log holds (or the leader just proposed). The same batch may come twice (the
        leader records at propose time and again once persisted): offsets only grow, so a batch not past
        the newest kept one is already known."""
        if not batch.idempotent:
            return
        kept = self._producers.get(batch.producer_id)
        if kept is None:
            kept = self._producers[batch.producer_id] = deque(maxlen=BATCHES_PER_PRODUCER)
            if len(self._producers) > self._max_producers:
                self._producers.popitem(last=False)  # the producer heard from least recently
        else:
            self._producers.move_to_end(batch.producer_id)
        if kept:
            if last_offset <= kept[-1].last_offset or batch.epoch < kept[-1].epoch:
                return
            if batch.epoch > kept[-1].epoch:
                kept.clear()  # a new epoch starts over: its sequences begin again at 0
        kept.append(StoredBatch(batch.epoch, batch.base_sequence, batch.last_sequence, base_offset, last_offset))

    def truncate(self, offset: int) -> None:
        """Forget batches at or past offset (the log was cut there). O(producers): truncations are rare."""
        for producer_id in list(self._producers):
            kept = self._producers[producer_id]
            while kept and kept[-1].last_offset >= offset:
                kept.pop()
            if not kept:
                del self._producers[producer_id]

    def clear(self) -> None:
        self._producers.clear()


def _verdict(batch: BatchIdentity, epoch: int, last_sequence: int,
             kept: Iterable[StoredBatch]) -> SequenceVerdict:
    if batch.epoch < epoch:
        return SequenceVerdict(Outcome.FENCED_EPOCH, known_epoch=epoch)
    if batch.epoch > epoch:
        if batch.base_sequence == 0:
            return APPEND
        return SequenceVerdict(Outcome.OUT_OF_ORDER, known_epoch=epoch, expected_sequence=0)
    expected = (last_sequence + 1) & SEQUENCE_MASK
    if batch.base_sequence == expected:
        return APPEND
    last = batch.last_sequence
    for stored in kept:
        if stored.epoch == batch.epoch and stored.base_sequence == batch.base_sequence \
                and stored.last_sequence == last:
            return SequenceVerdict(Outcome.DUPLICATE, duplicate_of=stored)
    # How far past the expected sequence this batch starts, modulo the wrap: "behind" (the upper half of
    # the space) means written before the window, and we no longer know where.
    ahead = (batch.base_sequence - expected) & SEQUENCE_MASK
    if ahead >= _HALF_SEQUENCE_SPACE:
        return SequenceVerdict(Outcome.STORED_LONG_AGO, known_epoch=epoch, expected_sequence=expected)
    return SequenceVerdict(Outcome.OUT_OF_ORDER, known_epoch=epoch, expected_sequence=expected)


class ReadableLog(Protocol):
    @property
    def log_start_offset(self) -> int: ...

    @property
    def log_end_offset(self) -> int: ...

    def read(self, offset: int, max_bytes: int) -> bytes: ...


def rebuild_from_log(log: ReadableLog, table: ProducerStateTable) -> None:
    """Re-learn recent producer sequences and epochs from the log's tail (batch headers only)."""
    offset = max(log.log_start_offset, log.log_end_offset - SCAN_OFFSETS)
    while offset < log.log_end_offset:
        data = log.read(offset, SCAN_BYTES)
        if not data:
            break
        for pos, header in rec.iter_batch_headers(data):
            offset = header.base_offset + header.last_offset_delta + 1
            if not header.attributes & rec.CONTROL_FLAG:
                table.record(BatchIdentity(*rec.producer_fields(data, pos)), header.base_offset, offset - 1)
