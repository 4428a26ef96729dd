"""Consumer-group requests and answers, without I/O: shared by the sync and asyncio consumers and admins.

Every request about a group goes to its coordinator (the leader of the group's __consumer_offsets
partition), found with FindCoordinator and looked up again when an answer says it moved. Here: the
coordinator cache, reading errors out of answers, group descriptions with lag, and offset-reset plans.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from logbroker_client.errors import InvalidGroupIdError, LogbrokerError, NonEmptyGroupError, error_for
from logbroker_client.group_member import partitions_from_pb, partitions_to_pb
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.types import (
    GroupDescription,
    GroupListing,
    MemberDescription,
    OffsetChange,
    PartitionLag,
    TopicPartition,
)

COORDINATOR_RETRY_BACKOFF_S = 0.1  # while __consumer_offsets is created or its leader is elected


class CoordinatorCache:
    """group id -> the coordinator's HOST:PORT, as FindCoordinator last said."""

    def __init__(self) -> None:
        self._addresses: dict[str, str] = {}

    def get(self, group_id: str) -> str | None:
        return self._addresses.get(group_id)

    def remember(self, group_id: str, address: str) -> None:
        self._addresses[group_id] = address

    def forget(self, group_id: str) -> None:
        self._addresses.pop(group_id, None)


def check_group_id(group_id: str | None) -> str:
    """An empty group id is refused here (None means "no group"); the coordinator checks the rest."""
    if group_id is None or not group_id:
        raise InvalidGroupIdError("a group id must have 1 to 255 characters, got an empty one; name the group "
                                  "(for example group_id='billing') or leave it out to consume without a group")
    return group_id


def find_coordinator_request(group_id: str) -> pb.FindCoordinatorRequest:
    return pb.FindCoordinatorRequest(group_ids=[group_id])


def coordinator_address(response: pb.FindCoordinatorResponse, group_id: str) -> str:
    """The coordinator's address, or the typed error (retriable while the group's partition has no leader)."""
    for found in response.coordinators:
        if found.group_id == group_id:
            if found.error_code:
                raise error_for(found.error_code, found.error_message)
            return str(found.address)
    raise LogbrokerError(f"FindCoordinator answered nothing about group {group_id!r}")


def answer_error(response: Any) -> LogbrokerError | None:
    """The error of an answer that carries one for the whole request (Heartbeat, CommitOffsets, FetchOffsets)."""
    if response.error_code:
        return error_for(response.error_code, response.error_message)
    return None


def group_result_error(items: Iterable[Any]) -> LogbrokerError | None:
    """The error of a one-group DescribeGroups or DeleteGroups answer."""
    for item in items:
        if item.error_code:
            return error_for(item.error_code, item.error_message)
    return None


def describe_error(response: pb.DescribeGroupsResponse) -> LogbrokerError | None:
    return group_result_error(response.groups)


def delete_error(response: pb.DeleteGroupsResponse) -> LogbrokerError | None:
    return group_result_error(response.results)


def committed_offsets(response: pb.FetchOffsetsResponse) -> dict[TopicPartition, pb.CommittedOffset]:
    """Partitions with a committed offset (the broker answers -1 for the others)."""
    return {TopicPartition(o.topic, o.partition): o for o in response.offsets if o.offset >= 0}


def fetch_offsets_request(group_id: str, tps: Iterable[TopicPartition] = ()) -> pb.FetchOffsetsRequest:
    return pb.FetchOffsetsRequest(group_id=group_id, partitions=partitions_to_pb(tps))


def group_listings(response: pb.ListGroupsResponse) -> list[GroupListing]:
    error = answer_error(response)
    if error is not None:
        raise error
    return [GroupListing(g.group_id, g.state, g.members) for g in response.groups]


# ---------------------------------------------------------------------------------- describe


def member_description(member: pb.GroupMember) -> MemberDescription:
    return MemberDescription(
        member.member_id, member.instance_id, member.client_id, member.client_host, member.member_epoch,
        list(member.subscribed_topic_names), member.subscribed_topic_regex,
        sorted(partitions_from_pb(member.assignment)), sorted(partitions_from_pb(member.target_assignment)))


def by_topic(tps: Iterable[TopicPartition]) -> dict[str, list[TopicPartition]]:
    grouped: dict[str, list[TopicPartition]] = {}
    for tp in tps:
        grouped.setdefault(tp.topic, []).append(tp)
    return grouped


