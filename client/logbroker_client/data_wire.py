"""The bytes of a broker's data port: Produce, Fetch and ListOffsets as length-prefixed protobuf frames.

A broker serves its clients over gRPC, and also on a plain TCP port of its own (``--data-listen``, by default
the gRPC port plus DEFAULT_DATA_PORT_OFFSET) for the calls that carry records. A unary gRPC call costs the
client about half a millisecond to issue and a third of one to take the answer, and the broker as much again,
on every request; a lone record awaited alone pays all of it. On this port the same request messages travel in
frames that the broker reads in its event loop and the client reads in one thread (measured: a lone record's
request reaches the leader's handler 0.39 ms after send() instead of about 0.5 ms to issue it over gRPC, and
its answer is back 0.15 ms after the leader's instead of 0.35 ms). The producer and consumer use it when the
broker's Metadata names it (BrokerInfo.data_port) and fall back to gRPC when they cannot connect. Nothing else
moves here: administration, groups and health stay on gRPC.

    client -> broker   HELLO    b"LBDATA01" (8 bytes) | client id length (u16 BE) | client id (UTF-8, <= 255 bytes)
    broker -> client   WELCOME  b"LBDATA01" (8 bytes) | largest request frame the broker takes (u32 BE)
    client -> broker   REQUEST* length (u32 BE) | correlation id (u32 BE) | method (u8) | request protobuf
    broker -> client   ANSWER*  length (u32 BE) | correlation id (u32 BE) | status (u8) | answer protobuf,
                                or, when status is not OK, the broker's explanation in UTF-8

`length` counts everything after itself (the correlation id, the method or status, and the body). Requests
on one connection are served concurrently: answers come back in any order, matched by correlation id. The
status codes are gRPC's (grpc.StatusCode values), so a refusal reads the same on both ports. The client id
stands in for gRPC's `client-id` metadata (the brokers' quotas are per client id).

Limits the broker keeps: the HELLO within HANDSHAKE_TIMEOUT_S; a request frame of at most the WELCOME's
size (a longer one is answered RESOURCE_EXHAUSTED and the connection closed: the bytes that follow cannot be
trusted to be frames); at most MAX_IN_FLIGHT_PER_CONNECTION requests served at once per connection (past
it the broker stops reading the connection until answers go out: TCP pushes back on the client); a frame
whole within FRAME_DEADLINE_S of its first byte; a connection with nothing in flight and no request for
IDLE_TIMEOUT_S is closed. When the client ends its side (EOF), the requests in flight are answered and the
connection closed, except waiting Fetches, which are answered CANCELLED at once: a client that closed for
good sends the same EOF, and a long poll held for it would pin the connection for max_wait_ms.
"""

from __future__ import annotations

import enum
import struct

MAGIC = b"LBDATA01"
_LENGTH = struct.Struct(">I")
_HELLO_HEAD = struct.Struct(">8sH")
WELCOME = struct.Struct(">8sI")
FRAME_HEAD = struct.Struct(">IIB")  # length, correlation id, method or status
HEAD_AFTER_LENGTH_BYTES = FRAME_HEAD.size - _LENGTH.size
MAX_CLIENT_ID_BYTES = 255
MAX_CORRELATION_ID = 2**32 - 1
HANDSHAKE_TIMEOUT_S = 10.0
# A request frame must arrive whole within this long of its first byte: one unfinished frame would otherwise
# hold up to the largest request's worth of the broker's memory for as long as the client likes.
FRAME_DEADLINE_S = 30.0
IDLE_TIMEOUT_S = 600.0  # Kafka's connections.max.idle.ms, as the gRPC port's
MAX_IN_FLIGHT_PER_CONNECTION = 256
# Answers larger than this are written as two buffers (head, body) instead of one joined copy.
JOIN_ANSWER_BELOW_BYTES = 64 * 1024
# A broker's data port is its gRPC port plus this, unless --data-listen says otherwise (the Kafka port is +100,
# metrics +200, Raft +300 in `logbroker dev`).
DEFAULT_DATA_PORT_OFFSET = 400


class Method(enum.IntEnum):
    PRODUCE = 1
    FETCH = 2
    LIST_OFFSETS = 3


class WireError(ValueError):
    """The other end does not speak this protocol, or broke it; the message says how."""


def encode_hello(client_id: str) -> bytes:
    raw = client_id.encode()[:MAX_CLIENT_ID_BYTES]
    return _HELLO_HEAD.pack(MAGIC, len(raw)) + raw


def hello_length(head: bytes) -> int:
    """The client id's length, from the first 10 bytes of a HELLO; WireError when they are not one."""
    magic, length = _HELLO_HEAD.unpack(head)
    if magic != MAGIC:
        raise WireError(f"the first bytes are not a logbroker data-port HELLO ({describe_foreign_bytes(head)})")
    if length > MAX_CLIENT_ID_BYTES:
        raise WireError(f"the HELLO names a client id of {length} bytes (at most {MAX_CLIENT_ID_BYTES})")
    return int(length)


HELLO_HEAD_BYTES = _HELLO_HEAD.size


def encode_welcome(max_frame_bytes: int) -> bytes:
    return WELCOME.pack(MAGIC, max_frame_bytes)


def decode_welcome(raw: bytes) -> int:
    magic, max_frame_bytes = WELCOME.unpack(raw)
    if magic != MAGIC:
        raise WireError(f"the port did not answer as a logbroker data port ({describe_foreign_bytes(raw)})")
    return int(max_frame_bytes)


def encode_frame(correlation_id: int, code: int, body: bytes) -> bytes:
    """A REQUEST (code: a Method) or an ANSWER (code: a status), as one buffer."""
    return FRAME_HEAD.pack(len(body) + HEAD_AFTER_LENGTH_BYTES, correlation_id, code) + body


def frame_head(correlation_id: int, code: int, body_bytes: int) -> bytes:
    return FRAME_HEAD.pack(body_bytes + HEAD_AFTER_LENGTH_BYTES, correlation_id, code)


def take_frames(buffer: bytearray) -> list[tuple[int, int, bytes]]:
    """The whole frames at the start of buffer, removed from it, as (correlation id, method or status, body);
    a partial frame stays. WireError for a length shorter than a frame's head (not this protocol)."""
    frames = []
    start = 0
    while len(buffer) - start >= FRAME_HEAD.size:
        length, correlation_id, code = FRAME_HEAD.unpack_from(buffer, start)
        if length < HEAD_AFTER_LENGTH_BYTES:
            raise WireError(f"a frame of length {length}, shorter than a frame's head: not this protocol")
        end = start + _LENGTH.size + length
        if end > len(buffer):
            break
        frames.append((correlation_id, code, bytes(buffer[start + FRAME_HEAD.size:end])))
        start = end
    if start:
        del buffer[:start]
    return frames


def describe_foreign_bytes(raw: bytes) -> str:
    """A guess at what spoke instead, for the log: the other protocols a logbroker port sees most."""
    if raw.startswith(b"PRI * HTTP") or raw.startswith(b"\x00\x00") and len(raw) > 3 and raw[3] == 4:
        return "they look like gRPC / HTTP/2: is this the broker's gRPC port?"
    if raw[:4] in (b"GET ", b"POST", b"HTTP"):
        return "they look like HTTP"
    if raw.startswith(b"LBRAFT"):
        return "they are the Raft port's: is this a broker's Raft port?"
    return f"first bytes {raw[:8].hex()}"
