"""Who may speak as a broker: peer RPCs (leader reports, moves) carry the cluster secret.

Clients and brokers share one port, so the broker-to-broker methods must tell a peer from a client. Until
TLS with client certificates arrives, every broker of a cluster is given the same secret (a file or an
environment variable, never a flag, so it does not show in `ps`), sends it as call metadata on every peer
RPC, and refuses a peer RPC without it. A cluster of one has no peers and refuses every peer RPC.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

SECRET_METADATA_KEY = "x-logbroker-cluster-secret"
MIN_SECRET_CHARS = 16


class ClusterSecretError(ValueError):
    """The configured secret is unusable; the message says what a good one looks like."""


def check_secret(secret: str) -> str:
    secret = secret.strip()
    if len(secret) < MIN_SECRET_CHARS:
        raise ClusterSecretError(
            f"the cluster secret has {len(secret)} characters; use at least {MIN_SECRET_CHARS} "
            "(for example the output of `python -c 'import secrets; print(secrets.token_hex(32))'`)")
    if not secret.isascii() or not secret.isprintable():
        raise ClusterSecretError("the cluster secret must be printable ASCII (it travels as gRPC metadata)")
    return secret


def peer_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that identifies the caller as a broker of this cluster."""
    return ((SECRET_METADATA_KEY, secret),) if secret else ()


def is_peer(metadata: Iterable[tuple[str, str | bytes]] | None, secret: str) -> bool:
    """True when the call carries this cluster's secret. Compared in constant time."""
    if not secret or metadata is None:
        return False
    for key, value in metadata:
        if key == SECRET_METADATA_KEY:
            given = value.encode() if isinstance(value, str) else value
            return hmac.compare_digest(given, secret.encode())
    return False
