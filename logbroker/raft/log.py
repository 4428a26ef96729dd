"""The node's view of its log: the durable part (read through LogStorage) plus an unstable tail.

Entries the node appends go to the unstable tail first and are handed to the runtime in a Ready. Until the
runtime has applied that Ready (advance()), storage may be behind or hold entries the node has already cut,
so reads below ``_unstable_offset`` go to storage and reads at or above it go to the tail. A truncation or
reset that reaches into storage is remembered until it is handed out, so the runtime can repeat it.

Durability is tracked separately: ``durable_offset`` is what the runtime has reported fsynced through
``mark_durable``; only that counts for the leader's own vote in the commit quorum.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from logbroker.raft.errors import RaftInternalError, check
from logbroker.raft.membership import Membership
from logbroker.raft.storage import LogStorage
from logbroker.raft.types import Entry, ResetLog


class RaftLog:
    def __init__(self, storage: LogStorage) -> None:
        self._storage = storage
        self._unstable: list[Entry] = []
        # Offset of the first unstable entry; everything below it is read from storage.
        self._unstable_offset = storage.last_offset + 1
        # How many entries at the front of _unstable went out in the last Ready (not yet advanced).
        self._handed_out = 0
        self._pending_truncate: int | None = None
        self._pending_reset: ResetLog | None = None
        # While a reset has not reached storage, storage's start and prev term are stale: use these.
        self._reset_base: tuple[int, int] | None = None
        self.durable_offset = storage.last_offset

    # ----------------------------------------------------------------------------------------- reads
    @property
    def first_offset(self) -> int:
        return self._reset_base[0] if self._reset_base is not None else self._storage.first_offset

    @property
    def last_offset(self) -> int:
        return self._unstable[-1].last_offset if self._unstable else self._unstable_offset - 1

    @property
    def last_term(self) -> int:
        term = self.term_at(self.last_offset)
        check(term is not None, "the last offset of the log has no term")
        assert term is not None
        return term

    def term_at(self, offset: int) -> int | None:
        """Term of the entry covering ``offset``; for first_offset - 1, the term just before the log."""
        if offset > self.last_offset or offset < self.first_offset - 1:
            return None
        if offset >= self._unstable_offset:
            return self._unstable[self._unstable_index(offset)].term
        if self._reset_base is not None:
            # Only first_offset - 1 is below the tail while a reset is pending.
            return self._reset_base[1]
        return self._storage.term_at(offset)

    def matches(self, offset: int, term: int) -> bool:
        return self.term_at(offset) == term

    def entries(self, from_offset: int, max_bytes: int) -> list[Entry]:
        """Entries from the one covering ``from_offset``: at least one, then up to ``max_bytes`` in all."""
        if not (self.first_offset <= from_offset <= self.last_offset):
            raise RaftInternalError(f"entries({from_offset}) outside the log [{self.first_offset}, {self.last_offset}]")
        found: list[Entry] = []
        budget = max_bytes
        if from_offset < self._unstable_offset:
            for entry in self._storage.entries(from_offset, max_bytes):
                if entry.last_offset >= self._unstable_offset:
                    break  # storage may still hold entries the node has cut; they are not in the log
                found.append(entry)
                budget -= entry.size_bytes
            if budget <= 0 or (found and found[-1].last_offset < self._unstable_offset - 1):
                return found
            from_offset = self._unstable_offset
        if from_offset <= self.last_offset:
            index = self._unstable_index(from_offset)
            while index < len(self._unstable) and (not found or budget >= self._unstable[index].size_bytes):
                found.append(self._unstable[index])
                budget -= self._unstable[index].size_bytes
                index += 1
        return found

    def iter_entries(self, from_offset: int, to_offset: int, chunk_bytes: int) -> Iterator[Entry]:
        """Every entry overlapping [from_offset, to_offset], read in chunks of about ``chunk_bytes``."""
        offset = from_offset
        while offset <= to_offset:
            chunk = self.entries(offset, chunk_bytes)
            for entry in chunk:
                if entry.base_offset > to_offset:
                    return
                yield entry
            offset = chunk[-1].last_offset + 1

    def entry_start(self, offset: int) -> int:
        """Base offset of the entry covering ``offset`` (offset must be in the log)."""
        return self.entries(offset, 1)[0].base_offset

    def first_offset_with_term_at_least(self, term: int, upto: int) -> int:
        """Smallest offset in [first_offset, upto] whose term is >= ``term`` (terms never decrease)."""
        low, high = self.first_offset, upto
        while low < high:
            middle = (low + high) // 2
            middle_term = self.term_at(middle)
            assert middle_term is not None
            if middle_term >= term:
                high = middle
            else:
                low = middle + 1
        return low

    def last_offset_with_term_at_most(self, term: int, upto: int) -> int | None:
        """Largest offset in [first_offset - 1, upto] whose term is <= ``term``, or None."""
        low, high = self.first_offset - 1, min(upto, self.last_offset)
        low_term = self.term_at(low)
        if high < low or low_term is None or low_term > term:
            return None
        while low < high:
            middle = (low + high + 1) // 2
            middle_term = self.term_at(middle)
            assert middle_term is not None
            if middle_term <= term:
                low = middle
            else:
                high = middle - 1
        return low

    def _unstable_index(self, offset: int) -> int:
        index = bisect.bisect_left(self._unstable, offset, key=lambda e: e.last_offset)
        if index >= len(self._unstable):
            raise RaftInternalError(f"offset {offset} is not in the unstable tail")
        return index

    # ---------------------------------------------------------------------------------------- writes
    def append(self, entries: Sequence[Entry]) -> None:
        """Append entries right after the current last offset."""
        expected = self.last_offset + 1
        last_term = self.term_at(self.last_offset)
        assert last_term is not None
        for entry in entries:
            if entry.base_offset != expected:
                raise RaftInternalError(f"entry {entry} does not start at offset {expected}")
            if entry.term < last_term:
                raise RaftInternalError(f"entry {entry} has a lower term than the one before it")
            expected = entry.last_offset + 1
            last_term = entry.term
        self._unstable.extend(entries)

    def truncate(self, from_offset: int) -> None:
        """Cut the log so that ``from_offset`` (an entry boundary) becomes the next offset to write."""
        if from_offset < self.first_offset:
            raise RaftInternalError(f"truncating at {from_offset}, before the log start")
        if from_offset > self.last_offset:
            return
        if self.entry_start(from_offset) != from_offset:
            raise RaftInternalError(f"truncating at {from_offset}, inside an entry")
        if from_offset >= self._unstable_offset:
            index = self._unstable_index(from_offset)
            if index < self._handed_out:
                # The runtime is writing entries past the cut; have it cut them again next Ready.
                self._pending_truncate = self._min_pending(from_offset)
                self._handed_out = index
            del self._unstable[index:]
        else:
            self._pending_truncate = self._min_pending(from_offset)
            self._unstable = []
            self._handed_out = 0
            self._unstable_offset = from_offset
        self.durable_offset = min(self.durable_offset, from_offset - 1)

    def _min_pending(self, offset: int) -> int:
        return offset if self._pending_truncate is None else min(self._pending_truncate, offset)

    def reset(self, start_offset: int, prev_term: int, membership: Membership) -> ResetLog:
        """Discard the whole log; it restarts empty at ``start_offset`` with ``prev_term`` before it."""
        reset = ResetLog(start_offset, prev_term, membership)
        self._unstable = []
        self._handed_out = 0
        self._unstable_offset = start_offset
        self._pending_truncate = None
        self._pending_reset = reset
        self._reset_base = (start_offset, prev_term)
        self.durable_offset = start_offset - 1
        return reset

    def mark_durable(self, last_offset: int, term: int) -> bool:
        """Record that the runtime fsynced up to ``last_offset``; stale reports (cut since) are ignored."""
        if last_offset <= self.durable_offset or last_offset > self.last_offset:
            return False
        if self.term_at(last_offset) != term:
            return False
        self.durable_offset = last_offset
        return True

    # ------------------------------------------------------------------------------- Ready hand-off
    def take_unstable(self) -> tuple[ResetLog | None, int | None, tuple[Entry, ...]]:
        """What the runtime must write next: (reset, truncate_from, entries), each possibly empty."""
        reset, truncate_from = self._pending_reset, self._pending_truncate
        entries = tuple(self._unstable[self._handed_out :])
        self._pending_reset = None
        self._pending_truncate = None
        self._handed_out = len(self._unstable)
        return reset, truncate_from, entries

    def has_unstable(self) -> bool:
        return (
            self._pending_reset is not None
            or self._pending_truncate is not None
            or self._handed_out < len(self._unstable)
        )

    def advance(self, reset: ResetLog | None) -> None:
        """The runtime applied the last Ready's writes: the handed-out entries now live in storage."""
        if self._handed_out:
            self._unstable_offset = self._unstable[self._handed_out - 1].last_offset + 1
            del self._unstable[: self._handed_out]
            self._handed_out = 0
        if (
            reset is not None
            and self._pending_reset is None
            and self._reset_base
            == (
                reset.start_offset,
                reset.prev_term,
            )
        ):
            self._reset_base = None
        if (self._pending_truncate is None and self._reset_base is None
                and self._storage.last_offset != self._unstable_offset - 1):
            raise RaftInternalError(
                f"storage ends at {self._storage.last_offset} but the node wrote up to "
                f"{self._unstable_offset - 1}: the runtime did not apply the Ready"
            )
