"""The bytes of the brokers' Raft port: a handshake that proves the cluster secret, then length-prefixed frames.

Raft messages between brokers travel on a TCP port of their own (``--raft-listen``), not over gRPC: a message
written to a grpc.aio stream and read from it costs about 100 us of CPU at each end and a hop through gRPC's
own threads, four times what a plain socket under the same event loop costs, and a lone acks=all record
crosses two such hops (the leader's append out, the follower's acknowledgement back). See docs/raft.md.

One connection carries one direction, from one broker (the client, "the sender") to another (the server,
"the receiver"), as the gRPC stream did; each broker opens its own connection to each peer.

    receiver -> sender   HELLO   b"LBRAFT01" (8 bytes) | nonce (32 random bytes, new for every connection)
    sender -> receiver   PROOF   b"LBRAFT01" (8) | from_node (u32 BE) | to_node (u32 BE)
                                 | HMAC-SHA256(cluster secret, nonce | from_node | to_node) (32 bytes)
    receiver -> sender   ACCEPT  one zero byte, at once, if the PROOF holds (else the receiver closes the connection)
    sender -> receiver   FRAME*  length (u32 BE, at most MAX_FRAME_BYTES) | a RaftEnvelope protobuf of that length
    receiver -> sender   KEEPALIVE*  one zero byte every KEEPALIVE_INTERVAL_S

The nonce makes a recorded PROOF useless on another connection; the secret itself never travels. Every
envelope must name the proven from_node and to_node (a forged one is dropped). The sender declares a
connection dead when no byte (HELLO or KEEPALIVE) has come back for KEEPALIVE_TIMEOUT_S: a peer that lost
power, or a network that swallows bytes without resetting anything, is noticed in seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct

MAGIC = b"LBRAFT01"
NONCE_BYTES = 32
MAC_BYTES = 32
HELLO_BYTES = len(MAGIC) + NONCE_BYTES
_NODES = struct.Struct(">II")
PROOF_BYTES = len(MAGIC) + _NODES.size + MAC_BYTES
FRAME_HEADER = struct.Struct(">I")
# As large as the biggest envelope a broker builds (one message alone may exceed the usual envelope bound) and
# the gRPC limit the Raft stream had; a length beyond it is not a frame of ours, and the connection is closed.
MAX_FRAME_BYTES = 64 << 20
KEEPALIVE = b"\x00"  # also the ACCEPT
KEEPALIVE_INTERVAL_S = 1.0
KEEPALIVE_TIMEOUT_S = 4.0
HANDSHAKE_TIMEOUT_S = 5.0
# A frame must arrive whole within this long of its first byte (checked at each keepalive): a sender writes one in
# a go, and an unfinished one would hold up to MAX_FRAME_BYTES of the receiver's memory for nothing.
FRAME_DEADLINE_S = 30.0
# What the unfinished frames of all connections together may hold of a receiver's memory. Past it, the connection
# holding the most is closed (its sender reconnects and Raft resends): the deadline above bounds an unfinished
# frame in time, this bounds them in number. One frame of the largest size: peers write their frames in one go,
# and frames are about an envelope (1 MiB) unless one message is larger (an append of one big batch).
MAX_UNFINISHED_FRAMES_BYTES = MAX_FRAME_BYTES
# Connections that have not proven the secret yet, per receiver: past this, new ones are closed at once, so a
# flood of idle connections costs a bounded amount of memory and timers.
MAX_PENDING_HANDSHAKES = 64
# TCP keepalive as a second line (the receiver never hears a sender that vanished without a FIN otherwise):
# probes after 2 s idle, every 1 s, 3 unanswered and the kernel drops the connection.
TCP_KEEPALIVE_IDLE_S = 2
TCP_KEEPALIVE_INTERVAL_S = 1
TCP_KEEPALIVE_PROBES = 3


class HandshakeError(ValueError):
    """The other end is not a broker of this cluster (or not this protocol); the message says which check failed
    and ``kind`` names the check ("greeting" or "secret")."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def hello(nonce: bytes) -> bytes:
    assert len(nonce) == NONCE_BYTES
    return MAGIC + nonce


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def parse_hello(data: bytes | bytearray) -> bytes:
    """The nonce of a HELLO (exactly HELLO_BYTES)."""
    if data[:len(MAGIC)] != MAGIC:
        raise HandshakeError("the peer's Raft port did not answer with the logbroker Raft greeting "
                             "(is the Raft address of that broker another service's port?)", "greeting")
    return bytes(data[len(MAGIC):HELLO_BYTES])


def _mac(secret: str, nonce: bytes, from_node: int, to_node: int) -> bytes:
    return hmac.new(secret.encode(), nonce + _NODES.pack(from_node, to_node), hashlib.sha256).digest()


def proof(secret: str, nonce: bytes, from_node: int, to_node: int) -> bytes:
    return MAGIC + _NODES.pack(from_node, to_node) + _mac(secret, nonce, from_node, to_node)


def check_proof(data: bytes, secret: str, nonce: bytes) -> tuple[int, int]:
    """(from_node, to_node) of a PROOF (exactly PROOF_BYTES) that carries this cluster's secret; else raises."""
    if data[:len(MAGIC)] != MAGIC:
        raise HandshakeError("it does not speak the logbroker Raft protocol (wrong greeting)", "greeting")
    from_node, to_node = _NODES.unpack_from(data, len(MAGIC))
    given = bytes(data[len(MAGIC) + _NODES.size:PROOF_BYTES])
    if not secret or not hmac.compare_digest(given, _mac(secret, nonce, from_node, to_node)):
        raise HandshakeError(f"it claims to be node {from_node} but does not prove this cluster's secret "
                             "(a broker of this cluster needs the same --cluster-secret-file as the others)", "secret")
    return from_node, to_node


def frame(envelope_bytes: bytes) -> bytes:
    if len(envelope_bytes) > MAX_FRAME_BYTES:
        raise ValueError(f"a Raft envelope of {len(envelope_bytes)} bytes exceeds the frame limit, "
                         f"{MAX_FRAME_BYTES} bytes")
    return FRAME_HEADER.pack(len(envelope_bytes)) + envelope_bytes


def tune_socket(sock: socket.socket | None) -> None:
    """No Nagle delay (a lone acknowledgement leaves at once) and TCP keepalive probes."""
    if sock is None:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", TCP_KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", TCP_KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", TCP_KEEPALIVE_PROBES)):
        option = getattr(socket, name, None)
        if option is not None:  # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
