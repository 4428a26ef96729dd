"""Admin: create, delete, list and describe topics; list, describe, delete consumer groups and reset their
offsets (synchronous)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from logbroker_client.connection import DEFAULT_REQUEST_TIMEOUT_MS
from logbroker_client.consumer import list_offsets
from logbroker_client.coordinator import Coordinators
from logbroker_client.errors import GroupIdNotFoundError, LogbrokerError, TopicAlreadyExistsError, error_for
from logbroker_client.fetch_state import EARLIEST, LATEST
from logbroker_client.group_member import SIMPLE_MEMBER_EPOCH, commit_entries
from logbroker_client.groups import (
    ResetSpec,
    by_topic,
    check_group_id,
    committed_offsets,
    delete_error,
    describe_error,
    described_partitions,
    fetch_offsets_request,
    group_description,
    group_listings,
    plan_reset,
    refuse_live_group,
)
from logbroker_client.metadata import DOWN, ClusterMetadata
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.types import (
    GroupDescription,
    GroupListing,
    OffsetChange,
    PartitionInfo,
    TopicDescription,
    TopicPartition,
)

# DescribeTopics asks each partition's leader for 5 s at most; a broker slower than this is stuck, ask another.
DESCRIBE_ATTEMPT_TIMEOUT_S = 7.0


def partition_info(p: pb.PartitionDescription, states: Mapping[int, str] | None) -> PartitionInfo:
    """A partition as described, corrected by which brokers answer now: a leader that is down leads nothing
    (the partition is offline), and a replica that is down is not in sync."""
    def up(node: int) -> bool:
        return states is None or states.get(node, DOWN) != DOWN

    online = p.leader_id >= 0 and up(p.leader_id)
    return PartitionInfo(p.partition, p.leader_id if online else -1, list(p.replicas),
                         [node for node in p.isr if up(node)], p.log_start_offset, p.high_watermark, p.size_bytes,
                         offline=not online)


def topic_description(described: pb.TopicDescription, states: Mapping[int, str] | None = None) -> TopicDescription:
    return TopicDescription(
        name=described.name,
        replication_factor=described.replication_factor,
        configs=dict(described.configs),
        partitions=[partition_info(p, states) for p in described.partitions],
    )


def raise_topic_errors(results: Sequence[pb.TopicResult]) -> None:
    for result in results:
        if result.error_code:
            raise error_for(result.error_code, result.error_message, result.name)


def raise_described_errors(topics: Sequence[pb.TopicDescription]) -> None:
    for described in topics:
        if described.error_code:
            raise error_for(described.error_code, described.error_message, described.name)


class RetryNote:
    """Remembers that an attempt failed retriably: a create retried after the controller moved may find the
    topic made by its own first attempt, and the error should say so."""

    def __init__(self, check: Callable[[Any], None]) -> None:
        self._check = check
        self.retried = False

    def __call__(self, response: Any) -> None:
        try:
            self._check(response)
        except LogbrokerError as exc:
            self.retried = self.retried or exc.retriable
            raise

    def explain(self, exc: LogbrokerError) -> LogbrokerError:
        if self.retried and isinstance(exc, TopicAlreadyExistsError):
            return TopicAlreadyExistsError(f"{exc} (an earlier attempt of this request, answered while the "
                                           "controller moved, may have created it)", exc.topic)
        return exc


class Admin:
    def __init__(self, bootstrap: str | Sequence[str] | None = None,
                 request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS) -> None:
        self._metadata = ClusterMetadata(bootstrap, request_timeout_ms)
        self._timeout_s = request_timeout_ms / 1000
        self._coordinators = Coordinators(self._metadata)

    def _call(self, method: str, request: object, check: Callable[[Any], None] | None = None,
              attempt_timeout_s: float | None = None) -> Any:
        """Any broker answers admin requests (it forwards changes to the controller): try each in turn, and
        again while the controller is moving."""
        return self._metadata.call(method, request, admin=True, check=check, attempt_timeout_s=attempt_timeout_s)

    def create_topic(self, name: str, partitions: int = 0, replication_factor: int = 0,
                     configs: Mapping[str, str] | None = None, validate_only: bool = False) -> None:
        topic = pb.NewTopic(name=name, partitions=partitions, replication_factor=replication_factor,
                            configs=dict(configs or {}))
        note = RetryNote(lambda response: raise_topic_errors(response.results))
        try:
            self._call("CreateTopics", pb.CreateTopicsRequest(
                topics=[topic], timeout_ms=int(self._timeout_s * 1000), validate_only=validate_only), note)
        except LogbrokerError as exc:
            raise note.explain(exc) from None

    def delete_topic(self, name: str) -> None:
        self._call("DeleteTopics", pb.DeleteTopicsRequest(names=[name]),
                   lambda response: raise_topic_errors(response.results))

    def list_topics(self) -> list[str]:
        response = self._call("DescribeTopics", pb.DescribeTopicsRequest(),
                              attempt_timeout_s=DESCRIBE_ATTEMPT_TIMEOUT_S)
        return sorted(t.name for t in response.topics)

    def describe_topics(self, names: Sequence[str] = (), *,
                        broker_states: Mapping[int, str] | None = None) -> list[TopicDescription]:
        """Partitions with leaders, replicas and offsets. A partition whose leader does not answer is offline
        (leader_id -1, offline=True); pass broker_states (from broker_states()) to skip asking each broker."""
        response = self._call("DescribeTopics", pb.DescribeTopicsRequest(names=list(names)),
                              lambda answer: raise_described_errors(answer.topics), DESCRIBE_ATTEMPT_TIMEOUT_S)
        states = self.broker_states() if broker_states is None else broker_states
        return [topic_description(t, states) for t in response.topics]

    def describe_cluster(self) -> pb.MetadataResponse:
        return self._metadata.refresh()

    def broker_addresses(self) -> dict[int, str]:
        """node id -> HOST:PORT of every broker in the cluster."""
        return self._metadata.brokers()

    def broker_states(self) -> dict[int, str]:
        """node id -> "up", "not ready" (running, but starting or without a controller majority), "no answer"
        (nothing within 2 s: paused, overloaded or cut off) or "down" (refuses connections),
        each asked of the broker's own gRPC health service with a short timeout."""
        return self._metadata.broker_states()

    # ------------------------------------------------------------------------------- consumer groups

    def list_groups(self) -> list[GroupListing]:
        """Every consumer group of the cluster (any broker answers for all), sorted by id."""
        return group_listings(self._metadata.call("ListGroups", pb.ListGroupsRequest(), service="groups"))

    def describe_groups(self, group_ids: Sequence[str]) -> list[GroupDescription]:
        """State, members (client id, host, partitions), and per partition the committed offset, the log end
        and the lag. A group that does not exist raises GroupIdNotFoundError."""
        return [self._describe_with_lag(check_group_id(group_id)) for group_id in group_ids]

    def _describe_with_lag(self, group_id: str) -> GroupDescription:
        described = self._describe(group_id)
        return group_description(described, self._log_ends(described_partitions(described)))

    def _describe(self, group_id: str) -> pb.GroupDescription:
        response = self._coordinators.call(group_id, "DescribeGroups", pb.DescribeGroupsRequest(group_ids=[group_id]),
                                           errors=describe_error)
        return response.groups[0]

    def _log_ends(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        """High watermarks, topic by topic: a topic that cannot be asked (deleted, offline) shows as unknown."""
        out: dict[TopicPartition, int | None] = {}
        for partitions in by_topic(tps).values():
            try:
                found = self._offsets_at(partitions, LATEST)
            except LogbrokerError:
                found = {}
            out.update({tp: found.get(tp) for tp in partitions})
        return out

    def _offsets_at(self, tps: Sequence[TopicPartition], timestamp_ms: int) -> dict[TopicPartition, int]:
        """ListOffsets: EARLIEST, LATEST, or the first offset at or after a time (-1: none)."""
        found = list_offsets(self._metadata, {tp: timestamp_ms for tp in tps}, self._timeout_s)
        return {tp: offset for tp, (offset, _) in found.items()}

    def delete_groups(self, group_ids: Sequence[str]) -> None:
        """Delete groups and their committed offsets; refused (NonEmptyGroupError) while a group has members."""
        for group_id in group_ids:
            self._coordinators.call(check_group_id(group_id), "DeleteGroups",
                                    pb.DeleteGroupsRequest(group_ids=[group_id]), errors=delete_error)

    def reset_offsets(self, group_id: str, topic: str, *, to_earliest: bool = False, to_latest: bool = False,
                      to_offset: int | None = None, to_datetime: datetime | int | None = None,
                      shift_by: int | None = None, partitions: Sequence[int] | None = None,
                      dry_run: bool = False) -> list[OffsetChange]:
        """Move the group's committed offsets of a topic (all its partitions, or those named) so that its
        consumers start there next time; to_datetime takes a datetime (naive: UTC) or ms since the epoch.
        Offsets stay within each partition's log. Refused while the group has live members. With dry_run,
        returns the plan and commits nothing."""
        spec = ResetSpec.of(to_earliest=to_earliest, to_latest=to_latest, to_offset=to_offset,
                            to_datetime=to_datetime, shift_by=shift_by)
        self._refuse_live_group(check_group_id(group_id))
        tps = self._topic_partitions(topic, partitions)
        committed = {tp: found.offset for tp, found in committed_offsets(self._coordinators.call(
            group_id, "FetchOffsets", fetch_offsets_request(group_id, tps))).items()}
        by_time = {} if spec.to_datetime_ms is None else self._offsets_at(tps, spec.to_datetime_ms)
        changes = plan_reset(spec, tps, committed, self._offsets_at(tps, EARLIEST), self._offsets_at(tps, LATEST),
                             by_time)
        if not dry_run:
            request = pb.CommitOffsetsRequest(group_id=group_id, member_id="", member_epoch=SIMPLE_MEMBER_EPOCH,
                                              offsets=commit_entries({TopicPartition(c.topic, c.partition): c.new
                                                                      for c in changes}))
            self._coordinators.call(group_id, "CommitOffsets", request)
        return changes

    def _refuse_live_group(self, group_id: str) -> None:
        with contextlib.suppress(GroupIdNotFoundError):  # no member and no offset yet: the reset creates them
            refuse_live_group(self._describe(group_id))

    def _topic_partitions(self, topic: str, partitions: Sequence[int] | None) -> list[TopicPartition]:
        count = self._metadata.partitions_for(topic)
        chosen = list(range(count)) if partitions is None else list(dict.fromkeys(partitions))
        for partition in chosen:
            if not 0 <= partition < count:
                raise error_for(pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                                f"topic {topic!r} has partitions 0..{count - 1}; partition {partition} does not "
                                "exist", topic, partition)
        return [TopicPartition(topic, p) for p in chosen]

    def close(self) -> None:
        self._metadata.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
