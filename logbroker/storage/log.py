"""PartitionLog: one partition's log, a directory of segments.

Threading: one owning thread appends, reads, truncates and applies retention. flush() alone may also run
in one background thread at the same time (group commit). Every change to the segment list and to the
durable offset happens under self._lock, and flush() holds it while it fsyncs, so a flush never sees a
segment closed under it. The segment list is copy-on-write, so the owner's appends and reads never take
the lock (rolling a segment does, and may wait for a running fsync).
"""

from __future__ import annotations

import errno
import logging
import resource
import struct
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from logbroker_client.records import HEADER_SIZE, LOG_OVERHEAD

from logbroker.storage import filenames
from logbroker.storage.compaction import compact_segment, latest_offsets
from logbroker.storage.config import LogConfig
from logbroker.storage.errors import (
    InvalidAppendError,
    LogClosedError,
    LogDirectoryError,
    OffsetOutOfRangeError,
    RecordTooLargeError,
    StorageFullError,
)
from logbroker.storage.files import OS_FILES, FileSystem, fsync_dir, write_file_atomically
from logbroker.storage.leader_epochs import LeaderEpochCache
from logbroker.storage.recovery import RecoveryReport, recover_segment
from logbroker.storage.segment import BatchInfo, LogSegment, LogSegmentBrokenError, UnsyncedLog

logger = logging.getLogger("logbroker.storage")

# Header fields the leader needs per batch: batchLength, lastOffsetDelta, maxTimestamp.
_LEADER_FIELDS = struct.Struct(">8xi11xi8xq")
# And a follower: baseOffset, batchLength, partitionLeaderEpoch, lastOffsetDelta, maxTimestamp.
_REPLICA_FIELDS = struct.Struct(">qii7xi8xq")
# baseOffset and partitionLeaderEpoch lie outside the CRC, so stamping them in place keeps the batch valid.
_BASE_OFFSET = struct.Struct(">q")
_EPOCH = struct.Struct(">i")
_EPOCH_POSITION = 12

CHECKPOINT_VERSION = 1


class CompactionResult(NamedTuple):
    segments_rewritten: int
    records_removed: int
    bytes_removed: int


class PendingFlush(NamedTuple):
    """A flush between begin_flush and end_flush."""

    segment: LogSegment
    unsynced: UnsyncedLog | None
    fd: int | None  # the descriptor to fsync (in the log's FileSystem), or None: nothing to fsync
    target: int  # the log end when it began: every offset below it is durable once the fsync succeeds
    started_s: float


class AppendResult(NamedTuple):
    base_offset: int
    last_offset: int
    max_timestamp: int  # largest batch maxTimestamp among the appended batches
    position_in_log: int  # byte position of the first appended batch inside its segment's .log file


