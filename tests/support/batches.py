"""Batches whose records contradict their header, each with a valid CRC: what a buggy or hostile producer
could send, and what only a walk of the record section catches."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

import zstandard
from logbroker_client import records as rec

_LAST_OFFSET_DELTA = struct.Struct(">i")
_LAST_OFFSET_DELTA_POSITION = 23
TIMESTAMP_MS = 1_700_000_000_000


def record(offset_delta: int, value: bytes = b"value", key: bytes | None = None) -> bytes:
    return rec.encode_record(offset_delta, 0, key, value)


def section(count: int) -> bytes:
    """count well-formed records with offset deltas 0..count-1."""
    return b"".join(record(i, b"v%d" % i) for i in range(count))


def seal(records: bytes, count: int, attributes: int = 0) -> bytes:
    """A batch around records, claiming count records, with a CRC that matches."""
    return rec.build_batch_from_records(records, count=count, base_timestamp=TIMESTAMP_MS,
                                        max_timestamp=TIMESTAMP_MS, attributes_extra=attributes)


def with_crc(batch: bytes | bytearray) -> bytes:
    fixed = bytearray(batch)
    struct.pack_into(">I", fixed, rec.CRC_POSITION, rec.crc32c(bytes(fixed[rec.CRC_START:])))
    return bytes(fixed)


def more_records_than_the_header() -> bytes:
    return seal(section(4), count=3)


def fewer_records_than_the_header() -> bytes:
    return seal(section(2), count=3)


def record_longer_than_the_batch() -> bytes:
    body = record(2)[1:]  # the record without its (one-byte) length
    return seal(section(2) + rec.encode_varint(len(body) + 40) + body, count=3)


def trailing_bytes() -> bytes:
    return seal(section(3) + b"\x00\x00\x00", count=3)


def offset_deltas_out_of_order() -> bytes:
    return seal(record(0) + record(1) + record(7), count=3)


def last_offset_delta_disagrees() -> bytes:
    batch = bytearray(seal(section(3), count=3))
    _LAST_OFFSET_DELTA.pack_into(batch, _LAST_OFFSET_DELTA_POSITION, 5)
    return with_crc(batch)


def zstd_flag_over_raw_records() -> bytes:
    return seal(section(3), count=3, attributes=rec.COMPRESSION_ZSTD)


def key_longer_than_its_record() -> bytes:
    body = bytearray(record(1, key=b"kk")[1:])
    body[3] = rec.encode_varint(30)[0]  # attributes, timestampDelta, offsetDelta, then keyLength
    return seal(record(0) + rec.encode_varint(len(body)) + bytes(body) + record(2), count=3)


def zstd_frame(data: bytes, declare_size: bool = True) -> bytes:
    """One zstd frame; streaming compressors (the Java client's) do not write the content size."""
    if declare_size:
        return zstandard.ZstdCompressor().compress(data)
    out = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as writer:
        writer.write(data)
    return out.getvalue()


def zstd_bomb(expanded_bytes: int) -> bytes:
    """A zstd batch of a few kilobytes whose one record expands to about expanded_bytes."""
    out = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as writer:
        value_bytes = expanded_bytes - 20
        body = b"\x00\x00\x00\x01" + rec.encode_varint(value_bytes)
        writer.write(rec.encode_varint(len(body) + value_bytes + 1) + body)
        chunk = bytes(1 << 20)
        for _ in range(value_bytes >> 20):
            writer.write(chunk)
        writer.write(bytes(value_bytes & ((1 << 20) - 1)) + b"\x00")
    return seal(out.getvalue(), count=1, attributes=rec.COMPRESSION_ZSTD)


# Each kind of lie, with the words the refusal must contain.
LYING_BATCHES: dict[str, tuple[Callable[[], bytes], str]] = {
    "more records": (more_records_than_the_header, "header says 3 records, the batch holds 4"),
    "fewer records": (fewer_records_than_the_header, "header says 3 records, the batch holds 2"),
    "record past the end": (record_longer_than_the_batch, "record 2 is"),
    "trailing bytes": (trailing_bytes, "header says 3 records, but 3 more bytes follow them"),
    "offset deltas": (offset_deltas_out_of_order, "record 2 has offsetDelta 7, expected 2"),
    "lastOffsetDelta": (last_offset_delta_disagrees, "recordsCount 3 does not match lastOffsetDelta 5"),
    "zstd over raw bytes": (zstd_flag_over_raw_records, "zstd payload does not decompress"),
    "key past its record": (key_longer_than_its_record, "record 1 runs past the end of the batch"),
}
HEADER_LIES = ("lastOffsetDelta", "zstd over raw bytes")  # refused before any record is walked
