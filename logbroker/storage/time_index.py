"""The sparse time index of one segment: (timestamp i64 BE, relative offset u32 BE) entries.

An entry (T, O) says: the batch at base offset O has maxTimestamp T, and no batch before it in the segment
has a larger one. Entries are added at the same index points as the offset index, and only when the
segment's largest timestamp so far grew, so both columns strictly increase. Closing or rolling a segment
adds a final entry, which makes the last entry the segment's largest timestamp.
"""

from __future__ import annotations

import os
import struct
from array import array
from bisect import bisect_left
from pathlib import Path

from logbroker.storage.files import read_all, write_all

ENTRY = struct.Struct(">qI")
ENTRY_SIZE = ENTRY.size  # 12
MAX_U32 = 0xFFFFFFFF


class TimeIndex:
    def __init__(self, path: Path, base_offset: int) -> None:
        self.path = path
        self.base_offset = base_offset
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self._timestamps = array("q")
        self._relative = array("I")
        self._pending = bytearray()
        self._written_entries = 0
        self._changes = 0  # bumped by every write or truncation; sync() compares it to _synced_changes
        self._synced_changes = 0

    # ------------------------------------------------------------------------------------------ loading

    def load(self, next_offset: int) -> str | None:
        """Read the file into memory; return why it cannot be trusted (then the index is left empty)."""
        data = read_all(self._fd)
        problem = self._parse(data, next_offset)
        if problem is not None:
            self._timestamps = array("q")
            self._relative = array("I")
            self._written_entries = 0
            return f"{self.path.name}: {problem}"
        return None

    def _parse(self, data: bytes, next_offset: int) -> str | None:
        if len(data) % ENTRY_SIZE:
            return f"size {len(data)} is not a multiple of {ENTRY_SIZE}"
        timestamps = array("q")
        relative = array("I")
        previous_ts, previous_rel = -(1 << 63), -1
        for ts, rel in ENTRY.iter_unpack(data):
            if ts <= previous_ts or rel <= previous_rel:
                return f"entry ({ts}, {rel}) does not follow ({previous_ts}, {previous_rel})"
            timestamps.append(ts)
            relative.append(rel)
            previous_ts, previous_rel = ts, rel
        if relative and self.base_offset + relative[-1] >= next_offset:
            return f"offset {self.base_offset + relative[-1]} lies beyond the end of the log ({next_offset})"
        self._timestamps, self._relative = timestamps, relative
        self._written_entries = len(relative)
        return None

    # ------------------------------------------------------------------------------------------ writing

    def maybe_append(self, timestamp_ms: int, offset: int) -> bool:
        """Stage (timestamp, offset) if the timestamp exceeds the last entry's; no I/O."""
        if self._timestamps and timestamp_ms <= self._timestamps[-1]:
            return False
        relative = offset - self.base_offset
        if not 0 <= relative <= MAX_U32:
            raise ValueError(f"{self.path.name}: offset {offset} does not fit in u32 relative to the base")
        if self._relative and relative <= self._relative[-1]:
            return False
        self._timestamps.append(timestamp_ms)
        self._relative.append(relative)
        self._pending += ENTRY.pack(timestamp_ms, relative)
        return True

    def write_pending(self) -> None:
        if self._pending:
            write_all(self._fd, self._pending)
            self._written_entries = len(self._relative)
            self._pending = bytearray()
            self._changes += 1

    def rollback_to(self, entries: int) -> None:
        del self._timestamps[entries:]
        del self._relative[entries:]
        self._written_entries = min(self._written_entries, entries)
        self._pending = bytearray()
        for i in range(self._written_entries, entries):
            self._pending += ENTRY.pack(self._timestamps[i], self._relative[i])
        os.ftruncate(self._fd, self._written_entries * ENTRY_SIZE)
        self._changes += 1

    def truncate_to(self, offset: int) -> None:
        """Drop entries for offsets >= offset."""
        self.write_pending()
        self.rollback_to(bisect_left(self._relative, max(0, offset - self.base_offset)))

    def reset(self) -> None:
        self.rollback_to(0)

    # ------------------------------------------------------------------------------------------ lookups

    def lookup(self, timestamp_ms: int) -> int:
        """Offset to start scanning from for the first batch with maxTimestamp >= timestamp_ms.

        That is the offset of the greatest entry with T < timestamp_ms: it and every batch before it are too
        old. With no such entry, the scan starts at the segment's base offset.
        """
        i = bisect_left(self._timestamps, timestamp_ms) - 1
        if i < 0:
            return self.base_offset
        return self.base_offset + self._relative[i]

    @property
    def entries(self) -> int:
        return len(self._relative)

    def last_entry(self) -> tuple[int, int] | None:
        """(timestamp, absolute offset) of the last entry."""
        if not self._relative:
            return None
        return self._timestamps[-1], self.base_offset + self._relative[-1]

    # ------------------------------------------------------------------------------------------ files

    def sync(self) -> None:
        """fsync what write_pending() wrote. Safe from a flusher thread: it never touches staged entries."""
        changes = self._changes
        if changes != self._synced_changes:
            os.fsync(self._fd)
            self._synced_changes = changes

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
