"""The loader's recovery walk: validate a segment's batches, rebuild its indexes, cut off the bad tail.

A crash can leave a partial batch at the end of the active segment, and a bad disk can flip bits anywhere.
Recovery walks the .log from its first byte with validate_batch (size, magic, record count, CRC), checks
that offsets keep increasing (and, unless the log is compacted, continue without gaps), feeds every valid
batch to the segment's own indexing code, and truncates the file at the first byte that fails. The same walk
rebuilds a missing or corrupt index. Bad bytes never raise out of here: they become a RecoveryReport.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from logbroker_client.records import LOG_OVERHEAD, BatchHeader, iter_batch_headers, validate_batch

from logbroker.storage.files import Buffer
from logbroker.storage.offset_index import MAX_U32
from logbroker.storage.segment import LogSegment


@dataclass(frozen=True)
class RecoveryReport:
    file_name: str
    valid_bytes: int  # the .log now ends here
    truncated_bytes: int  # bytes cut off after the last valid batch
    valid_batches: int
    dropped_batches: int  # whole-looking batches in the cut-off bytes (their headers parse; not validated)
    next_offset: int  # one past the last valid offset
    reason: str | None  # why the walk stopped before the end of the file; None when every byte was valid

    @property
    def truncated(self) -> bool:
        return self.truncated_bytes > 0

    def describe(self, partition: str) -> str:
        """One log line for the operator."""
        if not self.truncated:
            return f"{partition}: segment {self.file_name} recovered: {_batches(self.valid_batches)}, all valid"
        return (
            f"{partition}: segment {self.file_name} truncated at byte {self.valid_bytes} ({self.reason}); "
            f"{_batches(self.dropped_batches)}, {self.truncated_bytes} bytes dropped; "
            f"{_batches(self.valid_batches)} kept, next offset {self.next_offset}"
        )


def _batches(count: int) -> str:
    return f"{count} batch" if count == 1 else f"{count} batches"


def recover_segment(segment: LogSegment, expected_offset: int, allow_gaps: bool) -> RecoveryReport:
    """Rebuild the segment's state and indexes from its .log; the first batch must start at expected_offset
    (or, when allow_gaps, at or after it)."""
    segment.begin_rebuild()
    size = segment.fs.getsize(segment.log_path)
    valid_bytes, valid_batches, dropped, reason = 0, 0, 0, None
    if size:
        with segment.fs.map_file(segment.log_path) as buf:
            valid_bytes, valid_batches, reason = _walk(buf, size, segment, expected_offset, allow_gaps)
            if reason is not None:
                dropped = _count_headers(buf, valid_bytes, size)
    truncated = segment.finish_rebuild()
    return RecoveryReport(
        file_name=segment.log_path.name,
        valid_bytes=valid_bytes,
        truncated_bytes=truncated,
        valid_batches=valid_batches,
        dropped_batches=dropped,
        next_offset=segment.next_offset,
        reason=reason,
    )


def _walk(
    buf: Buffer, size: int, segment: LogSegment, expected_offset: int, allow_gaps: bool
) -> tuple[int, int, str | None]:
    """(valid bytes, valid batches, reason the walk stopped early or None)."""
    position = 0
    batches = 0
    while position < size:
        try:
            header = validate_batch(buf, position, size)
        except (ValueError, struct.error) as exc:  # CorruptBatchError is a ValueError
            return position, batches, str(exc)
        problem = _offset_problem(header, position, expected_offset, allow_gaps, segment.base_offset)
        if problem is not None:
            return position, batches, problem
        segment.track_batch(position, header)
        position += header.batch_length + LOG_OVERHEAD
        expected_offset = header.base_offset + header.last_offset_delta + 1
        batches += 1
    return position, batches, None


def _offset_problem(
    header: BatchHeader, position: int, expected_offset: int, allow_gaps: bool, segment_base: int
) -> str | None:
    base = header.base_offset
    if base < expected_offset:
        return f"offset goes backwards: batch has baseOffset {base}, expected {expected_offset}"
    if base != expected_offset and not allow_gaps:
        return f"offset gap: batch has baseOffset {base}, expected {expected_offset}"
    if base + header.last_offset_delta - segment_base > MAX_U32 or position > MAX_U32:
        return f"batch at offset {base}, byte {position} does not fit the segment's 32-bit index"
    return None


def _count_headers(buf: Buffer, start: int, end: int) -> int:
    """How many batch headers chain through the dropped bytes; only a hint for the log line."""
    view = memoryview(buf)[start:end]
    try:
        return sum(1 for _ in iter_batch_headers(view))
    finally:
        view.release()
