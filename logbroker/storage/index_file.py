"""What the offset and time indexes share: an append-only file of fixed-size two-column entries.

The columns live in memory as arrays (for bisect lookups). New entries are staged in memory and written by
write_pending() right after the log bytes they describe, so a failed log write can be rolled back with
rollback_to(). Subclasses name the columns and the entry layout.

The file is opened only once there is something to write or read: most segments of a broker with many
idle partitions never get an index entry, and an open descriptor for each of their two index files made
the descriptors a broker needs three times the partitions it holds (30,000 for 10,000 partitions, over a
common limit of 20,000). A missing index file is an empty index: indexes are rebuilt by recovery anyway.
"""

from __future__ import annotations

import abc
import os
import struct
from array import array
from bisect import bisect_left
from pathlib import Path

from logbroker.storage.files import OS_FILES, FileSystem, read_all, write_all


class SparseIndexFile(abc.ABC):
    ENTRY: struct.Struct  # two fields, in the order of _columns()

    def __init__(self, path: Path, base_offset: int, fs: FileSystem = OS_FILES) -> None:
        self.path = path
        self.base_offset = base_offset
        self.fs = fs
        self._fd = -1  # opened at the first write, or by load() when the file has entries
        self._relative = array("I")  # offsets relative to base_offset: both indexes have this column
        self._pending = bytearray()
        self._written_entries = 0  # entries on disk; the rest of the arrays is in _pending
        self._changes = 0  # bumped by every write or truncation; sync() compares it to _synced_changes
        self._synced_changes = 0

    def _descriptor(self) -> int:
        if self._fd < 0:
            self._fd = self.fs.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        return self._fd

    def _read_file(self) -> bytes:
        """The file's bytes (none if it does not exist); the descriptor stays open only if there are some."""
        if self._fd < 0 and not self.fs.exists(self.path):
            return b""
        data = read_all(self._descriptor(), self.fs)
        if not data:
            self.close()
        return data

    @abc.abstractmethod
    def _columns(self) -> tuple[array, array]:  # type: ignore[type-arg]
        """The two in-memory columns, in the order the entry stores them."""

    def _stage(self, first: int, second: int) -> None:
        """Add an entry in memory and to the bytes write_pending() will write."""
        columns = self._columns()
        columns[0].append(first)
        columns[1].append(second)
        self._pending += self.ENTRY.pack(first, second)

    def write_pending(self) -> None:
        """Write staged entries; raises OSError (then call rollback_to)."""
        if self._pending:
            write_all(self._descriptor(), self._pending, self.fs)
            self._written_entries = len(self._relative)
            self._pending = bytearray()
            self._changes += 1

    def rollback_to(self, entries: int) -> None:
        """Forget everything after the first `entries` entries, in memory and on disk."""
        first, second = self._columns()
        del first[entries:]
        del second[entries:]
        self._written_entries = min(self._written_entries, entries)
        self._pending = bytearray()
        for i in range(self._written_entries, entries):
            self._pending += self.ENTRY.pack(first[i], second[i])
        if self._fd < 0 and not self.fs.exists(self.path):
            return  # nothing on disk to cut (a new segment's index, never written)
        self.fs.ftruncate(self._descriptor(), self._written_entries * self.ENTRY.size)
        self._changes += 1

    def truncate_to(self, offset: int) -> None:
        """Drop entries for offsets >= offset."""
        self.write_pending()
        self.rollback_to(bisect_left(self._relative, max(0, offset - self.base_offset)))

    def reset(self) -> None:
        self.rollback_to(0)

    @property
    def entries(self) -> int:
        return len(self._relative)

    def sync(self) -> None:
        """fsync what write_pending() wrote. Safe from a flusher thread: it never touches staged entries."""
        changes = self._changes
        if changes != self._synced_changes and self._fd >= 0:
            self.fs.fsync(self._fd)
            self._synced_changes = changes

    def close(self) -> None:
        if self._fd >= 0:
            self.fs.close(self._fd)
            self._fd = -1
