"""Decompression of Kafka's gzip, snappy and lz4 record sections, each bounded before it allocates.

Kafka clients compress a batch's record section with the codec in the batch attributes (1 gzip, 2 snappy,
3 lz4; zstd, 4, lives in records.py). The broker stores the bytes as they came and never recompresses;
it decompresses only to check the records (records.validate_records), and consumers to read them. Every
function here refuses, rather than allocates, a section that would expand past ``limit`` bytes, so a
compression bomb costs nothing:

- gzip: zlib with an output cap (gzip or zlib framing, as clients write them);
- snappy: the xerial framing the Java client writes (a 16-byte header, then blocks each prefixed by its
  length) or one raw block (librdkafka); each block declares its size, checked before it is expanded;
- lz4: the LZ4 frame format (KIP-57), parsed here block by block, each block expanded to at most the
  frame's declared block size.
"""

from __future__ import annotations

import struct
import zlib

import cramjam

GZIP = 1
SNAPPY = 2
LZ4 = 3

XERIAL_MAGIC = b"\x82SNAPPY\x00"
XERIAL_HEADER_BYTES = 16
LZ4_MAGIC = 0x184D2204
LZ4_BLOCK_SIZES = {4: 64 << 10, 5: 256 << 10, 6: 1 << 20, 7: 4 << 20}
_U32_BE = struct.Struct(">I")
_U32_LE = struct.Struct("<I")


class DecompressionError(ValueError):
    """The section does not decompress, or would expand past the limit."""


def decompress(codec: int, raw: bytes | memoryview, limit: int) -> bytes:
    if codec == GZIP:
        return _gzip(raw, limit)
    if codec == SNAPPY:
        return _snappy(raw, limit)
    if codec == LZ4:
        return _lz4(raw, limit)
    raise DecompressionError(f"unsupported compression codec {codec}")


def compress(codec: int, data: bytes) -> bytes:
    """What a Kafka client would send (tests and tools): gzip, xerial-framed snappy, an lz4 frame."""
    if codec == GZIP:
        out = zlib.compressobj(wbits=31)
        return out.compress(data) + out.flush()
    if codec == SNAPPY:
        block = bytes(cramjam.snappy.compress_raw(data))
        return XERIAL_MAGIC + struct.pack(">ii", 1, 1) + _U32_BE.pack(len(block)) + block
    if codec == LZ4:
        return bytes(cramjam.lz4.compress(data))
    raise ValueError(f"unsupported compression codec {codec}")


def _over(limit: int, what: str) -> DecompressionError:
    return DecompressionError(f"{what} payload expands past the limit of {limit} bytes for a record section")


def _gzip(raw: bytes | memoryview, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header, detected
    try:
        out = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise DecompressionError(f"gzip payload does not decompress: {exc}") from None
    if len(out) > limit:
        raise _over(limit, "gzip")
    if not inflater.eof:
        raise DecompressionError("gzip payload is truncated")
    return out


def _snappy_block(block: bytes | memoryview, budget: int) -> bytes:
    try:
        size = int(cramjam.snappy.decompress_raw_len(bytes(block)))
    except Exception as exc:
        raise DecompressionError(f"snappy block does not decompress: {exc}") from None
    if size > budget:
        raise DecompressionError(f"snappy block declares {size} bytes, over what is left of the limit ({budget})")
    try:
        return bytes(cramjam.snappy.decompress_raw(bytes(block)))
    except Exception as exc:
        raise DecompressionError(f"snappy block does not decompress: {exc}") from None


def _snappy(raw: bytes | memoryview, limit: int) -> bytes:
    data = bytes(raw)
    if not data.startswith(XERIAL_MAGIC):
        return _snappy_block(data, limit)
    pos, parts, total = XERIAL_HEADER_BYTES, [], 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise DecompressionError("snappy (xerial) block length runs past the section")
        (size,) = _U32_BE.unpack_from(data, pos)
        pos += 4
        if pos + size > len(data):
            raise DecompressionError("snappy (xerial) block runs past the section")
        part = _snappy_block(data[pos:pos + size], limit - total)
        total += len(part)
        parts.append(part)
        pos += size
    return b"".join(parts)


def _lz4(raw: bytes | memoryview, limit: int) -> bytes:
    data = bytes(raw)
    if len(data) < 7 or _U32_LE.unpack_from(data, 0)[0] != LZ4_MAGIC:
        raise DecompressionError("lz4 payload is not an LZ4 frame")
    flags, block_descriptor = data[4], data[5]
    if flags >> 6 != 1:
        raise DecompressionError(f"lz4 frame version {flags >> 6} is not 1")
    block_max = LZ4_BLOCK_SIZES.get((block_descriptor >> 4) & 0x7)
    if block_max is None:
        raise DecompressionError("lz4 frame names no valid block size")
    block_checksums, content_size, content_checksum, dictionary = (
        flags & 0x10, flags & 0x08, flags & 0x04, flags & 0x01)
    pos = 6 + (8 if content_size else 0) + (4 if dictionary else 0) + 1  # + header checksum byte
    parts, total = [], 0
    while True:
        if pos + 4 > len(data):
            raise DecompressionError("lz4 frame is truncated (no end mark)")
        (size,) = _U32_LE.unpack_from(data, pos)
        pos += 4
        if size == 0:
            break
        stored, size = size & 0x80000000, size & 0x7FFFFFFF
        if size > block_max or pos + size > len(data):
            raise DecompressionError("lz4 block runs past the frame or its declared block size")
        block = data[pos:pos + size]
        if stored:
            part = block
        else:
            try:
                out = bytearray(block_max)  # at most the frame's block size: the bound of this block
                part = bytes(memoryview(out)[:int(cramjam.lz4.decompress_block_into(block, out))])
            except Exception as exc:
                raise DecompressionError(f"lz4 block does not decompress: {exc}") from None
        total += len(part)
        if total > limit:
            raise _over(limit, "lz4")
        parts.append(part)
        pos += size + (4 if block_checksums else 0)
    if content_checksum and pos + 4 > len(data):
        raise DecompressionError("lz4 frame is truncated (no content checksum)")
    return b"".join(parts)
