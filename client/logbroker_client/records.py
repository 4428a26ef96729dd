"""Kafka RecordBatch v2, byte for byte: the one format on the wire and on disk.

Batch header (61 bytes, big-endian)::

    offset  size  field
         0     8  baseOffset            i64   stamped by the leader, outside the CRC
         8     4  batchLength           i32   bytes after this field (total size - 12)
        12     4  partitionLeaderEpoch  i32   stamped by the leader, outside the CRC
        16     1  magic                 i8    always 2
        17     4  crc                   u32   CRC-32C of bytes 21..end (attributes to the batch end)
        21     2  attributes            i16   bits 0-2 compression (0 none, 1 gzip, 2 snappy, 3 lz4,
                                              4 zstd), bit 3 timestamp type, bit 4 transactional,
                                              bit 5 control batch
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

The producer builds and compresses batches; the broker checks the header and the CRC, walks the record
framing (validate_records, in C where built) without decoding a record, then stamps baseOffset and
partitionLeaderEpoch in place.
"""

from __future__ import annotations

import mmap
import struct
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import crc32c as _crc32c
import zstandard

from logbroker_client import compression as _compression
from logbroker_client.errors import CorruptBatchError

try:  # the record walk in C, built with the package where a compiler is at hand (pyproject.toml)
    from logbroker_client import _recordwalk
except ImportError:  # the Python walk below does the same, ~60x slower
    _recordwalk = None  # type: ignore[assignment]

try:  # the clients' per-record encode and decode in C, built the same way
    from logbroker_client import _recordcodec
except ImportError:  # the Python paths below (BatchBuilder._encode_small, _decode_record_block)
    _recordcodec = None  # type: ignore[assignment]

NATIVE_RECORD_WALK = _recordwalk is not None
NATIVE_RECORD_CODEC = _recordcodec is not None

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
COMPRESSION_GZIP = _compression.GZIP  # gzip, snappy and lz4: from Kafka clients (compression.py)
COMPRESSION_SNAPPY = _compression.SNAPPY
COMPRESSION_LZ4 = _compression.LZ4
COMPRESSION_ZSTD = 4
SUPPORTED_CODECS = (COMPRESSION_NONE, COMPRESSION_GZIP, COMPRESSION_SNAPPY, COMPRESSION_LZ4, COMPRESSION_ZSTD)
TIMESTAMP_TYPE_LOG_APPEND = 0x08
TRANSACTIONAL_FLAG = 0x10
CONTROL_FLAG = 0x20

NO_PRODUCER_ID = -1
NO_PRODUCER_EPOCH = -1
NO_SEQUENCE = -1

COMPRESSION_CODECS = {"none": COMPRESSION_NONE, "gzip": COMPRESSION_GZIP, "snappy": COMPRESSION_SNAPPY,
                      "lz4": COMPRESSION_LZ4, "zstd": COMPRESSION_ZSTD}

# The most bytes a compressed record section may expand to. Producers size batches before compressing
# them and never send a gRPC message over 128 MiB (connection.MAX_MESSAGE_BYTES), so no honest batch
# decompresses to more; a zstd bomb (kilobytes claiming gigabytes) is refused before it is allocated.
MAX_RECORDS_BYTES = 128 << 20
_ZSTD_READ_BYTES = 1 << 20  # output step when a zstd frame does not declare its size

_BASE_OFFSET_AND_LENGTH = struct.Struct(">qi")
_STAMP = struct.Struct(">qii")  # baseOffset, batchLength, partitionLeaderEpoch
_EPOCH = struct.Struct(">i")
_UINT32 = struct.Struct(">I")


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
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
# Decoded value of every raw varint below 2**14 (one or two bytes on the wire).
_ZIGZAG: list[int] = [(n >> 1) ^ -(n & 1) for n in range(1 << 14)]


def encode_varint(value: int) -> bytes:
    """Zig-zag varint (varlong too: Python ints are unbounded, 64-bit wrap applies)."""
    if 0 <= value < _VARINT_TABLE_SIZE:
        return _VARINTS[value]
    return _zigzag_varint(value)