def described_partitions(described: pb.GroupDescription) -> list[TopicPartition]:
    """The partitions a description covers: those with a committed offset and those a member owns."""
    tps = {TopicPartition(o.topic, o.partition) for o in described.offsets}
    for member in described.members:
        tps |= partitions_from_pb(member.assignment)
    return sorted(tps)


def group_description(described: pb.GroupDescription,
                      log_ends: Mapping[TopicPartition, int | None]) -> GroupDescription:
    """The group with lag per partition: the log end (high watermark) minus the committed offset."""
    members = [member_description(m) for m in described.members]
    owners = {tp: m.member_id for m in members for tp in m.partitions}
    committed = {TopicPartition(o.topic, o.partition): o for o in described.offsets}
    rows = []
    for tp in described_partitions(described):
        offset = committed.get(tp)
        position = offset.offset if offset is not None and offset.offset >= 0 else None
        log_end = log_ends.get(tp)
        lag = None if position is None or log_end is None else max(0, log_end - position)
        rows.append(PartitionLag(tp.topic, tp.partition, position, log_end, lag, owners.get(tp),
                                 offset.metadata if offset is not None else ""))
    return GroupDescription(described.group_id, described.state, described.group_epoch, described.assignor,
                            described.coordinator_id, members, rows)


# ------------------------------------------------------------------------------------- reset


@dataclass(frozen=True)
class ResetSpec:
    """Where reset_offsets moves a group's committed offsets: exactly one of these."""

    to_earliest: bool = False
    to_latest: bool = False
    to_offset: int | None = None
    to_datetime_ms: int | None = None
    shift_by: int | None = None

    def __post_init__(self) -> None:
        chosen = [self.to_earliest, self.to_latest, self.to_offset is not None, self.to_datetime_ms is not None,
                  self.shift_by is not None]
        if sum(chosen) != 1:
            raise ValueError("say where to reset to with exactly one of to_earliest, to_latest, to_offset, "
                             "to_datetime or shift_by")
        if self.to_offset is not None and self.to_offset < 0:
            raise ValueError(f"to_offset must be 0 or more, got {self.to_offset}")
        if self.to_datetime_ms is not None and self.to_datetime_ms < 0:
            raise ValueError("to_datetime must not be before 1970-01-01")

    @classmethod
    def of(cls, *, to_earliest: bool = False, to_latest: bool = False, to_offset: int | None = None,
           to_datetime: datetime | int | None = None, shift_by: int | None = None) -> ResetSpec:
        return cls(to_earliest, to_latest, to_offset, datetime_ms(to_datetime), shift_by)


def datetime_ms(moment: datetime | int | None) -> int | None:
    """Milliseconds since the epoch from a datetime (naive means UTC) or from ms already."""
    if moment is None or isinstance(moment, int):
        return moment
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def refuse_live_group(described: pb.GroupDescription) -> None:
    """Resetting offsets under running members would be undone by their next commit: Kafka refuses, so do we."""
    if not described.members:
        return
    who = ", ".join(sorted({m.client_id or m.member_id for m in described.members}))
    raise NonEmptyGroupError(
        f"group {described.group_id!r} has {len(described.members)} live member(s) ({who}); offsets can be reset "
        "only while the group is empty: stop its consumers (or wait for their session to time out), then retry")


def plan_reset(spec: ResetSpec, partitions: Sequence[TopicPartition], committed: Mapping[TopicPartition, int],
               earliest: Mapping[TopicPartition, int], latest: Mapping[TopicPartition, int],
               by_time: Mapping[TopicPartition, int] | None = None) -> list[OffsetChange]:
    """The new committed offset of each partition, kept within the log (earliest..latest), as Kafka does."""
    changes = []
    for tp in partitions:
        low, high = earliest[tp], latest[tp]
        previous = committed.get(tp)
        wanted = _wanted_offset(spec, tp, previous, low, high, by_time or {})
        changes.append(OffsetChange(tp.topic, tp.partition, previous, min(max(wanted, low), high)))
    return changes


def _wanted_offset(spec: ResetSpec, tp: TopicPartition, previous: int | None, low: int, high: int,
                   by_time: Mapping[TopicPartition, int]) -> int:
    if spec.to_earliest:
        return low
    if spec.to_latest:
        return high
    if spec.to_offset is not None:
        return spec.to_offset
    if spec.to_datetime_ms is not None:
        found = by_time.get(tp, -1)
        return high if found < 0 else found  # nothing at or after that time: the end
    assert spec.shift_by is not None
    if previous is None:
        raise LogbrokerError(f"{tp.topic}-{tp.partition} has no committed offset to shift; reset it with "
                             "--to-earliest, --to-latest or --to-offset first")
    return previous + spec.shift_by
