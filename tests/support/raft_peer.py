"""A hand-driven peer for a broker's Raft port: plain sockets, its own handshake, any bytes a test wants.

``RaftPeerSocket(address)`` connects and reads the broker's HELLO; ``prove(secret, from_node, to_node)``
sends a PROOF (a wrong secret makes a wrong one); ``send_envelope`` and ``send_raw`` write frames or bytes;
``closed_by_broker()`` waits for the broker to close the connection. Tests use it to speak to a broker as a
forger or a confused peer would, without going through RaftTransport.
"""

from __future__ import annotations

import socket
import time

from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.cluster import raft_wire as wire
from tests.support.sockets import read_exactly

TIMEOUT_S = 10.0


class RaftPeerSocket:
    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
        self.nonce = wire.parse_hello(read_exactly(self.sock, wire.HELLO_BYTES))

    def prove(self, secret: str, from_node: int, to_node: int) -> None:
        self.sock.sendall(wire.proof(secret, self.nonce, from_node, to_node))

    def send_envelope(self, envelope: pb.RaftEnvelope) -> None:
        self.sock.sendall(wire.frame(envelope.SerializeToString()))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def closed_by_broker(self, timeout_s: float = TIMEOUT_S) -> bool:
        """True once the broker has closed the connection (keepalive bytes are skipped); False at the deadline."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
            if not chunk:
                return True
            assert not chunk.strip(wire.KEEPALIVE), f"the broker wrote {chunk!r} on its Raft port"
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RaftPeerSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
