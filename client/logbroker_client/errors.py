"""Client-side errors: one class per broker error code, each with the broker's own message."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from logbroker_client.error_codes import spec_for_code
from logbroker_client.proto import logbroker_pb2 as pb


class LogbrokerError(Exception):
    """Base of every error this client raises."""

    retriable = False


class BrokerUnavailableError(LogbrokerError):
    retriable = True


class NoBrokerAnsweredError(BrokerUnavailableError):
    """Every address tried failed to answer: the cluster is down or unreachable from here."""


class RequestTimedOutError(LogbrokerError):
    retriable = True


class DeliveryFailedError(LogbrokerError):
    """Producer.flush(raise_on_failure=True): records failed since the previous flush; the message sums them up."""

    def __init__(self, message: str, failed_records: int, errors: dict[str, int]) -> None:
        super().__init__(message)
        self.failed_records = failed_records
        self.errors = errors  # error message -> records that failed with it


class BrokerResponseError(LogbrokerError):
    """The broker answered with an error code for a topic or partition."""

    code: int = pb.ErrorCode.INVALID_REQUEST

    def __init__(self, message: str, topic: str | None = None, partition: int | None = None) -> None:
        super().__init__(message)
        self.topic = topic
        self.partition = partition


class UnknownTopicOrPartitionError(BrokerResponseError):
    code = pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION


class NotLeaderError(BrokerResponseError):
    code = pb.ErrorCode.NOT_LEADER
    retriable = True


class LeaderNotAvailableError(BrokerResponseError):
    code = pb.ErrorCode.LEADER_NOT_AVAILABLE
    retriable = True


class PartitionOfflineError(LeaderNotAvailableError):
    """No leader, and no broker holding a replica answers: nothing can be written or read until one of them is
    back, so a client fails at once instead of retrying until its delivery timeout."""

    retriable = False


class OffsetOutOfRangeError(BrokerResponseError):
    code = pb.ErrorCode.OFFSET_OUT_OF_RANGE


class CorruptBatchError(BrokerResponseError, ValueError):
    """Bytes that are not a valid v2 record batch, or records that contradict their batch's header: raised by
    the codec (records.py) wherever it reads them, and for the broker's CORRUPT_BATCH answer. The message
    says which check failed."""

    code = pb.ErrorCode.CORRUPT_BATCH


class RecordTooLargeError(BrokerResponseError):
    code = pb.ErrorCode.RECORD_TOO_LARGE


class NotEnoughReplicasError(BrokerResponseError):
    code = pb.ErrorCode.NOT_ENOUGH_REPLICAS
    retriable = True


class InvalidTopicError(BrokerResponseError):
    code = pb.ErrorCode.INVALID_TOPIC


class TopicAlreadyExistsError(BrokerResponseError):
    code = pb.ErrorCode.TOPIC_ALREADY_EXISTS


class InvalidConfigError(BrokerResponseError):
    code = pb.ErrorCode.INVALID_CONFIG


class InvalidPartitionsError(BrokerResponseError):
    code = pb.ErrorCode.INVALID_PARTITIONS


class InvalidReplicationFactorError(BrokerResponseError):
    code = pb.ErrorCode.INVALID_REPLICATION_FACTOR


class StorageError(BrokerResponseError):
    code = pb.ErrorCode.STORAGE_ERROR


class InvalidRequestError(BrokerResponseError):
    code = pb.ErrorCode.INVALID_REQUEST


class OutOfOrderSequenceError(BrokerResponseError):
    """A batch arrived before an earlier one of its partition: the producer resends them in order."""

    code = pb.ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER
    retriable = True


class InvalidProducerEpochError(BrokerResponseError):
    """A newer epoch of this producer id wrote to the partition: this instance is fenced."""

    code = pb.ErrorCode.INVALID_PRODUCER_EPOCH


# ------------------------------------------------------------------------------------ consumer groups


class CoordinatorError(BrokerResponseError):
    """The group's coordinator moved, is loading the group, or has no leader now: find it again and retry."""

    retriable = True


class NotCoordinatorError(CoordinatorError):
    code = pb.ErrorCode.NOT_COORDINATOR


