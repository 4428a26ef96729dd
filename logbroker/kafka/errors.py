"""One table from the broker's and the group coordinator's errors to Kafka's error codes.

The broker core raises BrokerError subclasses (logbroker.server.errors), whose wire code is a
logbroker.v1.ErrorCode; the coordinator raises GroupError subclasses named by Kafka's code names. Both are
resolved to a code name here, and KAFKA_CODES maps that name to Kafka's ErrorCode, so the gRPC service and
this listener agree on what every failure means. Anything else is UNKNOWN_SERVER_ERROR (and logged).
"""

from __future__ import annotations

import logging

from kio.schema.errors import ErrorCode
from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.groups.errors import GroupError
from logbroker.server import errors

log = logging.getLogger("logbroker.kafka")

KAFKA_CODES: dict[str, ErrorCode] = {
    "NONE": ErrorCode.none,
    "UNKNOWN_TOPIC_OR_PARTITION": ErrorCode.unknown_topic_or_partition,
    "NOT_LEADER": ErrorCode.not_leader_or_follower,
    "OFFSET_OUT_OF_RANGE": ErrorCode.offset_out_of_range,
    "CORRUPT_BATCH": ErrorCode.corrupt_message,
    "RECORD_TOO_LARGE": ErrorCode.message_too_large,
    "NOT_ENOUGH_REPLICAS": ErrorCode.not_enough_replicas,
    "INVALID_TOPIC": ErrorCode.invalid_topic_exception,
    "TOPIC_ALREADY_EXISTS": ErrorCode.topic_already_exists,
    "INVALID_CONFIG": ErrorCode.invalid_config,
    "INVALID_PARTITIONS": ErrorCode.invalid_partitions,
    "INVALID_REPLICATION_FACTOR": ErrorCode.invalid_replication_factor,
    "STORAGE_ERROR": ErrorCode.kafka_storage_error,
    "REQUEST_TIMED_OUT": ErrorCode.request_timed_out,
    "INVALID_REQUEST": ErrorCode.invalid_request,
    "LEADER_NOT_AVAILABLE": ErrorCode.leader_not_available,
    "DUPLICATE_SEQUENCE": ErrorCode.duplicate_sequence_number,
    "OUT_OF_ORDER_SEQUENCE_NUMBER": ErrorCode.out_of_order_sequence_number,
    "INVALID_PRODUCER_EPOCH": ErrorCode.invalid_producer_epoch,
    "NOT_COORDINATOR": ErrorCode.not_coordinator,
    "COORDINATOR_LOAD_IN_PROGRESS": ErrorCode.coordinator_load_in_progress,
    "COORDINATOR_NOT_AVAILABLE": ErrorCode.coordinator_not_available,
    "UNKNOWN_MEMBER_ID": ErrorCode.unknown_member_id,
    "FENCED_MEMBER_EPOCH": ErrorCode.fenced_member_epoch,
    "STALE_MEMBER_EPOCH": ErrorCode.stale_member_epoch,
    "INVALID_GROUP_ID": ErrorCode.invalid_group_id,
    "GROUP_ID_NOT_FOUND": ErrorCode.group_id_not_found,
    "NON_EMPTY_GROUP": ErrorCode.non_empty_group,
    "UNRELEASED_INSTANCE_ID": ErrorCode.unreleased_instance_id,
    "GROUP_SUBSCRIBED_TO_TOPIC": ErrorCode.group_subscribed_to_topic,
    # KIP-848 has no such code: a member committing a partition it does not own is told its generation
    # is stale, which makes a classic client rejoin.
    "PARTITION_NOT_OWNED": ErrorCode.illegal_generation,
    "INVALID_RECORD_STATE": ErrorCode.invalid_record_state,
    "INVALID_GROUP_CONFIG": ErrorCode.invalid_config,
    # Classic group protocol (logbroker.groups.classic).
    "ILLEGAL_GENERATION": ErrorCode.illegal_generation,
    "REBALANCE_IN_PROGRESS": ErrorCode.rebalance_in_progress,
    "INCONSISTENT_GROUP_PROTOCOL": ErrorCode.inconsistent_group_protocol,
    "MEMBER_ID_REQUIRED": ErrorCode.member_id_required,
    "INVALID_SESSION_TIMEOUT": ErrorCode.invalid_session_timeout,
    "FENCED_INSTANCE_ID": ErrorCode.fenced_instance_id,
    "GROUP_MAX_SIZE_REACHED": ErrorCode.group_max_size_reached,
    "UNKNOWN_SERVER_ERROR": ErrorCode.unknown_server_error,
    "UNSUPPORTED_VERSION": ErrorCode.unsupported_version,
}


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
