"""The sparse time index of one segment: (timestamp i64 BE, relative offset u32 BE) entries.

An entry (T, O) says: the batch at base offset O has maxTimestamp T, and no batch before it in the segment
has a larger one. Entries are added at the same index points as the offset index, and only when the
segment's largest timestamp so far grew, so both columns strictly increase. Closing or rolling a segment
adds a final entry, which makes the last entry the segment's largest timestamp.
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_left
from pathlib import Path

from logbroker.storage.files import OS_FILES, FileSystem
from logbroker.storage.index_file import SparseIndexFile

ENTRY = struct.Struct(">qI")
ENTRY_SIZE = ENTRY.size  # 12
MAX_U32 = 0xFFFFFFFF


class TimeIndex(SparseIndexFile):
    ENTRY = ENTRY

    def __init__(self, path: Path, base_offset: int, fs: FileSystem = OS_FILES) -> None:
        super().__init__(path, base_offset, fs)
        self._timestamps = array("q")

    def _columns(self) -> tuple[array, array]:  # type: ignore[type-arg]
        return self._timestamps, self._relative

    # ------------------------------------------------------------------------------------------ loading

    def load(self, next_offset: int) -> str | None:
        """Read the file into memory; return why it cannot be trusted (then the index is left empty)."""
        data = self._read_file()
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
        self._stage(timestamp_ms, relative)
        return True

    # ------------------------------------------------------------------------------------------ lookups

    def lookup(self, timestamp_ms: int) -> int:
        """Offset to start scanning from for the first batch with maxTimestamp >= timestamp_ms.

        That is the offset of the greatest entry with T < timestamp_ms: it and every batch before it are too
        old. With no such entry, the scan starts at the segment's base offset.
        """
        entry = self.lookup_entry(timestamp_ms)
        return self.base_offset if entry is None else entry[1]

    def lookup_entry(self, timestamp_ms: int) -> tuple[int, int] | None:
        """(timestamp, absolute offset) of the greatest entry with a timestamp < timestamp_ms, or None; the
        segment checks the entry against the batch it names before trusting it."""
        i = bisect_left(self._timestamps, timestamp_ms) - 1
        if i < 0:
            return None
        return self._timestamps[i], self.base_offset + self._relative[i]

    def last_entry(self) -> tuple[int, int] | None:
        """(timestamp, absolute offset) of the last entry."""
        if not self._relative:
            return None
        return self._timestamps[-1], self.base_offset + self._relative[-1]
