"""Log compaction (cleanup.policy=compact): keep only the last record per key in closed segments.

Off the hot path, so this may decode records. Offsets never change: a batch whose records all survive is
copied byte for byte; a batch that loses some becomes one new batch per run of consecutive surviving
offsets (record batch v2 requires lastOffsetDelta == recordsCount - 1), with its original epoch,
compression, attributes and producer fields; a batch that loses all disappears, leaving an offset gap.
Records without a key, tombstones (null values) and control batches are kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from logbroker_client.records import (
    COMPRESSION_MASK,
    LOG_OVERHEAD,
    BatchHeader,
    Record,
    build_batch_from_records,
    decode_records,
    encode_record,
    iter_batch_headers,
)


class SegmentRewrite(NamedTuple):
    data: bytes  # the compacted content of the segment
    records_removed: int


def latest_offsets(segments: Iterable[bytes]) -> dict[bytes, int]:
    """key -> offset of its last record across the given segment contents (oldest first)."""
    latest: dict[bytes, int] = {}
    for data in segments:
        for position, header in iter_batch_headers(data):
            if header.is_control:
                continue
            for record in decode_records(data, position, header):
                if record.key is not None:
                    latest[record.key] = record.offset
    return latest


def compact_segment(data: bytes, latest: dict[bytes, int]) -> SegmentRewrite:
    """The segment's batches without records that a later record with the same key supersedes."""
    parts: list[bytes] = []
    removed = 0
    for position, header in iter_batch_headers(data):
        raw = data[position:position + header.batch_length + LOG_OVERHEAD]
        if header.is_control:
            parts.append(raw)
            continue
        records = decode_records(data, position, header)
        kept = [r for r in records if r.key is None or latest.get(r.key, r.offset) == r.offset]
        removed += len(records) - len(kept)
        if len(kept) == len(records):
            parts.append(raw)
        else:
            parts.extend(_rebuild(header, run) for run in _consecutive_runs(kept))
    return SegmentRewrite(b"".join(parts), removed)


def _consecutive_runs(records: Sequence[Record]) -> list[list[Record]]:
    runs: list[list[Record]] = []
    for record in records:
        if runs and runs[-1][-1].offset + 1 == record.offset:
            runs[-1].append(record)
        else:
            runs.append([record])
    return runs


def _rebuild(header: BatchHeader, run: list[Record]) -> bytes:
    """One batch holding exactly the records of run, with the original batch's metadata."""
    base_offset = run[0].offset
    base_timestamp = run[0].timestamp
    body = b"".join(
        encode_record(r.offset - base_offset, r.timestamp - base_timestamp, r.key, r.value, r.headers)
        for r in run
    )
    base_sequence = header.base_sequence
    if base_sequence >= 0:
        base_sequence += base_offset - header.base_offset
    return build_batch_from_records(
        body,
        count=len(run),
        base_timestamp=base_timestamp,
        max_timestamp=max(r.timestamp for r in run),
        compression=header.attributes & COMPRESSION_MASK,
        base_offset=base_offset,
        leader_epoch=header.leader_epoch,
        attributes_extra=header.attributes & ~COMPRESSION_MASK,
        producer_id=header.producer_id,
        producer_epoch=header.producer_epoch,
        base_sequence=base_sequence,
    )
