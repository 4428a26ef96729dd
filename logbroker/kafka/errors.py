"""From the broker's and the group coordinator's errors to Kafka's error codes.

The broker core raises BrokerError subclasses (logbroker.server.errors), whose wire code is a
logbroker.v1.ErrorCode; the coordinator raises GroupError subclasses named by the same code names. Both are
resolved to a code name here, and KAFKA_CODES maps that name to Kafka's ErrorCode as the registry shared with
the gRPC service and the clients says (logbroker_client.error_codes), so every port agrees on what every failure
means. Anything else is UNKNOWN_SERVER_ERROR (and logged).
"""

from __future__ import annotations

import logging

from kio.schema.errors import ErrorCode
from logbroker_client.error_codes import ERRORS
from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.groups.errors import GroupError
from logbroker.server import errors

log = logging.getLogger("logbroker.kafka")

# Every wire code's Kafka counterpart, from the one registry (logbroker_client.error_codes).
KAFKA_CODES: dict[str, ErrorCode] = {name: ErrorCode[spec.kafka] for name, spec in ERRORS.items()}


def code_name(exc: BaseException) -> str:
    """The wire code name of an error raised by the broker core or the coordinator."""
    if isinstance(exc, errors.DuplicateSequence):
        return "DUPLICATE_SEQUENCE"
    if isinstance(exc, errors.BrokerError):
        return str(pb.ErrorCode.Name(exc.code))
    if isinstance(exc, GroupError):
        return exc.code
    return "UNKNOWN_SERVER_ERROR"


def kafka_error(exc: BaseException, where: str = "") -> tuple[ErrorCode, str]:
    """Kafka's code and a message for an error; unexpected ones are logged with their traceback."""
    name = code_name(exc)
    if name == "UNKNOWN_SERVER_ERROR":
        log.error("%s: unexpected error", where or "kafka request", exc_info=exc)
        return ErrorCode.unknown_server_error, f"{where}: internal error {type(exc).__name__}: {exc}"
    message = getattr(exc, "message", str(exc))
    return KAFKA_CODES.get(name, ErrorCode.unknown_server_error), message
