"""Badly behaved HTTP/2 clients on raw sockets: they connect and then dawdle or stall, as slow-loris attacks do.

Three kinds, each holding what it took on the server for as long as the socket stays open:
- ``SLOW_PREFACE`` sends the HTTP/2 client preface a few bytes at a time and never finishes it;
- ``IDLE`` sends the preface and its SETTINGS, then nothing;
- ``STALLED_STREAMS`` opens as many Produce streams as it may (more than a server allows, if it lets), and on
  each sends the first bytes of a message that never completes; it also grants the server no flow-control
  window, so no answer could ever reach it.
None of them reads what the server sends, so none answers its pings either.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SLOW_PREFACE = "slow preface"
IDLE = "idle"
STALLED_STREAMS = "stalled streams"
KINDS = (SLOW_PREFACE, IDLE, STALLED_STREAMS)

_DATA, _HEADERS, _SETTINGS = 0x0, 0x1, 0x4
_END_STREAM, _END_HEADERS = 0x1, 0x4
_SETTINGS_INITIAL_WINDOW_SIZE = 0x4
_PRODUCE_PATH = "/logbroker.v1.Broker/Produce"
_CLAIMED_MESSAGE_BYTES = 1000  # what each stalled stream's gRPC message header promises
_SENT_MESSAGE_BYTES = 10  # what it then sends of it


def frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([frame_type, flags]) + struct.pack(">I", stream_id) + payload


def settings(initial_window_bytes: int | None = None) -> bytes:
    entries = b"" if initial_window_bytes is None else struct.pack(">HI", _SETTINGS_INITIAL_WINDOW_SIZE,
                                                                   initial_window_bytes)
    return frame(_SETTINGS, 0, 0, entries)


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing, new name (both shorter than 127 bytes)."""
    raw_name, raw_value = name.encode(), value.encode()
    return b"\x00" + bytes([len(raw_name)]) + raw_name + bytes([len(raw_value)]) + raw_value


def stalled_stream(stream_id: int, authority: str) -> bytes:
    """HEADERS of a Produce call, then a DATA frame with the start of a message that never completes."""
    fields = [(":method", "POST"), (":scheme", "http"), (":path", _PRODUCE_PATH), (":authority", authority),
              ("content-type", "application/grpc"), ("te", "trailers")]
    block = b"".join(_literal(name, value) for name, value in fields)
    message_start = b"\x00" + struct.pack(">I", _CLAIMED_MESSAGE_BYTES) + b"x" * _SENT_MESSAGE_BYTES
    return frame(_HEADERS, _END_HEADERS, stream_id, block) + frame(_DATA, 0, stream_id, message_start)


class SlowClient:
    def __init__(self, address: str, kind: str, streams: int) -> None:
        host, _, port = address.rpartition(":")
        self.kind = kind
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.preface_sent = 0
        if kind == SLOW_PREFACE:
            self.dawdle()
        elif kind == IDLE:
            self._send(PREFACE + settings())
        else:
            self._send(PREFACE + settings(initial_window_bytes=0)
                       + b"".join(stalled_stream(2 * i + 1, address) for i in range(streams)))

    def dawdle(self) -> None:
        """A slow-preface client sends one more byte of its preface (never the last one)."""
        if self.kind == SLOW_PREFACE and self.preface_sent < len(PREFACE) - 1:
            self._send(PREFACE[self.preface_sent:self.preface_sent + 1])
            self.preface_sent += 1

    def _send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # the server closed it: what its limits are for
            self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


@contextmanager
def slow_clients(address: str, count: int, streams_per_client: int) -> Iterator[list[SlowClient]]:
    """``count`` slow clients of every kind in turn, all closed on the way out."""
    clients: list[SlowClient] = []
    try:
        for i in range(count):
            clients.append(SlowClient(address, KINDS[i % len(KINDS)], streams_per_client))
        yield clients
    finally:
        for client in clients:
            client.close()
