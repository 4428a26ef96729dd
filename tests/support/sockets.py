"""Plain-socket helpers for tests that speak a broker's wire protocols by hand."""

from __future__ import annotations

import socket

from logbroker_client import data_wire as wire


def read_exactly(sock: socket.socket, count: int) -> bytes:
    """``count`` bytes from ``sock``; raises ConnectionError if the other end closes first."""
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"closed by the broker after {len(data)} of {count} bytes")
        data += chunk
    return data


def data_port_hello(sock: socket.socket, client_id: str) -> int:
    """Send a data port's HELLO and read its WELCOME: the largest request frame the broker takes."""
    sock.sendall(wire.encode_hello(client_id))
    return wire.decode_welcome(read_exactly(sock, wire.WELCOME.size))


def read_data_answer(sock: socket.socket) -> tuple[int, int, bytes]:
    """One ANSWER frame from a broker's data port: (correlation id, status, body)."""
    length, correlation_id, status = wire.FRAME_HEAD.unpack(read_exactly(sock, wire.FRAME_HEAD.size))
    return correlation_id, status, read_exactly(sock, length - wire.HEAD_AFTER_LENGTH_BYTES)