def decode_varint(buf: ByteSource, pos: int) -> tuple[int, int]:
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


class _PythonBuilderBase:
    """BatchBuilder's fields in Python (PythonBatchBuilder; where _recordcodec.Builder, the same in C, was
    built, BatchBuilder uses that)."""

    __slots__ = ("_parts", "count", "size_bytes", "base_timestamp", "max_timestamp", "compression")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.count = 0
        self.base_timestamp = -1
        self.max_timestamp = -1


# The shared methods below run over either base; mypy checks them against the Python one's fields.
if TYPE_CHECKING:
    _MethodsBase = _PythonBuilderBase
else:
    _MethodsBase = object


class _BuilderMethods(_MethodsBase):
    """Accumulates records for one partition and seals them into a v2 batch.

    The per-record path is an append of a few precomputed varints to a list (in C where it was built: the
    C base's append takes a record without headers, and hands any other to _append_python); the header,
    compression and CRC happen once, in build().
    """

    __slots__ = ()

    def __init__(self, compression: int = COMPRESSION_NONE) -> None:
        super().__init__()
        self.size_bytes = HEADER_SIZE
        self.compression = compression

    def _append_python(
        self,
        timestamp_ms: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]] = (),
    ) -> int:
        """append() in Python: every record where the C base was not built; else those with headers or with
        a timestamp delta beyond 64 bits."""
        if not _INT64_MIN <= timestamp_ms <= _INT64_MAX:
            raise ValueError(f"timestamp_ms {timestamp_ms!r} does not fit a record batch's 64-bit timestamp")
        offset_delta = self.count
        if offset_delta == 0:
            self.base_timestamp = self.max_timestamp = timestamp_ms
        elif timestamp_ms > self.max_timestamp:
            self.max_timestamp = timestamp_ms
        timestamp_delta = timestamp_ms - self.base_timestamp
        if headers or key is not None and len(key) >= _VARINT_TABLE_SIZE or (
            value is not None and len(value) >= _VARINT_TABLE_SIZE
        ) or offset_delta >= _VARINT_TABLE_SIZE:
            record = encode_record(offset_delta, timestamp_delta, key, value, headers)
        else:
            record = self._encode_small(offset_delta, timestamp_delta, key, value)
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


class PythonBatchBuilder(_BuilderMethods, _PythonBuilderBase):
    """BatchBuilder without the C extension (what runs where no compiler built it): append() is
    _append_python."""

    __slots__ = ()
    append = _BuilderMethods._append_python


if _recordcodec is not None and not TYPE_CHECKING:
    class BatchBuilder(_BuilderMethods, _recordcodec.Builder):
        """BatchBuilder over the C base: append() of a record without headers runs in C (see _BuilderMethods)."""

        __slots__ = ()
else:
    BatchBuilder = PythonBatchBuilder


_ZSTD_COMPRESSOR = zstandard.ZstdCompressor(level=3)
# One decompression context per thread: the C extension releases the GIL while it decompresses, and a
# context used by two threads at once (two consumers, say) would corrupt its state.
_zstd_local = threading.local()


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    decompressor: zstandard.ZstdDecompressor | None = getattr(_zstd_local, "decompressor", None)
    if decompressor is None:
        decompressor = _zstd_local.decompressor = zstandard.ZstdDecompressor()
    return decompressor


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
    elif compression in SUPPORTED_CODECS and compression != COMPRESSION_NONE:
        records = _compression.compress(compression, records)
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


# ------------------------------------------------------------------------------ record-section checks

