"""Plain-socket helpers for tests that speak a broker's wire protocols by hand."""

from __future__ import annotations

import socket


def read_exactly(sock: socket.socket, count: int) -> bytes:
    """``count`` bytes from ``sock``; raises ConnectionError if the other end closes first."""
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"closed by the broker after {len(data)} of {count} bytes")
        data += chunk
    return data
