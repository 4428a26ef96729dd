"""Errors the broker answers with: each carries a wire ErrorCode and a message for the operator."""

from __future__ import annotations

from typing import Any

from logbroker_client.error_codes import ALREADY_STORED_MARKER  # noqa: F401  (re-exported: the broker says it)
from logbroker_client.proto import logbroker_pb2 as pb


class BrokerError(Exception):
    code: Any = pb.ErrorCode.INVALID_REQUEST

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownTopicOrPartition(BrokerError):
    code = pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION


class InvalidTopic(BrokerError):
    code = pb.ErrorCode.INVALID_TOPIC


class TopicAlreadyExists(BrokerError):
    code = pb.ErrorCode.TOPIC_ALREADY_EXISTS


class InvalidPartitions(BrokerError):
    code = pb.ErrorCode.INVALID_PARTITIONS


class InvalidReplicationFactor(BrokerError):
    code = pb.ErrorCode.INVALID_REPLICATION_FACTOR


class InvalidConfig(BrokerError):
    code = pb.ErrorCode.INVALID_CONFIG


class CorruptBatch(BrokerError):
    code = pb.ErrorCode.CORRUPT_BATCH


class RecordTooLarge(BrokerError):
    code = pb.ErrorCode.RECORD_TOO_LARGE


class OffsetOutOfRange(BrokerError):
    code = pb.ErrorCode.OFFSET_OUT_OF_RANGE


class StorageFailure(BrokerError):
    code = pb.ErrorCode.STORAGE_ERROR


class InvalidRequest(BrokerError):
    code = pb.ErrorCode.INVALID_REQUEST


class NotLeader(BrokerError):
    code = pb.ErrorCode.NOT_LEADER

    def __init__(self, message: str, leader_id: int = -1, leader_address: str = "") -> None:
        super().__init__(message)
        self.leader_id = leader_id
        self.leader_address = leader_address


class LeaderNotAvailable(BrokerError):
    code = pb.ErrorCode.LEADER_NOT_AVAILABLE


class NotEnoughReplicas(BrokerError):
    code = pb.ErrorCode.NOT_ENOUGH_REPLICAS


class RequestTimedOut(BrokerError):
    code = pb.ErrorCode.REQUEST_TIMED_OUT




class DuplicateSequence(BrokerError):
    code = pb.ErrorCode.INVALID_REQUEST


class OutOfOrderSequence(BrokerError):
    code = pb.ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER


class InvalidProducerEpoch(BrokerError):
    code = pb.ErrorCode.INVALID_PRODUCER_EPOCH
