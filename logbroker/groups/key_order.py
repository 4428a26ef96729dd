"""Key-ordered delivery for a share group (the ``share.ordering=key`` mode, like SQS FIFO message groups).

Records with the same key are never in flight at once: per key, only the first unfinished record of the
window may be delivered; the next one becomes deliverable when that one is acknowledged or archived.
Different keys run in parallel, and records without a key are not held back at all. A record that waits
its turn stays "available" in the share state (delivered 0 times), so no new state is replicated: the
queues below are derived from the log (record keys) and the replicated states, and a new leader rebuilds
them from its window, at most MAX_WINDOW_RECORDS records, when it first serves the group in this mode.

Records parked in the delay index are delivered at their time, outside their key's order: a delay is a
statement about the one record.
"""

from __future__ import annotations

from collections import deque


class KeyOrder:
    def __init__(self) -> None:
        self._queues: dict[bytes, deque[int]] = {}  # key -> its unfinished offsets of the window, in log order
        self._key_of: dict[int, bytes] = {}
        self.loaded = False  # the queues reflect the window (the leader's; a follower never loads them)

    def clear(self) -> None:
        self._queues.clear()
        self._key_of.clear()
        self.loaded = False

    def add(self, offset: int, key: bytes | None) -> bool:
        """A record of the window, in log order; True when it may be delivered now."""
        if key is None:
            return True
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        assert not queue or queue[-1] < offset, f"key queue out of log order at offset {offset}"
        queue.append(offset)
        self._key_of[offset] = key
        return len(queue) == 1

    def is_blocked(self, offset: int) -> bool:
        """Is an earlier record of this record's key still unfinished?"""
        key = self._key_of.get(offset)
        return key is not None and self._queues[key][0] != offset

    def finished(self, first: int, last: int) -> list[int]:
        """Offsets first..last are done (or archived); returns the records whose turn has now come."""
        if not self._key_of:
            return []
        if last - first + 1 > len(self._key_of):
            offsets = sorted(o for o in self._key_of if first <= o <= last)
        else:
            offsets = [o for o in range(first, last + 1) if o in self._key_of]
        turn = []
        for offset in offsets:
            key = self._key_of.pop(offset)
            queue = self._queues[key]
            was_first = queue[0] == offset
            queue.remove(offset)
            if not queue:
                del self._queues[key]
            elif was_first:
                turn.append(queue[0])
        return turn

    def holders(self) -> int:
        """Keys with records waiting or in flight (for describe)."""
        return len(self._queues)
