"""The one registry of logbroker's error codes: what each means on the gRPC port, on the Kafka port, and to a client.

Every failure that crosses the wire has one name here. The gRPC service answers it as that logbroker.v1.ErrorCode,
the Kafka listener as the Kafka code named in `kafka` (logbroker/kafka/errors.py resolves the names with kio), and
the clients raise the exception class of that code (errors.py), retrying it when `retriable` says so. The broker's
own exceptions (logbroker/server/errors.py, logbroker/groups/errors.py) carry one of these names too.
tests/client/test_error_codes.py checks that the four places agree: every wire code has an entry, every Kafka
name exists, and every client class retries exactly when its entry says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from logbroker_client.proto import logbroker_pb2 as pb


@dataclass(frozen=True)
class ErrorSpec:
    name: str
    kafka: str  # the Kafka protocol's name for it (kio's ErrorCode member)
    retriable: bool  # a client retries the request (after fresh metadata, a backoff) rather than failing it


def _spec(name: str, kafka: str, retriable: bool = False) -> ErrorSpec:
    return ErrorSpec(name, kafka, retriable)


_SPECS = (
    _spec("NONE", "none"),
    _spec("UNKNOWN_TOPIC_OR_PARTITION", "unknown_topic_or_partition"),
    _spec("NOT_LEADER", "not_leader_or_follower", retriable=True),
    _spec("OFFSET_OUT_OF_RANGE", "offset_out_of_range"),
    _spec("CORRUPT_BATCH", "corrupt_message"),
    _spec("RECORD_TOO_LARGE", "message_too_large"),
    _spec("NOT_ENOUGH_REPLICAS", "not_enough_replicas", retriable=True),
    _spec("INVALID_TOPIC", "invalid_topic_exception"),
    _spec("TOPIC_ALREADY_EXISTS", "topic_already_exists"),
    _spec("INVALID_CONFIG", "invalid_config"),
    _spec("INVALID_PARTITIONS", "invalid_partitions"),
    _spec("INVALID_REPLICATION_FACTOR", "invalid_replication_factor"),
    _spec("STORAGE_ERROR", "kafka_storage_error"),
    _spec("REQUEST_TIMED_OUT", "request_timed_out", retriable=True),
    _spec("INVALID_REQUEST", "invalid_request"),
    _spec("LEADER_NOT_AVAILABLE", "leader_not_available", retriable=True),
    _spec("NOT_COORDINATOR", "not_coordinator", retriable=True),
    _spec("COORDINATOR_LOAD_IN_PROGRESS", "coordinator_load_in_progress", retriable=True),
    _spec("COORDINATOR_NOT_AVAILABLE", "coordinator_not_available", retriable=True),
    _spec("UNKNOWN_MEMBER_ID", "unknown_member_id"),
    _spec("FENCED_MEMBER_EPOCH", "fenced_member_epoch"),
    _spec("STALE_MEMBER_EPOCH", "stale_member_epoch"),
    _spec("INVALID_GROUP_ID", "invalid_group_id"),
    _spec("GROUP_ID_NOT_FOUND", "group_id_not_found"),
    _spec("NON_EMPTY_GROUP", "non_empty_group"),
    _spec("UNRELEASED_INSTANCE_ID", "unreleased_instance_id"),
    _spec("GROUP_SUBSCRIBED_TO_TOPIC", "group_subscribed_to_topic"),
    # KIP-848 has no such code: a member committing a partition it does not own is told its generation is
    # stale on the Kafka port, which makes a classic client rejoin.
    _spec("PARTITION_NOT_OWNED", "illegal_generation"),
    _spec("INVALID_RECORD_STATE", "invalid_record_state"),
    _spec("INVALID_GROUP_CONFIG", "invalid_config"),
    _spec("OUT_OF_ORDER_SEQUENCE_NUMBER", "out_of_order_sequence_number", retriable=True),
    _spec("INVALID_PRODUCER_EPOCH", "invalid_producer_epoch"),
    # Named by the broker's exceptions but answered with a wire code above on the gRPC port.
    _spec("DUPLICATE_SEQUENCE", "duplicate_sequence_number"),
    # The classic group protocol, served on the Kafka port only (logbroker.groups.classic).
    _spec("ILLEGAL_GENERATION", "illegal_generation"),
    _spec("REBALANCE_IN_PROGRESS", "rebalance_in_progress", retriable=True),
    _spec("INCONSISTENT_GROUP_PROTOCOL", "inconsistent_group_protocol"),
    _spec("MEMBER_ID_REQUIRED", "member_id_required"),
    _spec("INVALID_SESSION_TIMEOUT", "invalid_session_timeout"),
    _spec("FENCED_INSTANCE_ID", "fenced_instance_id"),
    _spec("GROUP_MAX_SIZE_REACHED", "group_max_size_reached"),
    _spec("UNSUPPORTED_VERSION", "unsupported_version"),
    _spec("UNKNOWN_SERVER_ERROR", "unknown_server_error"),
)

ERRORS: dict[str, ErrorSpec] = {spec.name: spec for spec in _SPECS}

# Said in the message of a DUPLICATE_SEQUENCE answer, which shares INVALID_REQUEST's gRPC code: "this batch was
# stored long ago, where is no longer known". A producer completes it as stored (offset unknown), and a broker
# writing dead letters to another broker tells it from a refusal.
ALREADY_STORED_MARKER = "[already stored]"


def spec_for_code(code: int) -> ErrorSpec:
    """The registry entry of a logbroker.v1.ErrorCode value (UNKNOWN_SERVER_ERROR for one this client does not
    know: a newer broker's)."""
    name = pb.ErrorCode.Name(code) if code in pb.ErrorCode.values() else "UNKNOWN_SERVER_ERROR"
    return ERRORS.get(name, ERRORS["UNKNOWN_SERVER_ERROR"])
