"""Kafka RecordBatch v2, byte for byte: the one format on the wire and on disk.

Batch header (61 bytes, big-endian)::

    offset  size  field
         0     8  baseOffset            i64   stamped by the leader, outside the CRC
         8     4  batchLength           i32   bytes after this field (total size - 12)
        12     4  partitionLeaderEpoch  i32   stamped by the leader, outside the CRC
        16     1  magic                 i8    always 2
        17     4  crc                   u32   CRC-32C of bytes 21..end (attributes to the batch end)
        21     2  attributes            i16   bits 0-2 compression (0 none, 4 zstd), bit 3 timestamp
                                              type, bit 4 transactional, bit 5 control batch
        23     4  lastOffsetDelta       i32
        27     8  baseTimestamp         i64   ms since the epoch, the first record's timestamp
        35     8  maxTimestamp          i64
        43     8  producerId            i64   -1: no idempotent producer
        51     2  producerEpoch         i16
        53     4  baseSequence          i32
        57     4  recordsCount          i32
        61        records (compressed as one block when the compression bits are set)

Record (all integers are zig-zag varints unless noted)::

    length varint | attributes i8 | timestampDelta varlong | offsetDelta varint |
    keyLength varint (-1 = null) | key | valueLength varint (-1 = null) | value |
    headerCount varint | headers: (keyLength varint | key utf-8 | valueLength varint | value)*

The producer builds and compresses batches; the broker only reads the header and checks the CRC,
then stamps baseOffset and partitionLeaderEpoch in place, so it never decodes a record.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import crc32c as _crc32c
import zstandard

ByteSource = bytes | bytearray | memoryview | mmap.mmap  # anything struct and crc32c read directly

HEADER = struct.Struct(">qiibIhiqqqhii")
HEADER_SIZE = HEADER.size  # 61
assert HEADER_SIZE == 61

LOG_OVERHEAD = 12  # baseOffset + batchLength: the bytes not counted by batchLength
MAGIC = 2
CRC_START = 21  # the CRC covers attributes .. end
MAGIC_POSITION = 16
CRC_POSITION = 17

COMPRESSION_MASK = 0x07
COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 4
TIMESTAMP_TYPE_LOG_APPEND = 0x08
TRANSACTIONAL_FLAG = 0x10
CONTROL_FLAG = 0x20

NO_PRODUCER_ID = -1
NO_PRODUCER_EPOCH = -1
NO_SEQUENCE = -1

COMPRESSION_CODECS = {"none": COMPRESSION_NONE, "zstd": COMPRESSION_ZSTD}

_BASE_OFFSET_AND_LENGTH = struct.Struct(">qi")
_STAMP = struct.Struct(">qii")  # baseOffset, batchLength, partitionLeaderEpoch
_EPOCH = struct.Struct(">i")
_UINT32 = struct.Struct(">I")


class CorruptBatchError(ValueError):
    """The bytes are not a valid v2 record batch; the message says which check failed."""


class BatchHeader(NamedTuple):
    base_offset: int
    batch_length: int
    leader_epoch: int
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    base_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    records_count: int

    @property
    def size(self) -> int:
        """Total bytes of the batch, header included."""
        return self.batch_length + LOG_OVERHEAD

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta

    @property
    def is_control(self) -> bool:
        return bool(self.attributes & CONTROL_FLAG)

    @property
    def compression(self) -> int:
        return self.attributes & COMPRESSION_MASK


NO_HEADERS: tuple[tuple[str, bytes | None], ...] = ()


class Record(NamedTuple):
    """One decoded record (the consumer's ConsumerRecord). Offsets and timestamps are absolute."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]]  # a list, or the shared empty tuple when there are none


def crc32c(data: bytes | memoryview) -> int:
    return _crc32c.crc32c(data)


# --------------------------------------------------------------------------------------------- varints

def _zigzag_varint(value: int) -> bytes:
    n = (value << 1) ^ (value >> 63)
    n &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Precomputed encodings make the producer's per-record work a few table lookups.
_VARINT_TABLE_SIZE = 1 << 14
_VARINTS: list[bytes] = [_zigzag_varint(i) for i in range(_VARINT_TABLE_SIZE)]
_MINUS_ONE = _zigzag_varint(-1)
# Decoded value of every raw varint below 2**14 (one or two bytes on the wire).
_ZIGZAG: list[int] = [(n >> 1) ^ -(n & 1) for n in range(1 << 14)]


def encode_varint(value: int) -> bytes:
    """Zig-zag varint (varlong too: Python ints are unbounded, 64-bit wrap applies)."""
    if 0 <= value < _VARINT_TABLE_SIZE:
        return _VARINTS[value]
    return _zigzag_varint(value)


def decode_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Read a zig-zag varint at pos; return (value, next position)."""
    shift = 0
    n = 0
    while True:
        try:
            b = buf[pos]
        except IndexError:
            raise CorruptBatchError("record ends inside a varint") from None
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return (n >> 1) ^ -(n & 1), pos
        shift += 7
        if shift > 63:
            raise CorruptBatchError("varint longer than 10 bytes")


# ---------------------------------------------------------------------------------------- encoding

def encode_record(
    offset_delta: int,
    timestamp_delta: int,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]] = (),
) -> bytes:
    """One record with its length prefix."""
    parts = [b"\x00", encode_varint(timestamp_delta), encode_varint(offset_delta)]
    if key is None:
        parts.append(_MINUS_ONE)
    else:
        parts.append(encode_varint(len(key)))
        parts.append(key)
    if value is None:
        parts.append(_MINUS_ONE)
    else:
        parts.append(encode_varint(len(value)))
        parts.append(value)
    parts.append(encode_varint(len(headers)))
    for hkey, hvalue in headers:
        hk = hkey.encode()
        parts.append(encode_varint(len(hk)))
        parts.append(hk)
        if hvalue is None:
            parts.append(_MINUS_ONE)
        else:
            parts.append(encode_varint(len(hvalue)))
            parts.append(hvalue)
    body = b"".join(parts)
    return encode_varint(len(body)) + body


class BatchBuilder:
    """Accumulates records for one partition and seals them into a v2 batch.

    The per-record path is an append of a few precomputed varints to a list; the header,
    compression and CRC happen once, in build().
    """

    __slots__ = ("_parts", "count", "size_bytes", "base_timestamp", "max_timestamp", "compression")

    def __init__(self, compression: int = COMPRESSION_NONE) -> None:
        self._parts: list[bytes] = []
        self.count = 0
        self.size_bytes = HEADER_SIZE
        self.base_timestamp = -1
        self.max_timestamp = -1
        self.compression = compression

    def append(
        self,
        timestamp_ms: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]] = (),
    ) -> int:
        """Add a record; return its offset delta within the batch."""
        offset_delta = self.count
        if offset_delta == 0:
            self.base_timestamp = self.max_timestamp = timestamp_ms
        elif timestamp_ms > self.max_timestamp:
            self.max_timestamp = timestamp_ms
        if headers or key is not None and len(key) >= _VARINT_TABLE_SIZE or (
            value is not None and len(value) >= _VARINT_TABLE_SIZE
        ) or offset_delta >= _VARINT_TABLE_SIZE:
            record = encode_record(offset_delta, timestamp_ms - self.base_timestamp, key, value, headers)
        else:
            record = self._encode_small(offset_delta, timestamp_ms - self.base_timestamp, key, value)
        self._parts.append(record)
        self.count = offset_delta + 1
        self.size_bytes += len(record)
        return offset_delta

    @staticmethod
    def _encode_small(offset_delta: int, timestamp_delta: int, key: bytes | None, value: bytes | None) -> bytes:
        # The common case: no headers, small key and value, small deltas.
        ts = _VARINTS[timestamp_delta] if 0 <= timestamp_delta < _VARINT_TABLE_SIZE else _zigzag_varint(
            timestamp_delta
        )
        if key is None:
            k = _MINUS_ONE
            key = b""
        else:
            k = _VARINTS[len(key)]
        if value is None:
            v = _MINUS_ONE
            value = b""
        else:
            v = _VARINTS[len(value)]
        body = b"".join((b"\x00", ts, _VARINTS[offset_delta], k, key, v, value, b"\x00"))
        return _VARINTS[len(body)] + body

    def build(self, base_offset: int = 0, leader_epoch: int = -1, attributes_extra: int = 0,
              producer_id: int = NO_PRODUCER_ID, producer_epoch: int = NO_PRODUCER_EPOCH,
              base_sequence: int = NO_SEQUENCE) -> bytes:
        if not self.count:
            raise ValueError("cannot build an empty batch")
        return build_batch_from_records(
            b"".join(self._parts),
            count=self.count,
            base_timestamp=self.base_timestamp,
            max_timestamp=self.max_timestamp,
            compression=self.compression,
            base_offset=base_offset,
            leader_epoch=leader_epoch,
            attributes_extra=attributes_extra,
            producer_id=producer_id,
            producer_epoch=producer_epoch,
            base_sequence=base_sequence,
        )


_ZSTD_COMPRESSOR = zstandard.ZstdCompressor(level=3)
_ZSTD_DECOMPRESSOR = zstandard.ZstdDecompressor()


def build_batch_from_records(
    records: bytes,
    *,
    count: int,
    base_timestamp: int,
    max_timestamp: int,
    compression: int = COMPRESSION_NONE,
    base_offset: int = 0,
    leader_epoch: int = -1,
    attributes_extra: int = 0,
    producer_id: int = NO_PRODUCER_ID,
    producer_epoch: int = NO_PRODUCER_EPOCH,
    base_sequence: int = NO_SEQUENCE,
) -> bytes:
    """Seal already-encoded records (offset deltas 0..count-1) into a batch."""
    if compression == COMPRESSION_ZSTD:
        records = _ZSTD_COMPRESSOR.compress(records)
    elif compression != COMPRESSION_NONE:
        raise ValueError(f"unsupported compression codec {compression}")
    attributes = compression | attributes_extra
    header = bytearray(HEADER.pack(
        base_offset, HEADER_SIZE - LOG_OVERHEAD + len(records), leader_epoch, MAGIC, 0, attributes,
        count - 1, base_timestamp, max_timestamp, producer_id, producer_epoch, base_sequence, count,
    ))
    crc = _crc32c.crc32c(records, _crc32c.crc32c(header[CRC_START:]))
    _UINT32.pack_into(header, CRC_POSITION, crc)
    return bytes(header) + records


def build_batch(
    records: Sequence[tuple[int, bytes | None, bytes | None, Sequence[tuple[str, bytes | None]]]],
    compression: int = COMPRESSION_NONE,
    base_offset: int = 0,
    leader_epoch: int = -1,
) -> bytes:
    """Convenience: (timestamp_ms, key, value, headers) tuples into one batch."""
    builder = BatchBuilder(compression)
    for timestamp_ms, key, value, headers in records:
        builder.append(timestamp_ms, key, value, headers)
    return builder.build(base_offset, leader_epoch)


def build_control_batch(
    base_offset: int, leader_epoch: int, timestamp_ms: int, key: bytes = b"\x00\x00\x00\x00",
    value: bytes | None = None,
) -> bytes:
    """A one-record control batch (a new leader's no-op, a config change); never shown to consumers as a
    record. The key is Kafka's control record key: version i16, type i16."""
    builder = BatchBuilder()
    builder.append(timestamp_ms, key, value)
    return builder.build(base_offset, leader_epoch, attributes_extra=CONTROL_FLAG)


# ----------------------------------------------------------------------------------- broker-side checks

def read_header(buf: ByteSource, pos: int = 0) -> BatchHeader:
    """Parse the 61-byte header at pos (no CRC check)."""
    if len(buf) - pos < HEADER_SIZE:
        raise CorruptBatchError(f"batch header needs {HEADER_SIZE} bytes, {len(buf) - pos} remain")
    return BatchHeader._make(HEADER.unpack_from(buf, pos))


def validate_batch(buf: ByteSource, pos: int = 0, end: int | None = None) -> BatchHeader:
    """Check the batch at pos: size, magic, counts and CRC. O(1) Python work; the CRC runs in C."""
    if end is None:
        end = len(buf)
    if end - pos < HEADER_SIZE:
        raise CorruptBatchError(f"truncated batch: {end - pos} bytes, a header alone is {HEADER_SIZE}")
    header = BatchHeader._make(HEADER.unpack_from(buf, pos))
    if header.magic != MAGIC:
        raise CorruptBatchError(f"unsupported magic {header.magic}: only record batch v2 (magic 2) is accepted")
    size = header.batch_length + LOG_OVERHEAD
    if size < HEADER_SIZE:
        raise CorruptBatchError(f"batchLength {header.batch_length} is smaller than a header")
    if size > end - pos:
        raise CorruptBatchError(f"truncated batch: batchLength says {size} bytes, {end - pos} present")
    if header.records_count < 1 or header.last_offset_delta != header.records_count - 1:
        raise CorruptBatchError(
            f"recordsCount {header.records_count} does not match lastOffsetDelta {header.last_offset_delta}"
        )
    view = memoryview(buf)[pos + CRC_START:pos + size]
    actual = _crc32c.crc32c(view)
    if actual != header.crc:
        raise CorruptBatchError(f"CRC mismatch: header says {header.crc:#010x}, bytes give {actual:#010x}")
    return header


def iter_batch_headers(buf: ByteSource) -> Iterator[tuple[int, BatchHeader]]:
    """Walk concatenated batches, yielding (position, header); stops at a partial trailing batch."""
    pos = 0
    end = len(buf)
    while end - pos >= HEADER_SIZE:
        header = BatchHeader._make(HEADER.unpack_from(buf, pos))
        size = header.batch_length + LOG_OVERHEAD
        if size < HEADER_SIZE or pos + size > end:
            return
        yield pos, header
        pos += size


_PRODUCER_FIELDS = struct.Struct(">qhii")  # producerId, producerEpoch, baseSequence, recordsCount
_PRODUCER_FIELDS_POSITION = 43


def producer_fields(buf: ByteSource, pos: int = 0) -> tuple[int, int, int, int]:
    """(producerId, producerEpoch, baseSequence, recordsCount) of the batch at pos, from its header alone."""
    fields: tuple[int, int, int, int] = _PRODUCER_FIELDS.unpack_from(buf, pos + _PRODUCER_FIELDS_POSITION)
    return fields


def stamp_batch(batch: bytearray, base_offset: int, leader_epoch: int, pos: int = 0) -> None:
    """Write baseOffset and partitionLeaderEpoch of the batch at pos in place; both lie outside the CRC."""
    struct.pack_into(">q", batch, pos, base_offset)
    _EPOCH.pack_into(batch, pos + 12, leader_epoch)


# ------------------------------------------------------------------------------------------- decoding

def batch_records_bytes(buf: bytes | memoryview, pos: int, header: BatchHeader) -> bytes | memoryview:
    """The records section of the batch at pos, decompressed."""
    start = pos + HEADER_SIZE
    end = pos + header.batch_length + LOG_OVERHEAD
    raw = memoryview(buf)[start:end]
    codec = header.attributes & COMPRESSION_MASK
    if codec == COMPRESSION_NONE:
        return raw
    if codec == COMPRESSION_ZSTD:
        try:
            return _ZSTD_DECOMPRESSOR.decompressobj().decompress(raw)
        except zstandard.ZstdError as exc:
            raise CorruptBatchError(f"zstd payload does not decompress: {exc}") from None
    raise CorruptBatchError(f"unsupported compression codec {codec}")


def decode_records(
    buf: bytes | memoryview,
    pos: int,
    header: BatchHeader,
    topic: str = "",
    partition: int = -1,
    min_offset: int = 0,
    out: list[Record] | None = None,
) -> list[Record]:
    """Records of the batch at pos with offset >= min_offset, appended to out (or a new list)."""
    data = batch_records_bytes(buf, pos, header)
    if isinstance(data, memoryview):
        data = data.tobytes()
    if out is None:
        out = []
    _decode_record_block(data, header, topic, partition, min_offset, out)
    return out


def _decode_record_block(
    data: bytes, header: BatchHeader, topic: str, partition: int, min_offset: int, out: list[Record]
) -> None:
    append = out.append
    base_offset = header.base_offset
    base_timestamp = header.base_timestamp
    count = header.records_count
    pos = 0
    new = tuple.__new__
    make = Record
    varint = decode_varint
    zz = _ZIGZAG
    try:
        for _ in range(count):
            # One- and two-byte varints are decoded inline through a table: this loop is the
            # consumer's per-record cost. decode_varint handles anything longer.
            b = data[pos]
            if b < 0x80:
                length = zz[b]
                pos += 1
            else:
                c = data[pos + 1]
                if c < 0x80:
                    length = zz[(b & 0x7F) | (c << 7)]
                    pos += 2
                else:
                    length, pos = varint(data, pos)
            end = pos + length
            pos += 1  # attributes
            b = data[pos]
            if b < 0x80:
                ts_delta = zz[b]
                pos += 1
            else:
                c = data[pos + 1]
                if c < 0x80:
                    ts_delta = zz[(b & 0x7F) | (c << 7)]
                    pos += 2
                else:
                    ts_delta, pos = varint(data, pos)
            b = data[pos]
            if b < 0x80:
                off_delta = zz[b]
                pos += 1
            else:
                c = data[pos + 1]
                if c < 0x80:
                    off_delta = zz[(b & 0x7F) | (c << 7)]
                    pos += 2
                else:
                    off_delta, pos = varint(data, pos)
            b = data[pos]
            if b < 0x80:
                klen = zz[b]
                pos += 1
            else:
                c = data[pos + 1]
                if c < 0x80:
                    klen = zz[(b & 0x7F) | (c << 7)]
                    pos += 2
                else:
                    klen, pos = varint(data, pos)
            if klen < 0:
                key = None
            else:
                key = data[pos:pos + klen]
                pos += klen
            b = data[pos]
            if b < 0x80:
                vlen = zz[b]
                pos += 1
            else:
                c = data[pos + 1]
                if c < 0x80:
                    vlen = zz[(b & 0x7F) | (c << 7)]
                    pos += 2
                else:
                    vlen, pos = varint(data, pos)
            if vlen < 0:
                value = None
            else:
                value = data[pos:pos + vlen]
                pos += vlen
            # Most records carry no headers: they share one empty tuple rather than each allocating a list.
            headers = NO_HEADERS if data[pos] == 0 else _decode_headers(data, pos)
            if end > len(data):
                raise CorruptBatchError("record extends past the end of its batch")
            pos = end
            offset = base_offset + off_delta
            if offset >= min_offset:
                append(new(make, (topic, partition, offset, base_timestamp + ts_delta, key, value, headers)))
    except IndexError:
        raise CorruptBatchError("record ends before its declared length") from None


def _decode_headers(data: bytes, pos: int) -> list[tuple[str, bytes | None]]:
    count, pos = decode_varint(data, pos)
    headers: list[tuple[str, bytes | None]] = []
    for _ in range(count):
        klen, pos = decode_varint(data, pos)
        hkey = data[pos:pos + klen].decode("utf-8", errors="replace")
        pos += klen
        vlen, pos = decode_varint(data, pos)
        if vlen < 0:
            headers.append((hkey, None))
        else:
            headers.append((hkey, data[pos:pos + vlen]))
            pos += vlen
    return headers


def iter_batches(buf: bytes | memoryview) -> Iterator[tuple[BatchHeader, list[Record]]]:
    """Decode a stream of whole batches (what Fetch returns); control batches yield no records."""
    for pos, header in iter_batch_headers(buf):
        if header.attributes & CONTROL_FLAG:
            yield header, []
        else:
            yield header, decode_records(buf, pos, header)
