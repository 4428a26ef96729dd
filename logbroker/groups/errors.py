"""Errors of the group coordinator, named by Kafka's error codes so every front end maps them the same way.

The coordinator knows nothing of gRPC or Kafka's wire protocol: each error carries the code's name
(``"UNKNOWN_MEMBER_ID"``), and the front end turns it into its own wire code.
"""

from __future__ import annotations


class GroupError(Exception):
    code = "INVALID_REQUEST"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidGroupId(GroupError):
    code = "INVALID_GROUP_ID"


class InvalidGroupRequest(GroupError):
    code = "INVALID_REQUEST"


class GroupIdNotFound(GroupError):
    code = "GROUP_ID_NOT_FOUND"


class UnknownMemberId(GroupError):
    code = "UNKNOWN_MEMBER_ID"


class FencedMemberEpoch(GroupError):
    code = "FENCED_MEMBER_EPOCH"


class StaleMemberEpoch(GroupError):
    code = "STALE_MEMBER_EPOCH"


class UnreleasedInstanceId(GroupError):
    code = "UNRELEASED_INSTANCE_ID"


class NonEmptyGroup(GroupError):
    code = "NON_EMPTY_GROUP"


class PartitionNotOwned(GroupError):
    code = "PARTITION_NOT_OWNED"


class NotCoordinator(GroupError):
    code = "NOT_COORDINATOR"


class CoordinatorLoadInProgress(GroupError):
    code = "COORDINATOR_LOAD_IN_PROGRESS"


class CoordinatorNotAvailable(GroupError):
    code = "COORDINATOR_NOT_AVAILABLE"
