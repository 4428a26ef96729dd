"""Produce v0-v2: advertised, never served (they carry message format v0/v1, which logbroker does not store).

librdkafka before 2.11.1 turns gzip, snappy and lz4 on only when Produce v0 is in the broker's range, so
the range starts at 0; a client that really sends v0-v2 is answered UNSUPPORTED_VERSION for every
partition. kio has no classes for these versions, so the few fields needed are read and written here.
"""

from __future__ import annotations

import struct

from kio.schema.errors import ErrorCode

from logbroker.kafka import framing

_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_PARTITION_V0 = struct.Struct(">ihq")  # partition, error code, base offset
_PARTITION_V2 = struct.Struct(">ihqq")  # ... log append time


class _Reader:
    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf, self.pos = buf, pos

    def take(self, fmt: struct.Struct) -> int:
        if self.pos + fmt.size > len(self.buf):
            raise framing.FrameError("Produce request runs past its frame")
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return int(value)

    def skip(self, size: int) -> None:
        if size < 0 or self.pos + size > len(self.buf):
            raise framing.FrameError("Produce request runs past its frame")
        self.pos += size

    def string(self) -> bytes:
        size = self.take(_I16)
        start = self.pos
        self.skip(max(size, 0))
        return self.buf[start:self.pos]


def legacy_produce_answer(frame: bytes, version: int, correlation_id: int) -> bytes | None:
    header = framing.parse_header(frame, flexible=False)
    reader = _Reader(frame, header.body_offset)
    acks = reader.take(_I16)
    reader.take(_I32)  # timeout
    topics = []
    for _ in range(max(reader.take(_I32), 0)):
        name = reader.string()
        partitions = []
        for _ in range(max(reader.take(_I32), 0)):
            partitions.append(reader.take(_I32))
            reader.skip(max(reader.take(_I32), 0))  # the message set, not read
        topics.append((name, partitions))
    if acks == 0:
        return None
    code = ErrorCode.unsupported_version.value
    out = [_I32.pack(len(topics))]
    for name, partitions in topics:
        out.append(_I16.pack(len(name)) + name + _I32.pack(len(partitions)))
        for partition in partitions:
            out.append(_PARTITION_V2.pack(partition, code, -1, -1) if version >= 2
                       else _PARTITION_V0.pack(partition, code, -1))
    if version >= 1:
        out.append(_I32.pack(0))  # throttle time
    return framing.response_frame(correlation_id, b"".join(out), False)
