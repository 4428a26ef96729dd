"""Bootstrap addresses, gRPC channels and the error translation every client shares."""

from __future__ import annotations

import os
from collections.abc import Sequence

import grpc

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


def translate_rpc_error(exc: grpc.RpcError, address: str) -> LogbrokerError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return BrokerUnavailableError(
            f"cannot reach a broker at {address} ({details}); is it running? `make run` starts a local one"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RequestTimedOutError(f"broker at {address} did not answer in time")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(f"broker at {address} rejected the request: {details}")
    return LogbrokerError(f"broker at {address} failed the request: {code}: {details}")


class Connection:
    """A channel and stubs to one broker (sync API)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.broker = pb_grpc.BrokerStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def close(self) -> None:
        self.channel.close()


class AsyncConnection:
    """A channel and stubs to one broker (asyncio API)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.broker = pb_grpc.BrokerStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()
