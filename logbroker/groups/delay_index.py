"""The delay index of one share-partition: records sent with a delivery time still ahead, kept out of memory.

A record carrying a delivery time (the ``lb.deliver.at.ms`` header) that is read into a share group before
that time is *parked*: the group's window moves on past it and the index brings it back when it is due.
The delivery times are already in the log, in the records themselves, so the index does not copy them. What
it keeps, and what is replicated (in the share-state deltas and snapshots), is small:

    spans      one per read that parked something: (first offset, last offset, read time, records still
               parked); a record of the span is parked iff its delivery time is after the read time (those
               due at the read were delivered at once) and it is not yet delivered
    watermark  (due, offset) of the last parked record delivered. Parked records are delivered strictly in
               (due, offset) order, so "delivered" is exactly "(due, offset) <= watermark"

and, on the leader only, a cache: a heap of the nearest parked (due, offset) pairs, at most
MAX_CACHED_DELAYED, all of them at or below ``loaded_through``; every parked record above it is still in the
log only. When the cache runs dry the leader reloads it by reading the spans from the log (``reload``, given
a scan function): one pass over the parked records per MAX_CACHED_DELAYED deliveries, so a million delayed
records cost a few MB of memory, not a million Python objects. A new leader starts with nothing loaded.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

MAX_CACHED_DELAYED = 50_000  # parked records the leader holds in memory; the rest stay in the log only
NOTHING = (-1, -1)  # a (due, offset) pair below every real one
EVERYTHING = (1 << 62, 1 << 62)  # ... and above every real one

# scan(first, last) -> (offset, due_ms) of every record in first..last carrying a delivery time
DelayScan = Callable[[int, int], Iterable[tuple[int, int]]]


@dataclass(slots=True)
class Span:
    first: int
    last: int
    read_ms: int  # records of the span due at or before this were delivered when read, never parked
    parked: int  # records of the span still parked

    def row(self) -> list[int]:
        return [self.first, self.last, self.read_ms, self.parked]


@dataclass
class DelayIndex:
    spans: list[Span] = field(default_factory=list)  # ordered by offset, disjoint
    watermark: tuple[int, int] = NOTHING
    # The leader's cache: not replicated, rebuilt by reload.
    _cache: list[tuple[int, int]] = field(default_factory=list)  # heap of (due, offset)
    # Every parked pair up to here is in the cache, and nothing above it is. Nothing parked: all known.
    _loaded_through: tuple[int, int] = EVERYTHING

    # ========================================================================== replicated
    def park(self, first: int, last: int, read_ms: int, parked: int,
             pairs: list[tuple[int, int]] | None = None) -> None:
        """A read parked ``parked`` records of first..last (replayed on every replica). The leader that parked
        them passes their (due, offset) pairs for its cache; a replica that only replays does not know them."""
        assert parked > 0 and first <= last, (first, last, parked)
        index = bisect.bisect_left(self._firsts(), first)
        assert index == len(self.spans) or self.spans[index].first > last, "spans of the delay index overlap"
        self.spans.insert(index, Span(first, last, read_ms, parked))
        if pairs is not None:
            self._cache_parked(pairs)
        else:  # every record of the span is due after read_ms: the cache covers no more than that now
            self._lower_loaded_through((read_ms, EVERYTHING[1]))

    def delivered(self, offsets: Iterable[int], watermark: tuple[int, int]) -> None:
        """These parked records came out (replayed on every replica); watermark is the last one's pair."""
        firsts = self._firsts()
        emptied = False
        for offset in offsets:
            index = bisect.bisect_right(firsts, offset) - 1
            if index >= 0 and offset <= self.spans[index].last and self.spans[index].parked > 0:
                self.spans[index].parked -= 1
                emptied = emptied or self.spans[index].parked == 0
        if emptied:
            self.spans = [span for span in self.spans if span.parked > 0]
        self.watermark = max(self.watermark, watermark)

    def restate(self) -> dict[str, Any]:
        return {"spans": [span.row() for span in self.spans], "w": list(self.watermark)}

    def load_restated(self, restated: dict[str, Any]) -> None:
        self.spans = [Span(*row) for row in restated.get("spans", ())]
        self.watermark = tuple(restated.get("w", NOTHING))  # type: ignore[assignment]
        self.forget_cache()

    # ============================================================================ leader
    def forget_cache(self) -> None:
        self._cache.clear()
        self._loaded_through = NOTHING if self.spans else EVERYTHING

    def _cache_parked(self, pairs: Iterable[tuple[int, int]]) -> None:
        for pair in pairs:
            if pair <= self._loaded_through:
                heapq.heappush(self._cache, pair)
        if len(self._cache) > 2 * MAX_CACHED_DELAYED:  # shed the far end in bulk, not one by one
            self._lower_loaded_through(heapq.nsmallest(MAX_CACHED_DELAYED, self._cache)[-1])

    def _lower_loaded_through(self, bound: tuple[int, int]) -> None:
        if bound < self._loaded_through:
            self._loaded_through = bound
            self._cache = [pair for pair in self._cache if pair <= bound]
            heapq.heapify(self._cache)

    def pop_due(self, now_ms: int, limit: int, scan: DelayScan | None) -> list[tuple[int, int]]:
        """Up to ``limit`` parked (due, offset) pairs due by now, in delivery order (the leader's call)."""
        if limit <= 0 or not self.spans:
            return []
        if not self._cache and self._loaded_through != EVERYTHING and scan is not None:
            self.reload(scan)
        out: list[tuple[int, int]] = []
        while self._cache and self._cache[0][0] <= now_ms and len(out) < limit:
            pair = heapq.heappop(self._cache)
            if pair > self.watermark:
                out.append(pair)
        return out

    def reload(self, scan: DelayScan) -> None:
        """Fill the cache with the nearest parked records after what it covered, read from the log."""
        floor = max(self._loaded_through, self.watermark)
        found: list[tuple[int, int]] = []  # a max-heap (negated) of the MAX_CACHED_DELAYED smallest pairs
        for span in self.spans:
            for offset, due_ms in scan(span.first, span.last):
                pair = (due_ms, offset)
                if due_ms <= span.read_ms or pair <= floor or not span.first <= offset <= span.last:
                    continue
                if len(found) < MAX_CACHED_DELAYED:
                    heapq.heappush(found, (-due_ms, -offset))
                elif (-found[0][0], -found[0][1]) > pair:
                    heapq.heapreplace(found, (-due_ms, -offset))
        pairs = sorted((-due, -offset) for due, offset in found)
        self._cache = pairs  # sorted is a heap
        self._loaded_through = pairs[-1] if len(pairs) == MAX_CACHED_DELAYED else EVERYTHING

    # ============================================================================ views
    def next_due_ms(self) -> int | None:
        """When the nearest parked record the leader knows of is due (None: none known)."""
        return self._cache[0][0] if self._cache else None

    def parked_count(self) -> int:
        return sum(span.parked for span in self.spans)

    def due_count(self, now_ms: int) -> int:
        """Parked records known to be due (those in the cache; a follower knows of none)."""
        return sum(1 for due, _ in self._cache if due <= now_ms)

    def first_offset(self) -> int | None:
        """The lowest offset a parked record may have: retention must keep the log from there."""
        return self.spans[0].first if self.spans else None

    def _firsts(self) -> list[int]:
        return [span.first for span in self.spans]