def validate_records(buf: ByteSource, pos: int, header: BatchHeader,
                     max_records_bytes: int = MAX_RECORDS_BYTES) -> None:
    """Check that the records of the batch at pos agree with its header, as Kafka's LogValidator does.

    Every record must fill its length exactly, the offset deltas must run 0..recordsCount-1 and the
    records must end at the batch end; zstd sections are decompressed (up to max_records_bytes) and
    walked the same way. No Record is built: this is the broker's per-record cost on produce.
    The CRC is not checked here (validate_batch does that)."""
    _check_counts(header)
    codec = header.attributes & COMPRESSION_MASK
    if codec == COMPRESSION_NONE:  # walk the bytes where they are, without a copy
        _check_records(buf, pos + HEADER_SIZE, pos + header.batch_length + LOG_OVERHEAD, header.records_count)
    elif codec in SUPPORTED_CODECS:
        data = batch_records_bytes(buf, pos, header, max_records_bytes)
        _check_records(data, 0, len(data), header.records_count)
    else:
        raise CorruptBatchError(f"unsupported compression codec {codec}")


def _check_records(data: ByteSource, pos: int, end: int, count: int) -> None:
    # The C walk accepts exactly what the Python walk accepts; when it refuses, the Python walk runs
    # to say why. In Python the walk doubled the broker's CPU per produced record (benchmarks/README.md).
    if _recordwalk is not None and _recordwalk.records_agree(data, pos, end, count):
        return
    _walk_records(data, pos, end, count)


def _check_counts(header: BatchHeader) -> None:
    if header.records_count < 1 or header.last_offset_delta != header.records_count - 1:
        raise CorruptBatchError(
            f"recordsCount {header.records_count} does not match lastOffsetDelta {header.last_offset_delta}")


def _walk_records(data: ByteSource, pos: int, end: int, count: int) -> None:
    """Check the framing of the records in data[pos:end]; raise CorruptBatchError saying what disagrees."""
    # The reference for _recordwalk.c, and the produce path where it is not built: one- and two-byte
    # varints are inlined, as in _decode_record_block. Reading past a record's end cannot go unnoticed:
    # lengths are checked to be >= -1, so pos only moves forward, and it must land on the record's end.
    zz = _ZIGZAG
    varint = decode_varint
    index = 0
    record_start = pos
    try:
        while pos < end:
            record_start = pos
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
            record_end = pos + length
            if record_end > end:
                raise _record_error(index, count, record_start, end,
                                    f"is {length} bytes long but only {end - pos} bytes of the batch remain")
            pos += 1  # attributes: unused, any value
            b = data[pos]  # timestampDelta: any value
            if b < 0x80:
                pos += 1
            elif data[pos + 1] < 0x80:
                pos += 2
            else:
                pos = varint(data, pos)[1]
            b = data[pos]
            if b < 0x80:
                delta = zz[b]
                pos += 1
            else:
                c = data[pos + 1]
                if c < 0x80:
                    delta = zz[(b & 0x7F) | (c << 7)]
                    pos += 2
                else:
                    delta, pos = varint(data, pos)
            if delta != index:
                raise _record_error(index, count, record_start, end, f"has offsetDelta {delta}, expected {index}")
            b = data[pos]
            if b < 0x80:
                key_bytes = zz[b]
                pos += 1
            else:
                c = data[pos + 1]
                if c < 0x80:
                    key_bytes = zz[(b & 0x7F) | (c << 7)]
                    pos += 2
                else:
                    key_bytes, pos = varint(data, pos)
            if key_bytes > 0:
                pos += key_bytes
            elif key_bytes < -1:
                raise _record_error(index, count, record_start, end, f"has key length {key_bytes}")
            b = data[pos]
            if b < 0x80:
                value_bytes = zz[b]
                pos += 1
            else:
                c = data[pos + 1]
                if c < 0x80:
                    value_bytes = zz[(b & 0x7F) | (c << 7)]
                    pos += 2
                else:
                    value_bytes, pos = varint(data, pos)
            if value_bytes > 0:
                pos += value_bytes
            elif value_bytes < -1:
                raise _record_error(index, count, record_start, end, f"has value length {value_bytes}")
            if data[pos] == 0:  # no headers, the common case
                pos += 1
            elif pos < record_end:
                pos = _walk_headers(data, pos, record_end, index)
            else:  # the header count itself lies outside the record
                raise _record_error(index, count, record_start, end,
                                    f"says it is {length} bytes long, its fields take more")
            if pos != record_end:
                raise _record_error(index, count, record_start, end,
                                    f"says it is {length} bytes long, its fields take {pos - record_end + length}")
            index += 1
    except IndexError:
        raise _record_error(index, count, record_start, end, "runs past the end of the batch") from None
    if index != count:
        raise CorruptBatchError(f"header says {count} records, the batch holds {index}")