def too_many_open_files(what: str, exc: OSError) -> str:
    """What to tell the operator when the process runs out of file descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    scope = "the machine's (fs.file-max)" if exc.errno == errno.ENFILE else f"this process's ({soft}; hard {hard})"
    return (f"{what}: out of file descriptors: {exc}. Every partition replica keeps its active segment open "
            f"(one descriptor, two more once its indexes get entries), so the open-file limit must exceed "
            f"about 3 x the partitions this broker holds plus its connections; {scope} limit is reached. Raise it "
            "(`ulimit -n 65536` before starting, LimitNOFILE= in a systemd unit, or nofile in "
            "/etc/security/limits.conf) and restart the broker")


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class PartitionLog:
    def __init__(self, directory: Path, config: LogConfig, topic: str, partition: int,
                 fs: FileSystem = OS_FILES) -> None:
        """Use PartitionLog.open(); this only sets up an empty, unloaded object."""
        self.directory = directory
        self.fs = fs  # every file access goes through it (the real OS unless a simulation passes its disk)
        self.config = config
        self.topic = topic
        self.partition = partition
        self.name = f"{topic}-{partition}"
        self._lock = threading.Lock()
        self._bases: list[int] = []
        self._segments: list[LogSegment] = []
        self._next_offset = 0
        self._durable_offset = 0
        self._checkpointed_offset = 0  # the offset the recovery checkpoint file holds
        self._closed = False
        self._epochs_unsaved = False  # an append began an epoch the leader-epoch file does not hold yet
        self._broken: str | None = None
        # Set by a failed fsync: from this offset on, what reads still show may never reach the disk (Linux
        # marks the pages clean after the error, and a later fsync succeeds without writing them).
        self._unsynced_from: int | None = None
        self._first_flush_syncs: list[Callable[[], None]] = []  # see sync_at_first_flush
        # Set by the load: the directory held no segment (a new partition, or its files were deleted). A replica
        # whose Raft state survives elsewhere tells the two apart (Replica.lost_its_log).
        self.found_no_segments = False
        # Also set by the load: (where the log now ends, the durable offset the recovery checkpoint recorded) when
        # the segments end below what this log once made durable: its newest segment files were deleted, or cut
        # below the checkpoint. A Raft replica must then catch up before it votes (Replica.lost_its_log).
        self.lost_durable_records: tuple[int, int] | None = None
        self.epochs = LeaderEpochCache(directory, self.name, fs)
        # Told how long each flush() that made new data durable took, in seconds (the broker's fsync metric);
        # called in the flushing thread.
        self.flush_observer: Callable[[float], None] | None = None

    # =========================================================================================== opening

    @classmethod
    def open(cls, directory: Path, config: LogConfig, topic: str, partition: int,
             fs: FileSystem = OS_FILES) -> PartitionLog:
        """Load the partition in directory (created if missing), recovering whatever a crash left behind."""
        log = cls(Path(directory), config, topic, partition, fs)
        try:
            fs.mkdir(log.directory)
            log._load()
        except OSError as exc:
            log._close_files()
            raise log._io_error(f"opening {log.directory}", exc) from exc
        return log

    def _load(self) -> None:
        started = time.monotonic()
        marker = self.directory / filenames.CLEAN_SHUTDOWN_FILE
        clean = self.fs.exists(marker)
        recorded = self._read_checkpoint()  # written at every clean close too, with the whole log durable
        checkpoint = None if clean else recorded
        self._remove_stray_files()
        segments, recovered = self._load_segments(self._segment_bases(), clean, checkpoint)
        created = self.found_no_segments = not segments
        if segments and recorded is not None and recorded > segments[-1].next_offset:
            self.lost_durable_records = (segments[-1].next_offset, recorded)
            logger.error("%s: the log ends at offset %d, below offset %d up to which it was once fsynced (the "
                         "recovery checkpoint says so): its newest segment files were deleted or cut short. Records "
                         "%d..%d are gone from this disk; a replicated partition fetches them again from its leader",
                         self.name, segments[-1].next_offset, recorded, segments[-1].next_offset, recorded - 1)
        if created:
            segments = [LogSegment.create(self.directory, 0, self.config.index_interval_bytes, wall_clock_ms(),
                                          self.fs)]
            # The new file's name needs to be durable only before anything in it counts as durable: the first
            # flush does it (creating thousands of partitions at once paid this fsync on the event loop each).
            self.sync_at_first_flush(lambda: fsync_dir(self.directory, self.fs))
        self._set_segments(segments)
        self._next_offset = segments[-1].next_offset
        for segment in recovered:
            segment.flush()  # what recovery kept is now durable, so the checkpoint may cover it
        self._durable_offset = self._next_offset
        if not (created and checkpoint is None and not clean):
            # A new log has nothing a checkpoint could let recovery skip (its one segment is always checked).
            self._write_checkpoint(durable=True)
        self.epochs.load(self.log_start_offset, self._next_offset, self._epoch_on_disk, self._batch_epochs_from)
        if clean:
            # The log is open for writing again: a crash from now on must not skip recovery.
            self.fs.unlink(marker)
            fsync_dir(self.directory, self.fs)
        if recovered:
            logger.info(
                "%s: loaded %d segments (%d recovered) in %.0f ms; offsets %d..%d",
                self.name, len(segments), len(recovered), (time.monotonic() - started) * 1000,
                self.log_start_offset, self._next_offset,
            )

    def _segment_bases(self) -> list[int]:
        bases = []
        for name in self.fs.listdir(self.directory):
            parsed = filenames.parse_segment_file_name(name)
            if parsed is not None and parsed[1] == filenames.LOG_SUFFIX:
                bases.append(parsed[0])
        return sorted(bases)

    def _remove_stray_files(self) -> None:
        """Temp files of an interrupted write, and indexes whose .log is gone, are garbage."""
        logs = set()
        indexes = []
        for name in sorted(self.fs.listdir(self.directory)):
            path = self.directory / name
            if name.endswith((filenames.TEMP_SUFFIX, filenames.CLEANED_SUFFIX)):
                self.fs.unlink(path)
                continue
            parsed = filenames.parse_segment_file_name(name)
            if parsed is None:
                continue
            if parsed[1] == filenames.LOG_SUFFIX:
                logs.add(parsed[0])
            else:
                indexes.append((parsed[0], path))
        for base, path in indexes:
            if base not in logs:
                self.fs.unlink(path)

    def _load_segments(
        self, bases: list[int], clean: bool, checkpoint: int | None
    ) -> tuple[list[LogSegment], list[LogSegment]]:
        """Open every segment, trusting or recovering each; stop at (and delete from) the first break."""
        segments: list[LogSegment] = []
        recovered: list[LogSegment] = []
        try:
            self._load_each(bases, clean, checkpoint, segments, recovered)
        except BaseException:
            for segment in segments:
                segment.close()
            raise
        return segments, recovered

    def _load_each(
        self, bases: list[int], clean: bool, checkpoint: int | None,
        segments: list[LogSegment], recovered: list[LogSegment],
    ) -> None:
        interval = self.config.index_interval_bytes
        allow_gaps = self._allows_gaps()
        for i, base in enumerate(bases):
            later = bases[i + 1:]
            segment = LogSegment.open_existing(self.directory, base, interval, self.fs)
            if segments and not self._continues(segments[-1], base):
                segment.close()
                self._drop_segments([base, *later], f"segment {filenames.log_file_name(base)} does not continue "
                                    f"the log, which ends at offset {segments[-1].next_offset}")
                break
            # A segment may hold offsets at or past the checkpoint (i.e. not known to be fsynced) unless the
            # next segment starts at or before the checkpoint.
            trusted = clean or (checkpoint is not None and bool(later) and later[0] <= checkpoint)
            # The last segment's tail is CRC-checked too (it is cheap), so damage there is cut now, not met
            # later by a replica reading its last entries.
            problem = (segment.load_trusted(check_tail=not later, allow_gaps=allow_gaps) if trusted
                       else "not covered by the recovery checkpoint")
            if problem is not None:
                if trusted:
                    logger.warning("%s: recovering %s (every batch checked, indexes rebuilt): %s",
                                   self.name, segment.log_path.name, problem)
                report = recover_segment(segment, base, allow_gaps=allow_gaps)
                recovered.append(segment)
                self._log_recovery(report)
                if report.truncated and later:
                    segments.append(segment)
                    self._drop_segments(later, f"segment {report.file_name} was truncated by recovery")
                    break
            segments.append(segment)

    def _allows_gaps(self) -> bool:
        return self.config.compacted or self.fs.exists(self.directory / filenames.COMPACTED_MARKER_FILE)

    def _continues(self, previous: LogSegment, base: int) -> bool:
        if self._allows_gaps():
            return previous.next_offset <= base
        return previous.next_offset == base

    def _drop_segments(self, bases: list[int], why: str) -> None:
        for base in bases:
            for name in (filenames.log_file_name(base), filenames.index_file_name(base),
                         filenames.time_index_file_name(base)):
                self.fs.unlink(self.directory / name, missing_ok=True)
        logger.error(
            "%s: %s; deleted %d later segment(s) from %s on, since the log must stay contiguous",
            self.name, why, len(bases), filenames.log_file_name(bases[0]),
        )

    def _log_recovery(self, report: RecoveryReport) -> None:
        if report.truncated:
            logger.error("%s", report.describe(self.name))
        else:
            logger.info("%s", report.describe(self.name))

    # =========================================================================================== checkpoint

    def _read_checkpoint(self) -> int | None:
        """The offset below which everything was fsynced, or None (recover every segment)."""
        path = self.directory / filenames.RECOVERY_CHECKPOINT_FILE
        try:
            text = self.fs.read_bytes(path).decode("ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("%s: ignoring unreadable %s (%s); recovering every segment", self.name, path.name, exc)
            return None
        lines = text.split("\n")
        if len(lines) == 3 and lines[0] == str(CHECKPOINT_VERSION) and lines[1].isdigit() and lines[2] == "":
            return int(lines[1])
        logger.warning("%s: ignoring malformed %s; recovering every segment", self.name, path.name)
        return None

    def _checkpoint_is_behind(self) -> bool:
        """Whether the checkpoint misses the newest segment's base, or (with older segments beside it, which
        would load cleanly without it) its first durable records: see _write_checkpoint."""
        newest_base = self._bases[-1]
        return self._checkpointed_offset < newest_base or (
            self._checkpointed_offset == newest_base < self._durable_offset and len(self._bases) > 1)

    def _write_checkpoint(self, durable: bool) -> None:
        """Persist the durable offset. On the flush path it is not fsynced itself: losing it only means
        recovering more, and it is written after the data it covers was fsynced.

        Recovery trusts a segment when the next one starts at or below the checkpoint, so a newer
        checkpoint changes nothing for recovery until the durable offset passes a segment base the last one
        did not cover. flush() writes it then, and once more when the newest segment's first records are
        durable (a roll made right after an append creates it empty): the load tells from it that the newest
        segment's files were lost (lost_durable_records). At most twice per segment, never once per fsync
        (the file's write, close and rename were a third of a lone record's flush)."""
        data = f"{CHECKPOINT_VERSION}\n{self._durable_offset}\n".encode("ascii")
        write_file_atomically(self.directory / filenames.RECOVERY_CHECKPOINT_FILE, data, durable, self.fs)
        self._checkpointed_offset = self._durable_offset

    # =========================================================================================== state

    def _set_segments(self, segments: list[LogSegment]) -> None:
        # Replace, never mutate, so a reader holding the old lists keeps a consistent view.
        self._segments = list(segments)
        self._bases = [segment.base_offset for segment in segments]

    @property
    def log_start_offset(self) -> int:
        return self._segments[0].base_offset

    @property
    def log_end_offset(self) -> int:
        """The next offset to be assigned."""
        return self._next_offset

    @property
    def durable_offset(self) -> int:
        """Every offset below this one has been fsynced."""
        return self._durable_offset

    @property
    def unsynced_from(self) -> int | None:
        """After a failed fsync: the durable offset then. Offsets from it on may be lost on the disk whatever
        reads show, so whoever reopens the log must cut it there (Replica reports it as damaged_from)."""
        return self._unsynced_from

    def _fsync_failed(self) -> None:
        if self._unsynced_from is None:
            self._unsynced_from = self._durable_offset

    def forget_unsynced(self) -> int | None:
        """After a failed fsync, cut the files back to unsynced_from at once and refuse writes from then on;
        returns the new log end (None when nothing was cut).

        Linux drops the pages a failed fsync could not write, yet reads keep showing them and a later fsync
        succeeds without writing them: a process killed now would reopen the log whole and trust them, and a
        power cut later would take entries it acknowledged since. Cut in the page cache, a restart sees the
        log as the disk may hold it. Nothing is fsynced here (the disk is failing); whoever reopens the log
        cuts at the same offset again, durably."""
        with self._lock:
            cut = self._unsynced_from
            if cut is None or cut >= self._next_offset or self._closed:
                return None
            self._broken = self._broken or f"an fsync failed; offsets from {cut} on may not be on the disk"
            keep = [segment for segment in self._segments if segment.base_offset < cut] or self._segments[:1]
            try:
                for segment in self._segments[len(keep):]:
                    segment.delete()
                keep[-1].truncate_to(cut)
            except (OSError, LogSegmentBrokenError) as exc:
                logger.warning("%s: could not cut the log back to offset %d after a failed fsync (%s); reopening "
                               "it cuts there", self.name, cut, exc)
            self._set_segments(keep)
            self._next_offset = keep[-1].next_offset
            self.epochs.cut_from(self._next_offset)  # in memory only: saving it would need an fsync
        logger.warning("%s: an fsync failed, so offsets from %d on may never reach the disk; cut them from the "
                       "log (other replicas send them again)", self.name, cut)
        return self._next_offset

    @property
    def size_bytes(self) -> int:
        return sum(segment.size_bytes for segment in self._segments)

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def segments(self) -> list[LogSegment]:
        """A snapshot of the segments, oldest first (for metrics and tests; do not modify them)."""
        return list(self._segments)

    def update_config(self, config: LogConfig) -> None:
        """New retention, roll and flush settings apply from the next call on."""
        self.config = config

    # =========================================================================================== append

    def append(self, batches: bytearray, leader_epoch: int, now_ms: int) -> AppendResult:
        """Append validated batches as the leader: stamp consecutive offsets and the epoch in place, then
        write them. O(1) Python work per batch; records are never decoded."""
        self._check_writable()
        first = self._next_offset
        infos, next_offset, max_timestamp = self._stamp(batches, first, leader_epoch)
        result = self._write(batches, infos, next_offset, max_timestamp, leader_epoch, now_ms)
        self._note_epochs([(leader_epoch, first)])
        return result

    def append_replicated(self, batches: bytes | bytearray, now_ms: int | None = None) -> AppendResult:
        """Append batches copied from the leader, keeping their offsets and epochs; they must continue
        exactly at the log end (truncate_to the divergence point first)."""
        self._check_writable()
        infos, next_offset, max_timestamp, epoch_starts = self._check_replicated(batches)
        result = self._write(batches, infos, next_offset, max_timestamp, epoch_starts[-1][0],
                             wall_clock_ms() if now_ms is None else now_ms)
        self._note_epochs(epoch_starts)
        return result

    def _note_epochs(self, epoch_starts: list[tuple[int, int]]) -> None:
        """Record where new epochs begin, once their batches are written (O(1) unless an epoch is new). The file
        is written later (save_epochs): a new leader's first append must not wait on a file rewrite, which cost as
        much as the append's fsync when thousands of groups elected at once."""
        if any([self.epochs.assign(epoch, start) for epoch, start in epoch_starts if epoch >= 0]):
            self._epochs_unsaved = True

    @property
    def epochs_unsaved(self) -> bool:
        return self._epochs_unsaved

    def save_epochs(self) -> None:
        """Write the leader-epoch file if appends began epochs since it was last written. The owner calls this soon
        after such appends, off the write path, and close() does; until then the file is stale, which the next
        open notices and repairs with a scan of the batch headers after its last entry (leader_epochs.py)."""
        with self._lock:
            if self._epochs_unsaved and not self._closed:
                self._save_epochs()

    def _stamp(self, buf: bytearray, offset: int, epoch: int) -> tuple[list[BatchInfo], int, int]:
        infos: list[BatchInfo] = []
        max_timestamp = -1
        limit = self.config.max_message_bytes
        position = 0
        end = len(buf)
        while position < end:
            length, last_delta, batch_max_timestamp = self._unpack(_LEADER_FIELDS, buf, position)
            size = self._batch_size(length, last_delta, position, end)
            if size > limit:
                raise RecordTooLargeError(
                    f"{self.name}: a batch of {size} bytes exceeds max.message.bytes={limit}; "
                    f"send smaller batches or raise max.message.bytes for the topic"
                )
            _BASE_OFFSET.pack_into(buf, position, offset)
            _EPOCH.pack_into(buf, position + _EPOCH_POSITION, epoch)
            infos.append(BatchInfo(position, offset, offset + last_delta, batch_max_timestamp, size))
            max_timestamp = max(max_timestamp, batch_max_timestamp)
            offset += last_delta + 1
            position += size
        self._require_batches(infos)
        return infos, offset, max_timestamp

    def _check_replicated(self, buf: bytes | bytearray) -> tuple[list[BatchInfo], int, int, list[tuple[int, int]]]:
        """The batches' infos, the next offset, the max timestamp, and (epoch, first offset) at each change."""
        infos: list[BatchInfo] = []
        max_timestamp = -1
        epoch_starts: list[tuple[int, int]] = []
        expected = self._next_offset
        position = 0
        end = len(buf)
        while position < end:
            base, length, epoch, last_delta, batch_max_timestamp = self._unpack(_REPLICA_FIELDS, buf, position)
            size = self._batch_size(length, last_delta, position, end)
            if base != expected:
                raise InvalidAppendError(
                    f"{self.name}: replicated batch at byte {position} has baseOffset {base}, but the log "
                    f"continues at {expected}; truncate_to() the divergence point before appending"
                )
            infos.append(BatchInfo(position, base, base + last_delta, batch_max_timestamp, size))
            if not epoch_starts or epoch_starts[-1][0] != epoch:
                epoch_starts.append((epoch, base))
            max_timestamp = max(max_timestamp, batch_max_timestamp)
            expected = base + last_delta + 1
            position += size
        self._require_batches(infos)
        return infos, expected, max_timestamp, epoch_starts

    def _unpack(self, fields: struct.Struct, buf: bytes | bytearray, position: int) -> tuple:
        if len(buf) - position < HEADER_SIZE:
            raise InvalidAppendError(
                f"{self.name}: {len(buf) - position} trailing bytes at byte {position} are not a whole batch "
                f"header; append only whole, validated batches"
            )
        return fields.unpack_from(buf, position)

    def _batch_size(self, length: int, last_delta: int, position: int, end: int) -> int:
        size = length + LOG_OVERHEAD
        if size < HEADER_SIZE or position + size > end or last_delta < 0:
            raise InvalidAppendError(
                f"{self.name}: the batch at byte {position} claims {size} bytes and lastOffsetDelta "
                f"{last_delta}, which does not fit the {end} bytes given; append only whole, validated batches"
            )
        return size

    def _require_batches(self, infos: list[BatchInfo]) -> None:
        if not infos:
            raise InvalidAppendError(f"{self.name}: nothing to append; pass at least one batch")

    def _write(
        self, buf: bytes | bytearray, infos: list[BatchInfo], next_offset: int, max_timestamp: int,
        last_epoch: int, now_ms: int,
    ) -> AppendResult:
        """Write the batches, rolling between them so no segment outgrows segment.bytes (one call may carry
        many batches: a Raft follower writes a whole catch-up at once)."""
        chunks = self._split_for_segments(infos)
        result = None
        for chunk in chunks:
            start = chunk[0].position
            end = chunk[-1].position + chunk[-1].size
            data = buf if len(chunks) == 1 else memoryview(buf)[start:end]
            if len(chunks) > 1:
                chunk = [info._replace(position=info.position - start) for info in chunk]
            written = self._write_chunk(data, chunk, chunk[-1].last_offset + 1, max_timestamp, last_epoch, now_ms)
            result = written if result is None else result._replace(last_offset=written.last_offset)
        assert result is not None and self._next_offset == next_offset
        return result

    def _split_for_segments(self, infos: list[BatchInfo]) -> list[list[BatchInfo]]:
        """Consecutive runs of batches that each fit a segment of segment.bytes (a batch alone always does)."""
        limit = self.config.segment_bytes
        room = limit - self._segments[-1].size_bytes
        chunks: list[list[BatchInfo]] = [[]]
        used = 0
        for info in infos:
            if chunks[-1] and used + info.size > room:
                chunks.append([])
                used = 0
                room = limit
            chunks[-1].append(info)
            used += info.size
        return chunks if chunks[0] else chunks[1:]

    def _write_chunk(
        self, buf: bytes | bytearray | memoryview, infos: list[BatchInfo], next_offset: int, max_timestamp: int,
        last_epoch: int, now_ms: int,
    ) -> AppendResult:
        first = infos[0].base_offset
        segment = self._segments[-1]
        if self._should_roll(segment, len(buf), next_offset - 1, now_ms):
            segment = self._roll(now_ms)
        assert segment.next_offset == first == self._next_offset, "appends must continue at the log end"
        size_before = segment.size_bytes
        try:
            position = segment.append(buf, infos, last_epoch, now_ms)
        except LogSegmentBrokenError as exc:
            self._broken = str(exc)
            raise self._io_error(f"appending to {segment.log_path.name}", exc) from exc
        except OSError as exc:
            raise self._io_error(f"appending to {segment.log_path.name}", exc, unchanged=True) from exc
        assert segment.size_bytes == size_before + len(buf) and segment.next_offset == next_offset
        self._next_offset = next_offset  # last: a flusher thread must never see an offset before its bytes
        return AppendResult(first, next_offset - 1, max_timestamp, position)

    def would_roll(self, size: int, last_offset: int, now_ms: int) -> bool:
        """Whether an append of size bytes ending at last_offset rolls a new segment first: it would seal (fsync)
        the active segment and create files, which Replica keeps off its event loop."""
        return self._should_roll(self._segments[-1], size, last_offset, now_ms)

    def _should_roll(self, segment: LogSegment, size: int, last_offset: int, now_ms: int) -> bool:
        if segment.is_empty:
            return False
        if segment.size_bytes + size > self.config.segment_bytes or not segment.fits(size, last_offset):
            return True
        base_ms = segment.rolling_base_ms
        return base_ms is not None and now_ms - base_ms >= self.config.segment_ms

    def _roll(self, now_ms: int) -> LogSegment:
        """Seal (fsync) the active segment and start a new one at the log end."""
        with self._lock:
            old = self._segments[-1]
            try:
                old.seal()
                new = LogSegment.create(self.directory, self._next_offset, self.config.index_interval_bytes, now_ms,
                                        self.fs)
            except OSError as exc:
                self._fsync_failed()  # sealing the old segment fsyncs it
                raise self._io_error(f"rolling a new segment after {old.log_path.name}", exc, unchanged=True) from exc
            try:
                fsync_dir(self.directory, self.fs)
            except OSError as exc:
                new.delete()
                raise self._io_error(f"creating {new.log_path.name}", exc) from exc
            self._set_segments([*self._segments, new])
        logger.debug("%s: rolled segment %s at offset %d", self.name, new.log_path.name, new.base_offset)
        return new

    # =========================================================================================== read

    def read(self, offset: int, max_bytes: int, max_offset: int | None = None) -> bytes:
        """Whole batches from the one holding offset: at most max_bytes (but at least one batch), none whose
        last offset >= max_offset (the high watermark). offset == log end gives b""."""
        end = self._next_offset
        bases, segments = self._bases, self._segments
        self._check_range(offset, segments[0].base_offset, end)
        if offset == end or (max_offset is not None and offset >= max_offset):
            return b""
        i = bisect_right(bases, offset) - 1
        parts: list[bytes] = []
        remaining = max_bytes
        while i < len(segments):
            data, at_end = segments[i].read_slice(offset, remaining, max_offset, min_one=not parts)
            if data:
                parts.append(data)
                remaining -= len(data)
            i += 1
            if not at_end or remaining <= 0 or i == len(segments):
                break
            offset = segments[i].base_offset
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _check_range(self, offset: int, start: int, end: int) -> None:
        if offset < start or offset > end:
            raise OffsetOutOfRangeError(offset, start, end, self.name)

    def offset_for_timestamp(self, timestamp_ms: int) -> int | None:
        """Base offset of the first batch whose maxTimestamp >= timestamp_ms; None when there is none."""
        for segment in self._segments:
            if segment.max_timestamp >= timestamp_ms:
                found = segment.find_offset_for_timestamp(timestamp_ms)
                if found is not None:
                    return max(found, self.log_start_offset)
        return None

    def last_epoch(self) -> int:
        """partitionLeaderEpoch of the last batch; -1 for an empty log."""
        for segment in reversed(self._segments):
            if not segment.is_empty:
                return segment.last_epoch
        return -1

    def epoch_at(self, offset: int) -> int:
        """partitionLeaderEpoch of the batch holding offset: from the leader-epoch cache, never a disk read
        (the disk answers only for batches written without an epoch)."""
        if self.log_start_offset <= offset < self._next_offset:
            epoch = self.epochs.epoch_at(offset)
            if epoch is not None:
                return epoch
        return self._epoch_on_disk(offset)

    def _batch_epochs_from(self, offset: int) -> Iterator[tuple[int, int]]:
        """(base offset, epoch) of every batch from the one holding offset to the log end, from the headers."""
        segments = self._segments
        for segment in segments[max(0, bisect_right(self._bases, offset) - 1):]:
            found = segment.find_batch(offset)
            if found is None:
                continue
            for _, header in segment.iter_headers(found[0], segment.size_bytes):
                yield header.base_offset, header.leader_epoch

    def _epoch_on_disk(self, offset: int) -> int:
        """partitionLeaderEpoch of the batch holding offset, read from its header."""
        segments = self._segments
        end = self._next_offset
        if offset < segments[0].base_offset or offset >= end:
            raise OffsetOutOfRangeError(offset, segments[0].base_offset, end, self.name)
        for segment in segments[bisect_right(self._bases, offset) - 1:]:
            found = segment.find_batch(offset)
            if found is not None:
                return found[1].leader_epoch
        raise OffsetOutOfRangeError(offset, segments[0].base_offset, end, self.name)

    # =========================================================================================== flush

    def flush(self) -> int:
        """fsync everything appended before this call and persist the recovery checkpoint; return the
        durable offset. May run in one background thread while the owner keeps appending."""
        with self._lock:
            if self._closed:
                return self._durable_offset
            target = self._next_offset  # read first: every byte below it is already written
            started = time.perf_counter()
            try:
                self._run_first_flush_syncs()
                # Only the active segment can hold unsynced bytes: a segment is fsynced whole when sealed (a roll
                # whose seal fails leaves it active), and recovery, truncation and compaction flush what they
                # leave behind. Its indexes are left out: after a crash the loader rebuilds the active segment's.
                # (This ran over every segment on each flush: Python work per write growing with the log.)
                self._segments[-1].flush(indexes=False)
                self._flushed_to(target, started)
            except OSError as exc:
                self._fsync_failed()
                raise self._io_error("flushing", exc) from exc
            return self._durable_offset

    def begin_flush(self) -> PendingFlush | None:
        """flush() in two halves, for an fsync of the active segment's file that runs elsewhere (Replica hands it
        to the broker's native fsync threads: its event loop goes on meanwhile, and no Python thread takes the
        GIL for it). Returns what to fsync (pending.fd; None if nothing is unsynced), or None when flush() must
        run whole: a new partition's deferred syncs are owed first, or the log is closed. The owner appends
        nothing to this log until end_flush, which must follow whatever the fsync did."""
        with self._lock:
            if self._closed or self._first_flush_syncs:
                return None
            segment = self._segments[-1]
            unsynced = segment.begin_sync()
            return PendingFlush(segment, unsynced, segment.fd if unsynced is not None else None,
                                self._next_offset, time.perf_counter())

    def end_flush(self, pending: PendingFlush, error: OSError | None) -> int:
        """The second half: the fsync of pending.fd returned (error if it failed). Returns the durable offset,
        or raises StorageError as flush() does."""
        with self._lock:
            if self._closed:  # its files are closed: nothing to write again after a failure, nothing to record
                raise LogClosedError(f"{self.name}: the log was closed during its flush")
            try:
                if pending.unsynced is not None:
                    pending.segment.end_sync(pending.unsynced, error)
                if error is not None:
                    raise error
                self._flushed_to(pending.target, pending.started_s)
            except OSError as exc:
                self._fsync_failed()
                raise self._io_error("flushing", exc) from exc
            return self._durable_offset

    def _flushed_to(self, target: int, started_s: float) -> None:
        """Under the lock: every offset below target is fsynced now."""
        if target > self._durable_offset:
            self._durable_offset = target
            if self._checkpoint_is_behind():
                self._write_checkpoint(durable=False)
            if self.flush_observer is not None:
                self.flush_observer(time.perf_counter() - started_s)

    def sync_at_first_flush(self, sync: Callable[[], None]) -> None:
        """Run sync (an fsync of a file or directory this partition's creation left unsynced) in the next
        flush, before the data that flush makes durable: creating a partition costs no fsync of its own, and
        nothing that depends on its files is durable before they are."""
        with self._lock:
            self._first_flush_syncs.append(sync)

    def creation_made_durable(self) -> None:
        """The caller made this partition's new files and their names durable (FileSystemSync): the first flush
        owes no fsync for them any more."""
        with self._lock:
            self._first_flush_syncs.clear()

    def _run_first_flush_syncs(self) -> None:
        while self._first_flush_syncs:
            self._first_flush_syncs[0]()  # kept until it succeeds: a failed flush retries it
            del self._first_flush_syncs[0]

    # =========================================================================================== truncation

    def truncate_to(self, offset: int) -> int:
        """Drop every batch holding an offset >= offset (for Raft followers); return the new log end, which
        is lower than offset when offset falls inside a batch."""
        self._check_writable()
        with self._lock:
            if offset >= self._next_offset:
                return self._next_offset
            keep = [segment for segment in self._segments if segment.base_offset < offset]
            if not keep:
                self._reset_locked(offset)
                return self._next_offset
            try:
                for segment in self._segments[len(keep):]:
                    segment.delete()
                removed = keep[-1].truncate_to(offset)
                self._set_segments(keep)
                self._next_offset = keep[-1].next_offset
                self._durable_offset = min(self._durable_offset, self._next_offset)
                keep[-1].flush()
                fsync_dir(self.directory, self.fs)
                self._write_checkpoint(durable=True)
                if self.epochs.cut_from(self._next_offset):
                    self._save_epochs()
            except OSError as exc:
                self._broken = f"truncation failed: {exc}"
                raise self._io_error(f"truncating to offset {offset}", exc) from exc
        logger.info("%s: truncated to offset %d (%d bytes removed from the last segment)",
                    self.name, self._next_offset, removed)
        return self._next_offset

    def reset_to(self, start_offset: int) -> None:
        """Delete every segment and start empty at start_offset."""
        self._check_writable()
        if start_offset < 0:
            raise ValueError(f"{self.name}: cannot reset to negative offset {start_offset}")
        with self._lock:
            self._reset_locked(start_offset)
        logger.info("%s: reset, the log is now empty at offset %d", self.name, start_offset)

    def _reset_locked(self, start_offset: int) -> None:
        try:
            for segment in self._segments:
                segment.delete()
            segment = LogSegment.create(
                self.directory, start_offset, self.config.index_interval_bytes, wall_clock_ms(), self.fs
            )
            self._set_segments([segment])
            self._next_offset = start_offset
            self._durable_offset = start_offset
            fsync_dir(self.directory, self.fs)
            self._write_checkpoint(durable=True)
            self.epochs.clear()
            self._save_epochs()
        except OSError as exc:
            self._broken = f"reset failed: {exc}"
            raise self._io_error(f"resetting to offset {start_offset}", exc) from exc

    # =========================================================================================== retention

    def apply_retention(self, now_ms: int, max_offset: int | None = None) -> int:
        """Delete whole old segments by retention.ms and retention.bytes (never the active one, and none
        holding offsets >= max_offset when given, e.g. the high watermark); return how many. As in Kafka,
        a compacted log (cleanup.policy=compact) is not subject to retention."""
        self._check_writable()
        if self.config.compacted:
            return 0
        with self._lock:
            segments = self._segments
            count = self._expired_prefix(segments, now_ms, max_offset)
            if not count:
                return 0
            doomed, kept = segments[:count], segments[count:]
            self._set_segments(kept)
            if self._cut_epochs_before_start():
                self._save_epochs()
            try:
                for segment in doomed:
                    segment.delete()
                fsync_dir(self.directory, self.fs)
            except OSError as exc:
                raise self._io_error("deleting expired segments", exc) from exc
        logger.info("%s: retention deleted %d segment(s); log start offset is now %d",
                    self.name, count, self.log_start_offset)
        return count

    def segment_bases(self) -> list[int]:
        """The segments' base offsets, oldest first."""
        return list(self._bases)

    def retention_cut_point(self, now_ms: int, max_offset: int | None = None) -> int:
        """Where retention.ms / retention.bytes would make the log start now (the current start if nowhere),
        without deleting: the caller may need to save something about the batches before they go."""
        if self.config.compacted:
            return self.log_start_offset
        count = self._expired_prefix(self._segments, now_ms, max_offset)
        return self._segments[count].base_offset if count else self.log_start_offset

    def prefix_cut_point(self, below_offset: int) -> int:
        """Where the log would start after delete_segments_before(below_offset): the base of the first
        segment that must stay (the active one always stays)."""
        kept = [segment for segment in self._segments[:-1] if segment.next_offset > below_offset]
        return kept[0].base_offset if kept else self._segments[-1].base_offset

    def delete_segments_before(self, new_start: int) -> int:
        """Delete the closed segments that end at or below new_start (a segment base from prefix_cut_point);
        returns how many. The log then starts at new_start."""
        self._check_writable()
        with self._lock:
            segments = self._segments
            count = 0
            while count < len(segments) - 1 and segments[count].next_offset <= new_start:
                count += 1
            if not count:
                return 0
            doomed, kept = segments[:count], segments[count:]
            self._set_segments(kept)
            if self._cut_epochs_before_start():
                self._save_epochs()
            try:
                for segment in doomed:
                    segment.delete()
                fsync_dir(self.directory, self.fs)
            except OSError as exc:
                raise self._io_error("deleting segments below a snapshot", exc) from exc
        logger.info("%s: deleted %d segment(s) below offset %d; the log now starts at offset %d",
                    self.name, count, new_start, self.log_start_offset)
        return count

    def _save_epochs(self) -> None:
        """The epoch file is a cache the next open checks against the segments (a stale or missing one costs a
        scan): failing to write it (a full disk) must not fail, or leave half done, the change it follows. A
        retention that raised here had dropped its segments from the list but not from the disk, and the next
        open found them, then a gap, and cut everything after it (found by the runtime simulation)."""
        self._epochs_unsaved = False
        try:
            self.epochs.save()
        except OSError as exc:
            logger.warning("%s: could not write %s (%s); the next open rebuilds it from the segments", self.name,
                           self.epochs.path.name, exc)

    def _cut_epochs_before_start(self) -> bool:
        """Forget the epochs below the new log start; when the log is now empty (its only segment had no batch
        yet, say an append to it failed), the epoch that held the start holds nothing, and goes too."""
        cut = self.epochs.cut_before(self.log_start_offset)
        return self.epochs.cut_from(self._next_offset) or cut

    def _expired_prefix(self, segments: list[LogSegment], now_ms: int, max_offset: int | None) -> int:
        closed = segments[:-1]
        if max_offset is not None:
            closed = [segment for segment in closed if segment.next_offset <= max_offset]
        config = self.config
        count = 0
        if config.retention_ms >= 0:
            cutoff = now_ms - config.retention_ms
            while count < len(closed) and closed[count].retention_timestamp_ms < cutoff:
                count += 1
        if config.retention_bytes >= 0:
            # Like Kafka: delete the oldest segments while what remains is still at least retention.bytes.
            excess = sum(segment.size_bytes for segment in segments[count:]) - config.retention_bytes
            while count < len(closed) and excess - closed[count].size_bytes >= 0:
                excess -= closed[count].size_bytes
                count += 1
        return count

    # =========================================================================================== compaction

    def compact(self) -> CompactionResult:
        """Rewrite closed segments keeping only the last record per key (cleanup.policy=compact only).

        Run it from the owning thread; it decodes records, so keep it off the hot path."""
        self._check_writable()
        closed = self._segments[:-1]
        if not self.config.compacted or not closed:
            return CompactionResult(0, 0, 0)
        latest = latest_offsets(segment.pread(0, segment.size_bytes) for segment in closed)
        rewritten = removed = bytes_removed = 0
        for segment in closed:
            rewrite = compact_segment(segment.pread(0, segment.size_bytes), latest)
            if not rewrite.records_removed:
                continue
            bytes_removed += segment.size_bytes - len(rewrite.data)
            removed += rewrite.records_removed
            rewritten += 1
            self._replace_segment(segment, rewrite.data)
        if rewritten:
            logger.info("%s: compaction rewrote %d segment(s), removing %d superseded records (%d bytes)",
                        self.name, rewritten, removed, bytes_removed)
        return CompactionResult(rewritten, removed, bytes_removed)

    def _replace_segment(self, old: LogSegment, data: bytes) -> None:
        """Swap a segment's .log for a compacted copy; a crash at any point leaves the old or the new one."""
        directory = self.directory
        cleaned = directory / (old.log_path.name + filenames.CLEANED_SUFFIX)
        marker = directory / filenames.COMPACTED_MARKER_FILE
        try:
            write_file_atomically(cleaned, data, True, self.fs)  # complete and fsynced before the swap
            if not self.fs.exists(marker):
                write_file_atomically(marker, b"", True, self.fs)
        except OSError as exc:
            self.fs.unlink(cleaned, missing_ok=True)
            raise self._io_error(f"compacting {old.log_path.name}", exc, unchanged=True) from exc
        try:
            with self._lock:
                old.close()
                # Indexes go first, so a crash can never pair the new .log with the old indexes.
                self.fs.unlink(old.offset_index.path, missing_ok=True)
                self.fs.unlink(old.time_index.path, missing_ok=True)
                fsync_dir(directory, self.fs)
                self.fs.replace(cleaned, old.log_path)
                fsync_dir(directory, self.fs)
                new = LogSegment.open_existing(directory, old.base_offset, self.config.index_interval_bytes,
                                               self.fs)
                report = recover_segment(new, old.base_offset, allow_gaps=True)
                if report.truncated:
                    logger.error("%s", report.describe(self.name))
                new.flush()
                self._set_segments([new if segment is old else segment for segment in self._segments])
        except OSError as exc:
            self._broken = f"compaction failed: {exc}"
            raise self._io_error(f"compacting {old.log_path.name}", exc) from exc

    # =========================================================================================== closing

    def close(self) -> None:
        """Flush, record a clean shutdown (the next open skips recovery) and close the files."""
        if self._closed:
            return
        try:
            if self._broken is None:
                with self._lock:
                    if self._epochs_unsaved:
                        self._save_epochs()
                    self._segments[-1].seal()
                    for segment in self._segments:
                        segment.flush()
                    self._durable_offset = self._next_offset
                    self._write_checkpoint(durable=True)
                    write_file_atomically(self.directory / filenames.CLEAN_SHUTDOWN_FILE, b"", True, self.fs)
        except OSError as exc:
            raise self._io_error("closing", exc) from exc
        finally:
            self._close_files()

    def delete(self) -> None:
        """Close the files and remove the partition directory."""
        self._close_files()
        try:
            self.fs.rmtree(self.directory)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._io_error(f"deleting {self.directory}", exc) from exc

    def _close_files(self) -> None:
        with self._lock:
            self._closed = True
            for segment in self._segments:
                segment.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # =========================================================================================== errors

    def _check_writable(self) -> None:
        if self._closed:
            raise LogClosedError(f"{self.name}: the log is closed; reopen it with PartitionLog.open")
        if self._broken is not None:
            raise LogDirectoryError(
                f"{self.name}: the log refuses writes after an I/O failure ({self._broken}); "
                f"close and reopen it so recovery can repair it"
            )

    def _io_error(self, action: str, exc: OSError, unchanged: bool = False) -> LogDirectoryError:
        outcome = "; the log is unchanged" if unchanged else ""
        if exc.errno == errno.ENOSPC:
            return StorageFullError(
                f"{self.name}: disk full while {action} in {self.directory}{outcome}. "
                f"Free space on that disk (or lower retention.bytes / retention.ms) and retry"
            )
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return LogDirectoryError(too_many_open_files(f"{self.name}: {action} in {self.directory}", exc))
        return LogDirectoryError(
            f"{self.name}: I/O error while {action} in {self.directory}: {exc}. "
            f"Check the disk and permissions; the broker may need to move this partition elsewhere"
        )

    def __repr__(self) -> str:
        return f"PartitionLog({self.name}, offsets {self.log_start_offset}..{self._next_offset})"
