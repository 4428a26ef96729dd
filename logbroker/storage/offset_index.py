"""The sparse offset index of one segment: (relative offset u32 BE, file position u32 BE) entries.

An entry is added for a batch every index_interval_bytes of log, so a lookup binary-searches the in-memory
copy and then scans forward at most about that many bytes. Entries always point at a batch's first byte
and carry that batch's base offset. The file is append-only; new entries are staged in memory and written
by write_pending() right after the log bytes they describe, so a failed write can be rolled back.
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_right
from pathlib import Path

from logbroker.storage.files import OS_FILES, FileSystem
from logbroker.storage.index_file import SparseIndexFile

ENTRY = struct.Struct(">II")
ENTRY_SIZE = ENTRY.size  # 8
MAX_U32 = 0xFFFFFFFF

_U32 = "I"
assert array(_U32).itemsize == 4, "array('I') must hold 32-bit values on this platform"


class OffsetIndex(SparseIndexFile):
    ENTRY = ENTRY

    def __init__(self, path: Path, base_offset: int, fs: FileSystem = OS_FILES) -> None:
        super().__init__(path, base_offset, fs)
        self._positions = array(_U32)

    def _columns(self) -> tuple[array, array]:  # type: ignore[type-arg]
        return self._relative, self._positions

    # ------------------------------------------------------------------------------------------ loading

    def load(self, log_size: int) -> str | None:
        """Read the file into memory; return why it cannot be trusted (then the index is left empty)."""
        data = self._read_file()
        problem = self._parse(data, log_size)
        if problem is not None:
            self._relative = array(_U32)
            self._positions = array(_U32)
            self._written_entries = 0
            return f"{self.path.name}: {problem}"
        return None

    def _parse(self, data: bytes, log_size: int) -> str | None:
        if len(data) % ENTRY_SIZE:
            return f"size {len(data)} is not a multiple of {ENTRY_SIZE}"
        flat = array(_U32)
        flat.frombytes(data)
        if sys.byteorder == "little":
            flat.byteswap()
        relative, positions = flat[0::2], flat[1::2]
        if not _strictly_increasing(relative):
            return "relative offsets are not strictly increasing"
        if not _strictly_increasing(positions):
            return "file positions are not strictly increasing"
        if positions and positions[-1] >= log_size:
            return f"position {positions[-1]} lies beyond the end of the log ({log_size} bytes)"
        self._relative, self._positions = relative, positions
        self._written_entries = len(relative)
        return None

    # ------------------------------------------------------------------------------------------ writing

    def append(self, offset: int, position: int) -> None:
        """Stage an entry (no I/O); write_pending() persists it."""
        relative = offset - self.base_offset
        if not (0 <= relative <= MAX_U32 and 0 <= position <= MAX_U32):
            raise ValueError(f"{self.path.name}: entry ({offset}, {position}) does not fit in u32")
        if self._relative and (relative <= self._relative[-1] or position <= self._positions[-1]):
            raise ValueError(f"{self.path.name}: entry ({offset}, {position}) does not follow the last entry")
        self._stage(relative, position)

    # ------------------------------------------------------------------------------------------ lookups

    def lookup(self, offset: int) -> tuple[int, int]:
        """(offset, position) of the greatest entry with offset <= the target; (base, 0) if none."""
        i = bisect_right(self._relative, offset - self.base_offset) - 1
        if i < 0:
            return self.base_offset, 0
        return self.base_offset + self._relative[i], self._positions[i]

    def lookup_position(self, position: int) -> tuple[int, int]:
        """(offset, position) of the greatest entry with position <= the target; (base, 0) if none."""
        i = bisect_right(self._positions, position) - 1
        if i < 0:
            return self.base_offset, 0
        return self.base_offset + self._relative[i], self._positions[i]

    def last_entry(self) -> tuple[int, int] | None:
        if not self._relative:
            return None
        return self.base_offset + self._relative[-1], self._positions[-1]

def _strictly_increasing(values: array) -> bool:
    return all(a < b for a, b in zip(values, values[1:], strict=False))