def _walk_headers(data: ByteSource, pos: int, record_end: int, index: int) -> int:
    """Skip the headers of record index starting at its header count; return the position after them."""
    count, pos = decode_varint(data, pos)
    # Each header takes at least two bytes: a bound that also stops a huge count from spinning.
    if count < 0 or 2 * count > record_end - pos:
        raise CorruptBatchError(f"record {index} has header count {count}")
    for _ in range(count):
        key_bytes, pos = decode_varint(data, pos)
        if key_bytes < 0:
            raise CorruptBatchError(f"record {index} has a header with key length {key_bytes}")
        value_bytes, pos = decode_varint(data, pos + key_bytes)
        if value_bytes < -1:
            raise CorruptBatchError(f"record {index} has a header with value length {value_bytes}")
        pos += max(value_bytes, 0)
    return pos


def _record_error(index: int, count: int, record_start: int, end: int, problem: str) -> CorruptBatchError:
    if index >= count:  # the header's records are all there: what follows them is not a record
        return CorruptBatchError(f"header says {count} records, but {end - record_start} more bytes follow them "
                                 f"(not a record: it {problem})")
    return CorruptBatchError(f"record {index} {problem}")


# ------------------------------------------------------------------------------------------- decoding

def batch_records_bytes(buf: ByteSource, pos: int, header: BatchHeader,
                        max_records_bytes: int = MAX_RECORDS_BYTES) -> bytes | memoryview:
    """The records section of the batch at pos, decompressed (to at most max_records_bytes)."""
    start = pos + HEADER_SIZE
    end = pos + header.batch_length + LOG_OVERHEAD
    raw = memoryview(buf)[start:end]
    codec = header.attributes & COMPRESSION_MASK
    if codec == COMPRESSION_NONE:
        return raw
    if codec == COMPRESSION_ZSTD:
        return _decompress_zstd(raw, max_records_bytes)
    if codec in SUPPORTED_CODECS:
        try:
            return _compression.decompress(codec, raw, max_records_bytes)
        except _compression.DecompressionError as exc:
            raise CorruptBatchError(str(exc)) from None
    raise CorruptBatchError(f"unsupported compression codec {codec}")


def _decompress_zstd(raw: memoryview, max_records_bytes: int) -> bytes:
    """The first zstd frame of raw, refused rather than allocated when it exceeds max_records_bytes.

    Broker and consumers both decompress here, so what the broker validated is what consumers decode."""
    try:
        declared_bytes = zstandard.frame_content_size(raw)  # -1: the frame does not say
        if declared_bytes > max_records_bytes:
            raise CorruptBatchError(f"zstd frame declares {declared_bytes} bytes, over the limit of "
                                    f"{max_records_bytes} bytes for a record section")
        if declared_bytes >= 0:  # zstd allocates exactly that and fails if the frame holds more
            return _zstd_decompressor().decompress(raw)
        return _decompress_zstd_stream(raw, max_records_bytes)
    except zstandard.ZstdError as exc:
        raise CorruptBatchError(f"zstd payload does not decompress: {exc}") from None


def _decompress_zstd_stream(raw: memoryview, max_records_bytes: int) -> bytes:
    # Frames written by streaming compressors (the Java client's) carry no size: read in steps, so a
    # bomb is stopped one step past the limit instead of after it has filled memory.
    chunks = []
    total_bytes = 0
    with _zstd_decompressor().stream_reader(raw) as reader:
        while chunk := reader.read(_ZSTD_READ_BYTES):
            total_bytes += len(chunk)
            if total_bytes > max_records_bytes:
                raise CorruptBatchError(f"zstd payload expands past the limit of {max_records_bytes} bytes "
                                        "for a record section")
            chunks.append(chunk)
    return b"".join(chunks)


