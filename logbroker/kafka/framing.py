"""Kafka framing: a 4-byte big-endian size, then the request (header and body) or the response.

Request headers are v1 (api key, version, correlation id, nullable client id) for non-flexible versions
and v2 (v1 plus tagged fields) for flexible ones; they are parsed here by hand, so that a request of an
API or version we cannot decode still yields its correlation id. Response headers are v0 (correlation id)
or v1 (plus an empty tagged-field section) for flexible versions, except ApiVersions, whose response
header is always v0 (a client that does not yet know our versions must be able to read it).
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

SIZE = struct.Struct(">i")
HEADER_FIXED = struct.Struct(">hhi")
INT16 = struct.Struct(">h")
MIN_REQUEST_BYTES = HEADER_FIXED.size + INT16.size  # api key, version, correlation id, client id length


class FrameError(Exception):
    """The peer broke the framing: the connection is closed (Kafka does the same)."""


@dataclass(frozen=True)
class RequestHeader:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    body_offset: int  # where the body starts in the frame (flexible headers end with tagged fields)


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> bytes | None:
    """One frame's payload; None at a clean end of stream (no byte of a new frame read).

    The size is checked before anything is allocated, so a claimed 2 GB frame costs nothing."""
    try:
        prefix = await reader.readexactly(SIZE.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError(f"connection closed inside a frame's size ({len(exc.partial)} of 4 bytes)") from None
    (size,) = SIZE.unpack(prefix)
    if size < MIN_REQUEST_BYTES:
        raise FrameError(f"frame of {size} bytes is too small to hold a request header")
    if size > max_bytes:
        raise FrameError(f"frame of {size} bytes exceeds the limit of {max_bytes} bytes (max_request_bytes)")
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise FrameError(f"connection closed after {len(exc.partial)} of the frame's {size} bytes") from None


def parse_header(frame: bytes, flexible: bool) -> RequestHeader:
    """The request header; flexible says whether it is v2 (with tagged fields)."""
    if len(frame) < MIN_REQUEST_BYTES:
        raise FrameError("frame too short for a request header")
    api_key, api_version, correlation_id = HEADER_FIXED.unpack_from(frame, 0)
    pos = HEADER_FIXED.size
    (length,) = INT16.unpack_from(frame, pos)
    pos += INT16.size
    client_id = None
    if length >= 0:
        if pos + length > len(frame):
            raise FrameError("client id runs past the frame")
        client_id = frame[pos:pos + length].decode("utf-8", "replace")
        pos += length
    if flexible:
        pos = skip_tagged_fields(frame, pos)
    return RequestHeader(api_key, api_version, correlation_id, client_id, pos)


def peek_ids(frame: bytes) -> tuple[int, int, int]:
    """(api key, api version, correlation id) of a frame at least MIN_REQUEST_BYTES long."""
    api_key, api_version, correlation_id = HEADER_FIXED.unpack_from(frame, 0)
    return api_key, api_version, correlation_id


def read_uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise FrameError("varint runs past the frame")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise FrameError("varint longer than 5 bytes")


def skip_tagged_fields(buf: bytes, pos: int) -> int:
    count, pos = read_uvarint(buf, pos)
    for _ in range(count):
        _, pos = read_uvarint(buf, pos)
        size, pos = read_uvarint(buf, pos)
        pos += size
        if pos > len(buf):
            raise FrameError("tagged field runs past the frame")
    return pos


def response_frame(correlation_id: int, body: bytes, flexible_header: bool) -> bytes:
    """Size, response header (v1 adds an empty tagged-field section), body."""
    header = SIZE.pack(correlation_id) + (b"\x00" if flexible_header else b"")
    return SIZE.pack(len(header) + len(body)) + header + body
