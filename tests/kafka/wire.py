"""A bare Kafka protocol client for tests: kio messages over a blocking socket, and raw bytes when needed."""

from __future__ import annotations

import io
import socket
import struct
from typing import Any

from kio.index import load_response_schema
from kio.serial import entity_reader, entity_writer

from tests.support.sockets import read_exactly

_SIZE = struct.Struct(">i")


def encode_request(request: Any, correlation_id: int = 1, client_id: str = "wire-test") -> bytes:
    """A whole frame: size, request header v1 or v2 (flexible), body."""
    key, version = int(request.__api_key__), int(request.__version__)
    header = struct.pack(">hhi", key, version, correlation_id) + struct.pack(">h", len(client_id)) + client_id.encode()
    if request.__flexible__:
        header += b"\x00"
    body = io.BytesIO()
    entity_writer(type(request))(body, request)
    payload = header + body.getvalue()
    return _SIZE.pack(len(payload)) + payload


class WireClient:
    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout_s)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_frame(self) -> bytes:
        """One response frame's payload; raises ConnectionError when the broker closed the connection."""
        size = _SIZE.unpack(self._read_exactly(4))[0]
        return self._read_exactly(size)

    def _read_exactly(self, count: int) -> bytes:
        return read_exactly(self.sock, count)

    def closed_by_broker(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def call(self, request: Any, correlation_id: int = 1, header_v0: bool = False,
             client_id: str = "wire-test") -> Any:
        self.send_bytes(encode_request(request, correlation_id, client_id))
        frame = self.read_frame()
        assert _SIZE.unpack_from(frame, 0)[0] == correlation_id
        response_cls = load_response_schema(int(request.__api_key__), int(request.__version__))
        flexible_header = response_cls.__flexible__ and not header_v0 and request.__api_key__ != 18
        offset = 5 if flexible_header else 4
        value, _ = entity_reader(response_cls)(frame, offset)
        return value
