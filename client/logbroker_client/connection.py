"""Bootstrap addresses, gRPC channels and the error translation every client shares."""

from __future__ import annotations

import os
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2_grpc

from logbroker_client.errors import BrokerUnavailableError, InvalidRequestError, LogbrokerError, RequestTimedOutError
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
BOOTSTRAP_ENV = "LOGBROKER_BOOTSTRAP"
MAX_MESSAGE_BYTES = 128 * 1024 * 1024
DEFAULT_REQUEST_TIMEOUT_MS = 30_000

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.enable_retries", 0),
    # gRPC backs off reconnecting to a dead address for up to 120 s by default; a restarted broker should be
    # used again within seconds, so cap the backoff (a refused connection costs almost nothing).
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def parse_bootstrap(bootstrap: str | Sequence[str] | None) -> list[str]:
    """HOST:PORT list from the argument, else $LOGBROKER_BOOTSTRAP, else 127.0.0.1:9092."""
    if bootstrap is None:
        bootstrap = os.environ.get(BOOTSTRAP_ENV) or DEFAULT_BOOTSTRAP
    items = bootstrap.split(",") if isinstance(bootstrap, str) else list(bootstrap)
    addresses = [item.strip() for item in items if item.strip()]
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise LogbrokerError(f"bootstrap address {address!r} is not HOST:PORT (for example 127.0.0.1:9092)")
    if not addresses:
        raise LogbrokerError("no bootstrap address given; pass --bootstrap HOST:PORT or set LOGBROKER_BOOTSTRAP")
    return addresses


def bootstrap_was_given(bootstrap: str | Sequence[str] | None) -> bool:
    """False when the client fell back to 127.0.0.1:9092 because nobody named a broker."""
    return bootstrap is not None or bool(os.environ.get(BOOTSTRAP_ENV))


def rpc_code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    return exc.code() if hasattr(exc, "code") else None  # type: ignore[no-any-return]


def unreachable_reason(exc: grpc.RpcError) -> str:
    """Why a call got no answer, in a few words (gRPC's own text names every address it tried)."""
    details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
    lowered = details.lower()
    if "connection refused" in lowered:
        return "connection refused"
    if rpc_code(exc) == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer in time"
    if "shutdown" in lowered or "shutting down" in lowered:
        return "shutting down"
    return " ".join(details.split()) or "unavailable"


def service_name(admin: bool, service: str) -> str:
    """Which stub of a connection serves a call: "broker", "admin", "groups" or "share"."""
    return service or ("admin" if admin else "broker")


def translate_rpc_error(exc: grpc.RpcError, address: str) -> LogbrokerError:
    if rpc_code(exc) == grpc.StatusCode.UNAVAILABLE:
        # Only this one broker failed; whoever tried every address says whether the cluster is down.
        return BrokerUnavailableError(f"cannot reach the broker at {address} ({unreachable_reason(exc)})")
    return translate_status(rpc_code(exc), exc.details() if hasattr(exc, "details") else str(exc), address)


def translate_status(code: grpc.StatusCode | None, details: str | None, address: str) -> LogbrokerError:
    """The error for a call that failed as a whole with this status (on the gRPC port or the data port)."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return BrokerUnavailableError(f"cannot reach the broker at {address} ({details or 'unavailable'})")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RequestTimedOutError(f"broker at {address} did not answer in time")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(f"broker at {address} rejected the request: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (details or ""):
        return InvalidRequestError(
            f"broker at {address} refused a message as too large ({details}); a broker takes requests of at "
            "most its max_request_bytes: keep the client's max_request_bytes at or below it")
    return LogbrokerError(f"broker at {address} failed the request: {code}: {details}")


class Connection:
    """A channel and stubs to one broker (sync API)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.broker = pb_grpc.BrokerStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self.groups = pb_grpc.GroupsStub(self.channel)
        self.share = pb_grpc.ShareStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()


class AsyncConnection:
    """A channel and stubs to one broker (asyncio API)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.broker = pb_grpc.BrokerStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self.groups = pb_grpc.GroupsStub(self.channel)
        self.share = pb_grpc.ShareStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()