def decode_records(
    buf: bytes | memoryview,
    pos: int,
    header: BatchHeader,
    topic: str = "",
    partition: int = -1,
    min_offset: int = 0,
    out: list[Record] | None = None,
) -> list[Record]:
    """Records of the batch at pos with offset >= min_offset, appended to out (or a new list).

    A batch whose records contradict its header raises CorruptBatchError and appends nothing to out. An empty
    batch (no records, nothing after the header: what Kafka's compaction leaves, and what the Kafka port sends
    in place of a control batch) has nothing to give."""
    if out is None:
        out = []
    if header.records_count == 0 and header.size == HEADER_SIZE:
        return out
    _check_counts(header)
    data = batch_records_bytes(buf, pos, header)
    if isinstance(data, memoryview):
        data = data.tobytes()
    kept = len(out)
    if _recordcodec is not None:
        if _recordcodec.decode_block(data, header.records_count, header.base_offset, header.base_timestamp, topic,
                                     partition, min_offset, out, Record, NO_HEADERS):
            return out
        del out[kept:]  # refused, or beyond 64 bits: the Python decode says why, or decodes it
    try:
        _decode_record_block(data, header, topic, partition, min_offset, out)
    except CorruptBatchError:
        del out[kept:]  # no half batch: the caller reports the batch and may skip it whole
        raise
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
        for index in range(count):
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
            if off_delta != index:  # as validate_records: a consumer never yields an offset the batch lies about
                raise CorruptBatchError(f"record {index} has offsetDelta {off_delta}, expected {index}")
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
                if klen != -1:
                    raise CorruptBatchError(f"record {index} has key length {klen}")
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
                if vlen != -1:
                    raise CorruptBatchError(f"record {index} has value length {vlen}")
                value = None
            else:
                value = data[pos:pos + vlen]
                pos += vlen
            # Most records carry no headers: they share one empty tuple rather than each allocating a list.
            if data[pos] == 0:
                headers: Sequence[tuple[str, bytes | None]] = NO_HEADERS
                pos += 1
            else:
                headers, pos = _decode_headers(data, pos, index)
            if pos != end:
                raise CorruptBatchError(f"record {index} says it is {length} bytes long, its fields take "
                                        f"{pos - end + length}")
            offset = base_offset + off_delta
            if offset >= min_offset:
                append(new(make, (topic, partition, offset, base_timestamp + ts_delta, key, value, headers)))
    except IndexError:
        raise CorruptBatchError("record ends before its declared length") from None
    if pos != len(data):
        raise CorruptBatchError(f"header says {count} records, but {len(data) - pos} more bytes follow them")


def _decode_headers(data: bytes, pos: int, index: int) -> tuple[list[tuple[str, bytes | None]], int]:
    """The headers of record index starting at its header count, and the position after them."""
    count, pos = decode_varint(data, pos)
    if count < 0:
        raise CorruptBatchError(f"record {index} has header count {count}")
    headers: list[tuple[str, bytes | None]] = []
    for _ in range(count):
        klen, pos = decode_varint(data, pos)
        if klen < 0:
            raise CorruptBatchError(f"record {index} has a header with key length {klen}")
        hkey = data[pos:pos + klen].decode("utf-8", errors="replace")
        pos += klen
        vlen, pos = decode_varint(data, pos)
        if vlen < 0:
            if vlen != -1:
                raise CorruptBatchError(f"record {index} has a header with value length {vlen}")
            headers.append((hkey, None))
        else:
            headers.append((hkey, data[pos:pos + vlen]))
            pos += vlen
    return headers, pos


def iter_batches(buf: bytes | memoryview) -> Iterator[tuple[BatchHeader, list[Record]]]:
    """Decode a stream of whole batches (what Fetch returns); control batches yield no records."""
    for pos, header in iter_batch_headers(buf):
        if header.attributes & CONTROL_FLAG:
            yield header, []
        else:
            yield header, decode_records(buf, pos, header)