class CoordinatorLoadInProgressError(CoordinatorError):
    code = pb.ErrorCode.COORDINATOR_LOAD_IN_PROGRESS


class CoordinatorNotAvailableError(CoordinatorError):
    code = pb.ErrorCode.COORDINATOR_NOT_AVAILABLE


class CommitFailedError(BrokerResponseError):
    """A commit the coordinator refused because this member no longer owns what it committed (its epoch
    is stale, it was fenced, or the partition is not its own): nothing of that commit was written."""


class UnknownMemberIdError(CommitFailedError):
    code = pb.ErrorCode.UNKNOWN_MEMBER_ID


class FencedMemberEpochError(CommitFailedError):
    code = pb.ErrorCode.FENCED_MEMBER_EPOCH


class StaleMemberEpochError(CommitFailedError):
    code = pb.ErrorCode.STALE_MEMBER_EPOCH


class PartitionNotOwnedError(CommitFailedError):
    code = pb.ErrorCode.PARTITION_NOT_OWNED


class InvalidGroupIdError(BrokerResponseError):
    code = pb.ErrorCode.INVALID_GROUP_ID


class GroupIdNotFoundError(BrokerResponseError):
    code = pb.ErrorCode.GROUP_ID_NOT_FOUND


class NonEmptyGroupError(BrokerResponseError):
    code = pb.ErrorCode.NON_EMPTY_GROUP


class UnreleasedInstanceIdError(BrokerResponseError):
    code = pb.ErrorCode.UNRELEASED_INSTANCE_ID


class GroupSubscribedToTopicError(BrokerResponseError):
    code = pb.ErrorCode.GROUP_SUBSCRIBED_TO_TOPIC


class InvalidRecordStateError(BrokerResponseError):
    """A share-group acknowledgement for a record this member does not hold (never did, or its lock expired)."""

    code = pb.ErrorCode.INVALID_RECORD_STATE


class InvalidGroupConfigError(BrokerResponseError):
    code = pb.ErrorCode.INVALID_GROUP_CONFIG


class AcknowledgementError(BrokerResponseError):
    """ShareConsumer.commit() / flush_acks(): acknowledgements the broker refused or that could not be delivered.
    `failures` lists them (share_state.AckFailure: topic, partition, offsets, kind, and its own typed error:
    InvalidRecordStateError when the member did not hold the records, never or no longer, as when a lock
    expired and the record may have gone to another member)."""

    def __init__(self, message: str, failures: Sequence[Any]) -> None:
        super().__init__(message, failures[0].topic if failures else None,
                         failures[0].partition if failures else None)
        self.failures = list(failures)


_BY_CODE: dict[int, type[BrokerResponseError]] = {
    cls.code: cls
    for cls in (
        UnknownTopicOrPartitionError, NotLeaderError, LeaderNotAvailableError, OffsetOutOfRangeError,
        CorruptBatchError, RecordTooLargeError, NotEnoughReplicasError, InvalidTopicError,
        TopicAlreadyExistsError, InvalidConfigError, InvalidPartitionsError, InvalidReplicationFactorError,
        StorageError, InvalidRequestError, NotCoordinatorError, CoordinatorLoadInProgressError,
        CoordinatorNotAvailableError, UnknownMemberIdError, FencedMemberEpochError, StaleMemberEpochError,
        PartitionNotOwnedError, InvalidGroupIdError, GroupIdNotFoundError, NonEmptyGroupError,
        UnreleasedInstanceIdError, GroupSubscribedToTopicError, InvalidRecordStateError, InvalidGroupConfigError,
        OutOfOrderSequenceError, InvalidProducerEpochError,
    )
}


def error_for(code: int, message: str, topic: str | None = None, partition: int | None = None) -> LogbrokerError:
    """The exception of a broker's answer: the class of its code (error_codes.py says which codes are retried)."""
    if code == pb.ErrorCode.REQUEST_TIMED_OUT:
        return RequestTimedOutError(message)
    cls = _BY_CODE.get(code, BrokerResponseError)
    return cls(message or spec_for_code(code).name, topic, partition)
