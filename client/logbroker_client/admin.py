"""Admin: create, delete, list and describe topics; list, describe, delete consumer groups and reset their
offsets; read and change group configs; describe share groups (queues) (synchronous)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import grpc

from logbroker_client.connection import DEFAULT_REQUEST_TIMEOUT_MS, translate_rpc_error
from logbroker_client.consumer import list_offsets
from logbroker_client.coordinator import Coordinators
from logbroker_client.errors import (
    BrokerUnavailableError,
    GroupIdNotFoundError,
    InvalidGroupConfigError,
    InvalidRequestError,
    LogbrokerError,
    RequestTimedOutError,
    TopicAlreadyExistsError,
    error_for,
)
from logbroker_client.fetch_state import EARLIEST, LATEST
from logbroker_client.group_member import SIMPLE_MEMBER_EPOCH, commit_entries, partitions_to_pb
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
from logbroker_client.metadata import DOWN, RETRY_BACKOFF_S, ClusterMetadata
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.share import subscription_lanes
from logbroker_client.types import (
    GroupDescription,
    GroupListing,
    OffsetChange,
    PartitionInfo,
    ReplicaView,
    ShareGroupDescription,
    SharePartitionStatus,
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
                         offline=not online, target_replicas=list(p.target_replicas), voters=list(p.voters),
                         learners=list(p.learners))


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


def raise_answer_error(response: Any, topic: str | None) -> None:
    if response.error_code:
        raise error_for(response.error_code, response.error_message, topic)


def raise_described_errors(topics: Sequence[pb.TopicDescription]) -> None:
    for described in topics:
        if described.error_code:
            raise error_for(described.error_code, described.error_message, described.name)


def alter_topic_configs_request(name: str, configs: Mapping[str, object] | None, delete: Sequence[str],
                                validate_only: bool, timeout_s: float) -> pb.AlterTopicConfigsRequest:
    return pb.AlterTopicConfigsRequest(topic=name, configs={k: str(v) for k, v in (configs or {}).items()},
                                       delete_configs=list(delete), validate_only=validate_only,
                                       timeout_ms=int(timeout_s * 1000))


def add_partitions_request(name: str, total: int, timeout_s: float) -> pb.CreatePartitionsRequest:
    return pb.CreatePartitionsRequest(topic=name, total=total, timeout_ms=int(timeout_s * 1000))


def move_replicas_request(name: str, partition: int, replicas: Sequence[int],
                          timeout_s: float) -> pb.MoveReplicasRequest:
    target = pb.PartitionTarget(topic=name, partition=partition, replicas=list(replicas))
    return pb.MoveReplicasRequest(targets=[target], drain_broker=-1, timeout_ms=int(timeout_s * 1000))


def drain_request(broker_id: int, timeout_s: float) -> pb.MoveReplicasRequest:
    return pb.MoveReplicasRequest(drain_broker=broker_id, timeout_ms=int(timeout_s * 1000))


def drained_targets(response: pb.MoveReplicasResponse) -> dict[TopicPartition, list[int]]:
    return {TopicPartition(m.topic, m.partition): list(m.replicas) for m in response.moves}


def group_configs_request(group_id: str, configs: Mapping[str, object]) -> pb.AlterGroupConfigsRequest:
    """Values as text; an empty value puts a key back to its default."""
    for key in configs:
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"group config keys are names such as share.record.lock.duration.ms, got {key!r}")
    return pb.AlterGroupConfigsRequest(group_id=check_group_id(group_id),
                                       configs={key.strip(): str(value) for key, value in configs.items()})


def check_group_configs_answer(response: Any) -> None:
    """The broker says INVALID_REQUEST for a bad key or value: that is an invalid group config."""
    if not response.error_code:
        return
    error = error_for(response.error_code, response.error_message)
    if type(error) is InvalidRequestError:
        raise InvalidGroupConfigError(f"{error}; `lb group config GROUP` lists the keys and their values") from None
    raise error


def share_status(described: pb.SharePartitionDescription) -> SharePartitionStatus:
    return SharePartitionStatus(described.topic, described.partition, described.start_offset, described.available,
                                described.in_flight, described.delayed, described.oldest_available_age_ms,
                                described.dead_lettered, dict(described.in_flight_by_member))


def share_describe_requests(group_id: str, leaders: Mapping[TopicPartition, str]
                            ) -> dict[str, pb.DescribeSharePartitionsRequest]:
    """One DescribeSharePartitions per leader: share state lives on each partition's leader."""
    by_leader: dict[str, list[TopicPartition]] = {}
    for tp, address in leaders.items():
        by_leader.setdefault(address, []).append(tp)
    return {address: pb.DescribeSharePartitionsRequest(group_id=group_id, partitions=partitions_to_pb(tps))
            for address, tps in by_leader.items()}


