"""One segment: a .log file of whole record batches plus its offset and time indexes.

Writes go through an O_APPEND descriptor, reads through pread (of its FileSystem, the OS by default), so
reads never move a file position and need no lock. The in-memory size only grows after the bytes are
written, so a reader (or a flusher thread) that looks at it never sees a half-written batch.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from logbroker_client.records import HEADER_SIZE, LOG_OVERHEAD, MAGIC, BatchHeader, read_header, validate_batch

from logbroker.storage.errors import StorageError
from logbroker.storage.filenames import index_file_name, log_file_name, time_index_file_name
from logbroker.storage.files import OS_FILES, FileSystem, write_all
from logbroker.storage.offset_index import MAX_U32, OffsetIndex
from logbroker.storage.time_index import TimeIndex

logger = logging.getLogger("logbroker.storage")

# Reads of batch headers fetch this much at a time, enough for every header within one index interval.
SCAN_BLOCK_BYTES = 16 * 1024


class _LyingIndexError(StorageError):
    """An index entry does not name the batch at its position (a damaged index file).

    Opening checks only what is cheap (Kafka's sanity checks: sizes, order, the last entries), so a wrong
    entry in the middle of an index is found on first use. The public lookups catch this, rebuild the
    indexes from the log and look again, instead of failing the read.
    """


class BatchInfo(NamedTuple):
    """What a segment needs to know about one batch it is appending (all O(1) header fields)."""

    position: int  # position of the batch inside the bytes being appended
    base_offset: int
    last_offset: int
    max_timestamp: int
    size: int


class UnsyncedLog(NamedTuple):
    """What one fsync of a segment's log file covers: its size when the fsync began, and whether a cut since the
    last one is among what it makes durable."""

    size: int
    cut: bool


class _IndexState(NamedTuple):
    offset_entries: int
    time_entries: int
    bytes_since_index: int
    max_timestamp: int
    offset_of_max_timestamp: int


class LogSegment:
    def __init__(self, directory: Path, base_offset: int, index_interval_bytes: int,
                 fs: FileSystem = OS_FILES) -> None:
        self.directory = directory
        self.base_offset = base_offset
        self.log_path = directory / log_file_name(base_offset)
        self.index_interval_bytes = index_interval_bytes
        self.fs = fs
        self._fd = fs.open(self.log_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self.offset_index = OffsetIndex(directory / index_file_name(base_offset), base_offset, fs)
        self.time_index = TimeIndex(directory / time_index_file_name(base_offset), base_offset, fs)
        self._size = 0
        self._flushed_size = 0
        self._cut_unsynced = False  # truncate_to shortened the file and no fsync has made that durable yet
        self._next_offset = base_offset
        self._max_timestamp = -1
        self._offset_of_max_timestamp = base_offset
        self._bytes_since_index = 0
        self._last_batch_position = -1
        self._last_epoch = -1
        # Time-based rolling counts from the first append into the segment (file mtime after a restart).
        self.rolling_base_ms: int | None = None
        self.last_modified_ms = 0

    @classmethod
    def create(cls, directory: Path, base_offset: int, index_interval_bytes: int, now_ms: int,
               fs: FileSystem = OS_FILES) -> LogSegment:
        """A new, empty segment. Stale files of the same name (a crash during an earlier delete) are emptied."""
        segment = cls(directory, base_offset, index_interval_bytes, fs)
        fs.ftruncate(segment._fd, 0)
        segment.offset_index.reset()
        segment.time_index.reset()
        segment.last_modified_ms = now_ms
        return segment

    @classmethod
    def open_existing(cls, directory: Path, base_offset: int, index_interval_bytes: int,
                      fs: FileSystem = OS_FILES) -> LogSegment:
        """Open the files; call load_trusted() or recovery.recover_segment() before using the segment."""
        segment = cls(directory, base_offset, index_interval_bytes, fs)
        stat = fs.fstat(segment._fd)
        segment.last_modified_ms = stat.st_mtime_ns // 1_000_000
        return segment

    # ---------------------------------------------------------------------------------------- properties

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def flushed_size_bytes(self) -> int:
        return self._flushed_size

    @property
    def next_offset(self) -> int:
        """One past the last offset in the segment (the base offset when empty)."""
        return self._next_offset

    @property
    def max_timestamp(self) -> int:
        """Largest batch maxTimestamp in the segment; -1 when empty."""
        return self._max_timestamp

    @property
    def last_epoch(self) -> int:
        """partitionLeaderEpoch of the last batch; -1 when empty."""
        return self._last_epoch

    @property
    def is_empty(self) -> bool:
        return self._size == 0

    @property
    def retention_timestamp_ms(self) -> int:
        """The time retention.ms compares against: the newest record timestamp, else the file's mtime."""
        return self._max_timestamp if self._max_timestamp >= 0 else self.last_modified_ms

    def fits(self, size: int, last_offset: int) -> bool:
        """Whether an append keeps every index entry inside u32 (relative offset and position)."""
        return self._size + size <= MAX_U32 and last_offset - self.base_offset <= MAX_U32

    # ---------------------------------------------------------------------------------------- appending

    def append(
        self, data: bytes | bytearray | memoryview, batches: Sequence[BatchInfo], last_epoch: int, now_ms: int
    ) -> int:
        """Write whole, already stamped batches; return the position of the first. O(1) work per batch.

        On OSError the segment is left exactly as before (log and indexes truncated back) and the error
        propagates; if even that fails, LogSegmentBrokenError tells the caller to stop writing.
        """
        start = self._size
        saved = self._index_state()
        for info in batches:
            self._index_batch(start + info.position, info.base_offset, info.size, info.max_timestamp)
        try:
            write_all(self._fd, data, self.fs)
            self.offset_index.write_pending()
            self.time_index.write_pending()
        except OSError:
            self._undo_append(start, saved)
            raise
        last = batches[-1]
        self._size = start + len(data)
        self._last_batch_position = start + last.position
        self._last_epoch = last_epoch
        self._next_offset = last.last_offset + 1
        if self.rolling_base_ms is None:
            self.rolling_base_ms = now_ms
        self.last_modified_ms = now_ms
        assert self.fs.fstat(self._fd).st_size == self._size, "the .log file must grow by exactly the batches"
        return start

    def _index_batch(self, position: int, base_offset: int, size: int, max_timestamp: int) -> None:
        """The one place that decides index entries, used by append and by recovery alike."""
        if max_timestamp > self._max_timestamp:
            self._max_timestamp = max_timestamp
            self._offset_of_max_timestamp = base_offset
        if self._bytes_since_index >= self.index_interval_bytes:
            self.offset_index.append(base_offset, position)
            self.time_index.maybe_append(self._max_timestamp, self._offset_of_max_timestamp)
            self._bytes_since_index = 0
        self._bytes_since_index += size

    def _index_state(self) -> _IndexState:
        return _IndexState(
            self.offset_index.entries, self.time_index.entries, self._bytes_since_index,
            self._max_timestamp, self._offset_of_max_timestamp,
        )

    def _undo_append(self, start: int, saved: _IndexState) -> None:
        try:
            self.fs.ftruncate(self._fd, start)
            self.offset_index.rollback_to(saved.offset_entries)
            self.time_index.rollback_to(saved.time_entries)
        except OSError as exc:
            raise LogSegmentBrokenError(
                f"{self.log_path.name}: could not undo a failed write ({exc}); "
                f"the log must be reopened so recovery can repair it"
            ) from exc
        self._bytes_since_index = saved.bytes_since_index
        self._max_timestamp = saved.max_timestamp
        self._offset_of_max_timestamp = saved.offset_of_max_timestamp

    def seal(self) -> None:
        """The segment stops being active: record its largest timestamp in the time index, then fsync."""
        self.time_index.maybe_append(self._max_timestamp, self._offset_of_max_timestamp)
        self.time_index.write_pending()
        self.flush()

    # ---------------------------------------------------------------------------------------- rebuilding

    def begin_rebuild(self) -> None:
        """Forget the indexes and all derived state; recovery then feeds every valid batch to track_batch."""
        self.offset_index.reset()
        self.time_index.reset()
        self._size = 0
        self._flushed_size = 0
        self._next_offset = self.base_offset
        self._max_timestamp = -1
        self._offset_of_max_timestamp = self.base_offset
        self._bytes_since_index = 0
        self._last_batch_position = -1
        self._last_epoch = -1

    def track_batch(self, position: int, header: BatchHeader) -> None:
        size = header.batch_length + LOG_OVERHEAD
        self._index_batch(position, header.base_offset, size, header.max_timestamp)
        self._size = position + size
        self._next_offset = header.base_offset + header.last_offset_delta + 1
        self._last_batch_position = position
        self._last_epoch = header.leader_epoch

    def finish_rebuild(self) -> int:
        """Cut the .log after the last tracked batch and write the indexes; return the bytes cut off."""
        file_size = self.fs.fstat(self._fd).st_size
        if file_size > self._size:
            self.fs.ftruncate(self._fd, self._size)
        self.time_index.maybe_append(self._max_timestamp, self._offset_of_max_timestamp)
        self.offset_index.write_pending()
        self.time_index.write_pending()
        if self._size:
            self.rolling_base_ms = self.last_modified_ms
        return file_size - self._size

    def load_trusted(self, check_tail: bool = False, allow_gaps: bool = False) -> str | None:
        """Trust the indexes after sanity checks; return why not (the caller then rebuilds via recovery).

        With check_tail, also check the batches after the last offset-index entry as recovery would (CRC,
        offsets without gaps unless allow_gaps): see _tail_batch_problem.
        """
        log_size = self.fs.fstat(self._fd).st_size
        problem = self.offset_index.load(log_size)
        if problem is not None:
            return problem
        problem = self._scan_tail(log_size, check_time_index=True)
        if problem is None and check_tail:
            problem = self._tail_batch_problem(allow_gaps)
        if problem is not None:
            return problem
        self._flushed_size = self._size
        if self._size:
            self.rolling_base_ms = self.last_modified_ms
        return None

    def _scan_tail(self, log_size: int, check_time_index: bool) -> str | None:
        """Walk the batches after the last offset-index entry to learn the end offset, epoch and timestamps.

        Every batch before that entry is covered by the time index's last entry, because both indexes
        gain entries at the same points; so this reads at most about index_interval_bytes of headers.
        """
        entry = self.offset_index.last_entry()
        expected_offset, position = entry if entry is not None else (self.base_offset, 0)
        indexed_position = position
        self._max_timestamp = -1
        self._offset_of_max_timestamp = self.base_offset
        self._last_batch_position = -1
        self._last_epoch = -1
        self._next_offset = expected_offset
        for batch_position, header in self.iter_headers(position, log_size):
            problem = _tail_problem(header, batch_position, position, expected_offset, indexed_position, entry,
                                    self.index_interval_bytes, log_size)
            if problem is not None:
                return f"{self.log_path.name}: {problem}"
            if header.max_timestamp > self._max_timestamp:
                self._max_timestamp = header.max_timestamp
                self._offset_of_max_timestamp = header.base_offset
            position = batch_position + header.batch_length + LOG_OVERHEAD
            expected_offset = header.base_offset + header.last_offset_delta + 1
            self._last_batch_position = batch_position
            self._last_epoch = header.leader_epoch
        if position != log_size:
            return f"{self.log_path.name}: the log ends inside a batch at byte {position} of {log_size}"
        self._size = log_size
        self._next_offset = expected_offset
        self._bytes_since_index = log_size - indexed_position
        return self._merge_time_index(check_time_index)

    def _merge_time_index(self, check_time_index: bool) -> str | None:
        if check_time_index:
            problem = self.time_index.load(self._next_offset) or self._last_time_entry_problem()
            if problem is not None:
                return problem
        last = self.time_index.last_entry()
        if check_time_index and self._size and (last is None or last[0] < self._max_timestamp):
            return f"{self.time_index.path.name}: its last entry does not hold the segment's largest timestamp"
        if last is not None and last[0] >= self._max_timestamp:
            self._max_timestamp, self._offset_of_max_timestamp = last
        return None

    def _last_time_entry_problem(self) -> str | None:
        """The time index's last entry must name a batch that starts at its offset and has its timestamp:
        the segment's largest timestamp comes from it, and retention and timestamp lookups rely on that."""
        last = self.time_index.last_entry()
        if last is None:
            return None
        timestamp, offset = last
        try:
            found = self._find_batch(offset)
        except _LyingIndexError as lie:
            return f"{self.offset_index.path.name}: {lie}"
        if found is None or found[1].base_offset != offset or found[1].max_timestamp != timestamp:
            return f"{self.time_index.path.name}: its last entry ({timestamp}, offset {offset}) names no such batch"
        return None

    def _tail_batch_problem(self, allow_gaps: bool) -> str | None:
        """Check every batch after the last offset-index entry (CRC, offset gaps); return the first failure.

        A clean shutdown skips recovery, so bit rot since then would otherwise surface later, as a
        CorruptBatchError in whatever reads the batch. The tail is what a restarted replica reads first (its
        last entries, its producer state), and checking only the batches after the last index entry bounds
        the cost by index_interval_bytes plus one batch, however long the log. Damage further back is left
        to the readers' own CRC checks.
        """
        entry = self.offset_index.last_entry()
        expected_offset, position = entry if entry is not None else (self.base_offset, 0)
        if position >= self._size:
            return None
        with self.fs.map_fd(self._fd, self._size) as buf:
            while position < self._size:
                try:
                    header = validate_batch(buf, position, self._size)
                except (ValueError, struct.error) as exc:  # CorruptBatchError is a ValueError
                    return f"{self.log_path.name}: the batch at byte {position} fails its check: {exc}"
                if header.base_offset != expected_offset and not allow_gaps:
                    return (f"{self.log_path.name}: the batch at byte {position} has offset {header.base_offset}, "
                            f"expected {expected_offset}")
                position += header.batch_length + LOG_OVERHEAD
                expected_offset = header.base_offset + header.last_offset_delta + 1
        return None

    # ---------------------------------------------------------------------------------------- repairing

    def rebuild_indexes(self, reason: str) -> None:
        """Rebuild both indexes from the batch headers, leaving the .log as it is.

        For an index found lying after open: recovery, which also checks CRCs and cuts the log, belongs to
        open time, when nothing reads the log yet. Entries come from _index_batch, as on append and in
        recovery, so the rebuilt indexes are the ones appends would have written.
        """
        logger.warning("%s: rebuilding the indexes of %s from its batch headers: %s",
                       self.directory.name, self.log_path.name, reason)
        self.offset_index.reset()
        self.time_index.reset()
        self._bytes_since_index = 0
        self._max_timestamp = -1
        self._offset_of_max_timestamp = self.base_offset
        for position, header in self._sane_headers(0, self._size):
            self._index_batch(position, header.base_offset, header.batch_length + LOG_OVERHEAD, header.max_timestamp)
        self.time_index.maybe_append(self._max_timestamp, self._offset_of_max_timestamp)
        self.offset_index.write_pending()
        self.time_index.write_pending()

    def _sane_headers(self, position: int, end: int) -> Iterator[tuple[int, BatchHeader]]:
        """iter_headers, stopping at a header that cannot be a batch of this log (bad magic, offsets going
        backwards), so that damaged bytes never become index entries."""
        expected_offset = self.base_offset
        for batch_position, header in self.iter_headers(position, end):
            if header.magic != MAGIC or header.base_offset < expected_offset or header.last_offset_delta < 0:
                return
            yield batch_position, header
            expected_offset = header.base_offset + header.last_offset_delta + 1

    # ---------------------------------------------------------------------------------------- reading

    def iter_headers(self, position: int, end: int) -> Iterator[tuple[int, BatchHeader]]:
        """(position, header) of each batch from position up to end; stops at a partial or absurd header."""
        fd, pread = self._fd, self.fs.pread
        while end - position >= HEADER_SIZE:
            block = pread(fd, min(SCAN_BLOCK_BYTES, end - position), position)
            available = len(block)
            cursor = 0
            while available - cursor >= HEADER_SIZE:
                header = read_header(block, cursor)
                size = header.batch_length + LOG_OVERHEAD
                if size < HEADER_SIZE:
                    return
                yield position + cursor, header
                cursor += size
            if cursor == 0:
                return
            position += cursor

    def _scan_from(self, entry: tuple[int, int], end: int) -> Iterator[tuple[int, BatchHeader]]:
        """iter_headers from an index entry's position, checking the entry with the first header it reads
        anyway: the batch there must start at the entry's offset, else _LyingIndexError."""
        offset, position = entry
        headers = self.iter_headers(position, end)
        if not position:  # position 0 starts a batch whatever the entry says (a compacted segment's first)
            return headers
        first = next(headers, None)
        if first is None or first[1].magic != MAGIC or first[1].base_offset != offset:
            found = "no batch" if first is None else f"a batch with offset {first[1].base_offset}"
            raise _LyingIndexError(f"its entry (offset {offset}, byte {position}) points at {found}")
        return itertools.chain((first,), headers)

    def find_batch(self, offset: int) -> tuple[int, BatchHeader] | None:
        """(position, header) of the first batch whose last offset >= offset (the one holding it, or the
        next one across a compaction gap); None when the segment has nothing at or after offset."""
        try:
            return self._find_batch(offset)
        except _LyingIndexError as lie:
            self.rebuild_indexes(str(lie))
            return self._find_batch(offset)

    def _find_batch(self, offset: int) -> tuple[int, BatchHeader] | None:
        if offset >= self._next_offset:
            return None
        for batch_position, header in self._scan_from(self.offset_index.lookup(offset), self._size):
            if header.base_offset + header.last_offset_delta >= offset:
                return batch_position, header
        return None

    def find_position(self, offset: int) -> int | None:
        found = self.find_batch(offset)
        return None if found is None else found[0]

    def read(self, start_offset: int, max_bytes: int, max_offset: int | None = None, min_one: bool = True) -> bytes:
        """Whole batches from the one holding start_offset, up to max_bytes (but at least one batch when
        min_one), stopping before any batch whose last offset >= max_offset."""
        return self.read_slice(start_offset, max_bytes, max_offset, min_one)[0]

    def read_slice(
        self, start_offset: int, max_bytes: int, max_offset: int | None = None, min_one: bool = True
    ) -> tuple[bytes, bool]:
        """Like read(), plus whether the bytes run to the end of the segment (so a reader may go on)."""
        try:
            return self._read_slice(start_offset, max_bytes, max_offset, min_one)
        except _LyingIndexError as lie:
            self.rebuild_indexes(str(lie))
            return self._read_slice(start_offset, max_bytes, max_offset, min_one)

    def _read_slice(
        self, start_offset: int, max_bytes: int, max_offset: int | None, min_one: bool
    ) -> tuple[bytes, bool]:
        size = self._size
        found = self._find_batch(start_offset)
        if found is None:
            return b"", True
        start = found[0]
        stop = self._stop_position(start, size, max_bytes, max_offset, min_one)
        if stop <= start:
            return b"", False
        data = self.fs.pread(self._fd, stop - start, start)
        if len(data) != stop - start:
            raise OSError(f"{self.log_path.name}: short read of {len(data)} bytes at {start}, wanted {stop - start}")
        return data, stop == size

    def _stop_position(self, start: int, size: int, max_bytes: int, max_offset: int | None, min_one: bool) -> int:
        """Where a read starting at start must stop: a batch boundary within both limits."""
        limit = start + max(0, max_bytes)
        # Every batch before an indexed one ends at or before it, and has smaller offsets, so jump to the
        # latest indexed batch that is inside both limits and only scan headers from there.
        entry = self.offset_index.lookup_position(limit)
        if max_offset is not None:
            before_max = self.offset_index.lookup(max_offset)
            if before_max[1] < entry[1]:
                entry = before_max
        headers = self._scan_from(entry, size) if entry[1] > start else self.iter_headers(start, size)
        for batch_position, header in headers:
            end = batch_position + header.batch_length + LOG_OVERHEAD
            if max_offset is not None and header.base_offset + header.last_offset_delta >= max_offset:
                return batch_position
            if end > limit:
                return end if batch_position == start and min_one else batch_position
        return size

    def find_offset_for_timestamp(self, timestamp_ms: int) -> int | None:
        """Base offset of the first batch with maxTimestamp >= timestamp_ms; None if there is none here."""
        try:
            return self._find_offset_for_timestamp(timestamp_ms)
        except _LyingIndexError as lie:
            self.rebuild_indexes(str(lie))
            return self._find_offset_for_timestamp(timestamp_ms)

    def _find_offset_for_timestamp(self, timestamp_ms: int) -> int | None:
        if self._max_timestamp < timestamp_ms:
            return None
        entry = self.time_index.lookup_entry(timestamp_ms)  # (T, O): the batch at O has maxTimestamp T
        start = self.base_offset if entry is None else entry[1]
        for _, header in self._scan_from(self.offset_index.lookup(start), self._size):
            if header.base_offset + header.last_offset_delta < start:
                continue  # before the entry's batch, so no newer than its timestamp, which is too old
            if entry is not None:
                if (header.base_offset, header.max_timestamp) != (start, entry[0]):
                    raise _LyingIndexError(f"its time index entry ({entry[0]}, offset {start}) names no such batch")
                entry = None  # checked
            if header.max_timestamp >= timestamp_ms:
                return header.base_offset
        return None

    def read_header_at(self, position: int) -> BatchHeader:
        return read_header(self.fs.pread(self._fd, HEADER_SIZE, position))

    def pread(self, position: int, size: int) -> bytes:
        return self.fs.pread(self._fd, size, position)

    # ---------------------------------------------------------------------------------------- truncation

    def truncate_to(self, offset: int) -> int:
        """Drop every batch holding an offset >= offset (a batch that straddles it goes too); return the
        number of bytes removed."""
        found = self.find_batch(offset)
        if found is None:
            return 0
        position = found[0]
        removed = self._size - position
        self.offset_index.truncate_to(found[1].base_offset)
        self.time_index.truncate_to(found[1].base_offset)
        self.fs.ftruncate(self._fd, position)
        self._flushed_size = min(self._flushed_size, position)
        # A cut of fsynced bytes leaves size == flushed size: without this, no flush would fsync the new size,
        # and a power cut would bring the cut batches back under offsets written since.
        self._cut_unsynced = True
        problem = self._scan_tail(position, check_time_index=False)
        if problem is not None:
            raise LogSegmentBrokenError(f"after truncating to byte {position}: {problem}")
        self.time_index.maybe_append(self._max_timestamp, self._offset_of_max_timestamp)
        self.time_index.write_pending()
        if not self._size:
            self.rolling_base_ms = None
        return removed

    # ---------------------------------------------------------------------------------------- files

    def flush(self, indexes: bool = True) -> None:
        """fsync the log and (unless indexes=False) the indexes. Safe from a flusher thread while the owner
        appends: it only fsyncs, and only claims the size it saw before the fsync started.

        indexes=False is for the active segment's routine flushes: after a crash the loader rebuilds the indexes
        of every segment the recovery checkpoint does not cover, which is always the active one (a segment is
        trusted only once a later one starts at or below the checkpoint), so its index files need no fsync
        until the segment is sealed or the log closed. Each one cost an fsync per index file every few flushes
        (1.5 fsyncs per acks=all write on average, measured with strace)."""
        unsynced = self.begin_sync()
        if unsynced is not None:
            try:
                self.fs.fsync(self._fd)
            except OSError as exc:
                self.end_sync(unsynced, exc)
                raise
        if indexes:
            self.offset_index.sync()
            self.time_index.sync()
        if unsynced is not None:
            self.end_sync(unsynced, None)

    def begin_sync(self) -> UnsyncedLog | None:
        """The first half of a flush of the log file alone, for an fsync of self.fd that runs elsewhere (the
        broker's native fsync threads): what it will cover, or None when every byte is fsynced already."""
        if self._size == self._flushed_size and not self._cut_unsynced:
            return None
        unsynced = UnsyncedLog(self._size, self._cut_unsynced)
        self._cut_unsynced = False
        return unsynced

    def end_sync(self, unsynced: UnsyncedLog, error: OSError | None) -> None:
        """The second half, once that fsync returned (error: it failed, and the bytes are written again so that
        the next one does not take dropped pages for synced ones)."""
        if error is not None:
            self._cut_unsynced = self._cut_unsynced or unsynced.cut
            self._redirty(self._flushed_size, unsynced.size)
            return
        self._flushed_size = max(self._flushed_size, unsynced.size)

    @property
    def fd(self) -> int:
        """The log file's descriptor (in the segment's FileSystem)."""
        return self._fd

    def _redirty(self, start: int, end: int) -> None:
        """After a failed fsync, write bytes start..end again, the same bytes the page cache shows. Linux marks
        the pages a failed fsync could not write clean, so no later fsync would write them, yet reads keep
        showing them: a recovery that read them (this process's, or the next one's after kill -9) would take
        them for durable. Dirty again, the next fsync writes them or fails again. Best effort: the caller
        raises the fsync's error either way."""
        try:
            data = self.fs.pread(self._fd, end - start, start)
            # A descriptor of its own: on Linux, pwrite on the segment's O_APPEND descriptor appends (pwrite(2)).
            # fsync is per file, so the segment's next fsync writes these pages whichever descriptor dirtied them.
            fd = self.fs.open(self.log_path, os.O_WRONLY)
            try:
                self.fs.pwrite(fd, data, start)
                self.fs.ftruncate(fd, end)  # and the size again: a cut the failed fsync dropped is redone
            finally:
                self.fs.close(fd)
        except OSError as exc:
            logger.warning("%s: could not rewrite bytes %d..%d after a failed fsync (%s); they may not be on the "
                           "disk although reads show them", self.log_path, start, end, exc)

    @property
    def dirty(self) -> bool:
        return self._size != self._flushed_size or self._cut_unsynced

    def close(self) -> None:
        if self._fd >= 0:
            self.fs.close(self._fd)
            self._fd = -1
        self.offset_index.close()
        self.time_index.close()

    def delete(self) -> None:
        self.close()
        for path in (self.log_path, self.offset_index.path, self.time_index.path):
            self.fs.unlink(path, missing_ok=True)

    def __repr__(self) -> str:
        return f"LogSegment({self.log_path.name}, size={self._size}, next_offset={self._next_offset})"


class LogSegmentBrokenError(OSError):
    """A failed write could not be undone; the segment's file no longer matches its in-memory state."""


def _tail_problem(
    header: BatchHeader, position: int, expected_position: int, expected_offset: int, indexed_position: int,
    entry: tuple[int, int] | None, interval: int, log_size: int,
) -> str | None:
    """Why a batch met while trusting the indexes contradicts them; None when it fits."""
    if header.magic != MAGIC:
        return f"batch at byte {position} has magic {header.magic}"
    if position != expected_position:
        return f"batch at byte {position} does not follow the previous one"
    if position + header.batch_length + LOG_OVERHEAD > log_size:
        return f"batch at byte {position} runs past the end of the file"
    if entry is not None and position == indexed_position and header.base_offset != expected_offset:
        return f"index entry says offset {expected_offset} at byte {position}, the batch there has {header.base_offset}"
    if header.base_offset < expected_offset or header.last_offset_delta < 0:
        return f"batch at byte {position} has offset {header.base_offset}, expected at least {expected_offset}"
    if position > indexed_position and position - indexed_position >= interval:
        return f"the offset index is missing an entry for the batch at byte {position}"
    return None
