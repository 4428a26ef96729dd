"""Idempotent producers: recognise a retried batch and answer with the offset it was stored at.

A producer stamps each batch with its producerId and a per-partition baseSequence. A retry after a
lost answer (a leader killed between commit and reply) carries the same pair; without this table it
would be stored twice. The table is derived from the log: every replica records the batches it
appends, so a follower that becomes leader already knows what its log holds, and a truncation forgets
what it removes. It is rebuilt from the log's tail at start-up.

Only the last BATCHES_PER_PRODUCER batches of each producer are kept. A producer has one request in flight
per partition and puts at most MAX_BATCHES_PER_REQUEST batches in it (logbroker_client.producer), so a
retry's batches are always among them; the window is twice that, for a retry regrouped with newer batches.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import NamedTuple

BATCHES_PER_PRODUCER = 32
MAX_PRODUCERS = 2_000  # per partition: at most 2,000 x 32 small tuples
SEQUENCE_MASK = 0x7FFFFFFF  # sequences are 31-bit and wrap, as in Kafka
_HALF_SEQUENCE_SPACE = 1 << 30


class StoredBatch(NamedTuple):
    base_sequence: int
    last_sequence: int
    base_offset: int
    last_offset: int


class SequenceVerdict(NamedTuple):
    """What to do with an incoming batch: append it, or answer with where its earlier copy lives."""

    duplicate_of: StoredBatch | None
    already_written_unknown_offset: bool = False


APPEND = SequenceVerdict(None)


class ProducerStateTable:
    def __init__(self, max_producers: int = MAX_PRODUCERS) -> None:
        self._producers: OrderedDict[int, deque[StoredBatch]] = OrderedDict()
        self._max_producers = max_producers

    def __len__(self) -> int:
        return len(self._producers)

    def check(self, producer_id: int, base_sequence: int, record_count: int) -> SequenceVerdict:
        """Is this batch new? O(1): at most BATCHES_PER_PRODUCER comparisons."""
        if producer_id < 0 or base_sequence < 0:
            return APPEND  # not an idempotent producer
        batches = self._producers.get(producer_id)
        if not batches:
            return APPEND
        last_sequence = (base_sequence + record_count - 1) & SEQUENCE_MASK
        for stored in batches:
            if stored.base_sequence == base_sequence and stored.last_sequence == last_sequence:
                return SequenceVerdict(stored)
        # How far past the newest kept batch this one starts, modulo the wrap: the producer only moves forward,
        # so "behind" (the upper half of the space) means written long ago, and we no longer know where.
        ahead = (base_sequence - batches[-1].last_sequence - 1) & SEQUENCE_MASK
        if ahead >= _HALF_SEQUENCE_SPACE:
            return SequenceVerdict(None, already_written_unknown_offset=True)
        return APPEND

    def record(self, producer_id: int, base_sequence: int, record_count: int, base_offset: int,
               last_offset: int) -> None:
        if producer_id < 0 or base_sequence < 0:
            return
        batches = self._producers.get(producer_id)
        if batches is None:
            batches = self._producers[producer_id] = deque(maxlen=BATCHES_PER_PRODUCER)
            if len(self._producers) > self._max_producers:
                self._producers.popitem(last=False)  # the producer heard from least recently
        else:
            self._producers.move_to_end(producer_id)
        if batches and batches[-1].base_sequence == base_sequence:
            return  # the leader records at propose time and again when it persists
        last_sequence = (base_sequence + record_count - 1) & SEQUENCE_MASK
        batches.append(StoredBatch(base_sequence, last_sequence, base_offset, last_offset))

    def truncate(self, offset: int) -> None:
        """Forget batches at or past offset (the log was cut there)."""
        for producer_id in list(self._producers):
            kept = deque((b for b in self._producers[producer_id] if b.last_offset < offset),
                         maxlen=BATCHES_PER_PRODUCER)
            if kept:
                self._producers[producer_id] = kept
            else:
                del self._producers[producer_id]

    def clear(self) -> None:
        self._producers.clear()