def take_share_statuses(response: pb.DescribeSharePartitionsResponse, found: dict[TopicPartition, SharePartitionStatus]
                        ) -> set[str]:
    """Add the answered partitions to found; returns the topics whose leader moved (ask again). Raises the
    errors that waiting does not cure."""
    moved = set()
    for described in response.partitions:
        if described.error_code:
            error = error_for(described.error_code, described.error_message, described.topic, described.partition)
            if not error.retriable:
                raise error
            moved.add(described.topic)
            continue
        found[TopicPartition(described.topic, described.partition)] = share_status(described)
    return moved


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

    def alter_topic_configs(self, name: str, configs: Mapping[str, object] | None = None,
                            delete: Sequence[str] = (), validate_only: bool = False) -> dict[str, str]:
        """Set topic configs (retention.ms, segment.bytes, ...) and put others back to the broker default; every
        broker applies them to the topic's open logs at once. Refused whole (InvalidConfigError naming the key
        or value) when any is wrong. Returns the topic's overrides after the change."""
        request = alter_topic_configs_request(name, configs, delete, validate_only, self._timeout_s)
        response = self._call("AlterTopicConfigs", request, lambda answer: raise_answer_error(answer, name))
        return dict(response.configs)

    def add_partitions(self, name: str, total: int) -> None:
        """Grow a topic to ``total`` partitions (never fewer); producers and consumers see the new ones at their
        next metadata refresh, and consumer groups subscribed to the topic rebalance onto them."""
        self._call("CreatePartitions", add_partitions_request(name, total, self._timeout_s),
                   lambda answer: raise_answer_error(answer, name))

    def move_replicas(self, name: str, partition: int, replicas: Sequence[int]) -> None:
        """Start moving a partition's replicas to ``replicas`` (the first is the preferred leader). Returns once
        the controller has recorded the target; the partition's leader then adds, catches up and promotes
        the new replicas and removes the old ones. Follow it with describe_topics() (target_replicas empty and
        replicas equal to the target once done)."""
        self._call("MoveReplicas", move_replicas_request(name, partition, replicas, self._timeout_s),
                   lambda answer: raise_answer_error(answer, name))

    def drain_broker(self, broker_id: int) -> dict[TopicPartition, list[int]]:
        """Start moving every replica off a broker; returns the target the controller chose for each partition."""
        response = self._call("MoveReplicas", drain_request(broker_id, self._timeout_s),
                              lambda answer: raise_answer_error(answer, None))
        return drained_targets(response)

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

    def replica_views(self, topic: str, partition: int, nodes: Iterable[int]) -> dict[int, ReplicaView]:
        """Each named broker's own replica of the partition, asked of that broker alone: why a partition whose
        replicas answer has no leader shows here (catching_up). Brokers that do not answer, or hold no replica
        of it, are left out."""
        addresses = self._metadata.brokers()
        views: dict[int, ReplicaView] = {}
        for node in nodes:
            if node not in addresses:
                continue
            request = pb.DescribeTopicsRequest(names=[topic], local_only=True)
            try:
                answer = self._metadata.connection(addresses[node]).admin.DescribeTopics(
                    request, timeout=DESCRIBE_ATTEMPT_TIMEOUT_S)
            except grpc.RpcError:
                continue
            if not answer.topics or answer.topics[0].error_code or partition >= len(answer.topics[0].partitions):
                continue
            part = answer.topics[0].partitions[partition]
            if part.local_replica:
                views[node] = ReplicaView(node, part.leader_id, part.log_end_offset, part.high_watermark,
                                          part.catching_up, part.leader_since_ms)
        return views

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

    # ---------------------------------------------------------------------------- group configs

    def alter_group_configs(self, group_id: str, configs: Mapping[str, object]) -> None:
        """Change a group's configs (share.record.lock.duration.ms, share.delivery.count.limit, share.retry.backoff,
        share.retry.backoff.ms, share.retry.backoff.max.ms, share.auto.offset.reset, share.dlq.topic,
        share.ordering: none or key); an empty
        value puts a key back to its default. A bad key or value raises InvalidGroupConfigError."""
        self._call("AlterGroupConfigs", group_configs_request(group_id, configs), check_group_configs_answer)

    def describe_group_configs(self, group_id: str) -> dict[str, str]:
        """Every config of the group, defaults included."""
        response = self._call("DescribeGroupConfigs", pb.DescribeGroupConfigsRequest(group_id=check_group_id(group_id)),
                              check_group_configs_answer)
        return dict(sorted(response.configs.items()))

    # ----------------------------------------------------------------------------- share groups

    def describe_share_group(self, group_id: str, topics: Sequence[str] | str, *,
                             priorities: int = 1) -> ShareGroupDescription:
        """The queue as the share group sees it, per partition of the topics (and of their priority lanes, with
        priorities > 1): available records (queue depth), in flight, delayed, the oldest available record's age,
        dead-lettered, and in flight per member. A partition the group never read shows zeros."""
        group_id = check_group_id(group_id)
        tps = [TopicPartition(topic, p) for topic, _ in subscription_lanes(topics, priorities)
               for p in range(self._metadata.partitions_for(topic))]
        found: dict[TopicPartition, SharePartitionStatus] = {}
        deadline = time.monotonic() + self._timeout_s
        while len(found) < len(tps):
            leaders = {tp: self._metadata.leader_connection(*tp).address for tp in tps if tp not in found}
            for address, request in share_describe_requests(group_id, leaders).items():
                for topic in self._describe_share_at(address, request, found):
                    self._metadata.invalidate(topic)
            if len(found) < len(tps):
                if time.monotonic() > deadline:
                    raise RequestTimedOutError(f"share group {group_id!r}: the partitions' leaders did not answer "
                                               f"within {self._timeout_s:g}s; retry")
                time.sleep(RETRY_BACKOFF_S)
        return ShareGroupDescription(group_id, [found[tp] for tp in tps])

    def _describe_share_at(self, address: str, request: pb.DescribeSharePartitionsRequest,
                           found: dict[TopicPartition, SharePartitionStatus]) -> set[str]:
        try:
            share = self._metadata.connection(address).share
            response = share.DescribeSharePartitions(request, timeout=self._timeout_s)
        except grpc.RpcError as exc:
            error = translate_rpc_error(exc, address)
            if not error.retriable:
                raise error from None
            if isinstance(error, BrokerUnavailableError):
                self._metadata.mark_unreachable(address)
            return {item.topic for item in request.partitions}
        return take_share_statuses(response, found)

    def close(self) -> None:
        self._metadata.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
