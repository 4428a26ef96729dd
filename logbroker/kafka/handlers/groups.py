"""Consumer groups on the Kafka port: FindCoordinator, the classic protocol (JoinGroup, SyncGroup, Heartbeat,
LeaveGroup, with client-side assignors), OffsetCommit, OffsetFetch, ListGroups, DescribeGroups, DeleteGroups.

Every request runs on the group's coordinator shard through the same runtime as the gRPC groups (so the
committed offsets are one table); the classic membership lives in logbroker.groups.classic. A JoinGroup
or SyncGroup that must wait for other members is parked in the shard and polled here until answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kio.schema.errors import ErrorCode
from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.groups.classic import STABLE, ClassicGroups, MemberIdRequired, RebalanceInProgress, UnknownMemberId
from logbroker.groups.errors import GroupError
from logbroker.kafka.context import Context
from logbroker.kafka.errors import kafka_error
from logbroker.kafka.versions import api, make, nested, response_class
from logbroker.server.forwarding import forward_find_coordinator

log = logging.getLogger("logbroker.kafka")

T = TypeVar("T")
FORWARD_TIMEOUT_S = 10.0
POLL_S = 0.02
GROUP_KEY_TYPE = 0
KIP848_STATES = {"empty": "Empty", "assigning": "PreparingRebalance", "reconciling": "CompletingRebalance",
                 "stable": "Stable"}


# ---------------------------------------------------------------------------------- coordinator

async def _ensure_offsets_topic(ctx: Context) -> None:
    """__consumer_offsets is made on first use, by the controller leader (asked over gRPC from elsewhere)."""
    controller_client = ctx.broker.controller_client
    if await controller_client.ensure_offsets_topic(FORWARD_TIMEOUT_S) or ctx.groups.offsets_partitions() is not None:
        return
    if await forward_find_coordinator(ctx.broker, pb.FindCoordinatorRequest(group_ids=["-"]),
                                      FORWARD_TIMEOUT_S) is None:
        return
    await controller_client.wait_for_metadata(lambda: ctx.groups.offsets_partitions() is not None, FORWARD_TIMEOUT_S)


def _find(ctx: Context, key: str, key_type: int) -> tuple[ErrorCode, str | None, int, str, int]:
    if key_type != GROUP_KEY_TYPE:
        return (ErrorCode.coordinator_not_available, "only group coordinators exist here (no transactions)",
                -1, "", -1)
    try:
        found = ctx.groups.find_coordinator(key)
    except Exception as exc:
        code, message = kafka_error(exc, f"group {key!r}")
        return code, message, -1, "", -1
    host, port = ctx.kafka_address(found.node_id)
    return ErrorCode.none, None, found.node_id, host, port


@api(10, "FindCoordinator", 0, 4)
async def find_coordinator(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(10, version)
    await _ensure_offsets_topic(ctx)
    key_type = getattr(request, "key_type", GROUP_KEY_TYPE)
    if version >= 4:
        entry = nested(cls, "Coordinator")
        coordinators = []
        for key in request.coordinator_keys:
            code, message, node, host, port = _find(ctx, key, key_type)
            coordinators.append(make(entry, key=key, node_id=node, host=host, port=port, error_code=code,
                                     error_message=message))
        return make(cls, throttle_time=0, coordinators=tuple(coordinators))
    code, message, node, host, port = _find(ctx, request.key, key_type)
    return make(cls, throttle_time=0, error_code=code, error_message=message, node_id=node, host=host, port=port)


async def _on_shard(ctx: Context, group_id: str, operation: Callable[[Any], tuple[T, list[Any]]]) -> T:
    """Run an operation on the group's coordinator shard; answered once its records are committed."""
    return await ctx.groups.runtime_for(group_id).run(operation)


def _classic(ctx: Context, group_id: str) -> ClassicGroups:
    return ctx.groups.runtime_for(group_id).shard.classic  # type: ignore[no-any-return]


async def _poll(ctx: Context, group_id: str, check: Callable[[ClassicGroups], T | None], timeout_s: float) -> T:
    """Wait for a parked answer; the coordinator moving away ends the wait with its error."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check(_classic(ctx, group_id))
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise RebalanceInProgress(f"group {group_id!r}: the rebalance did not complete within "
                                      f"{timeout_s:.0f}s; join again")
        await asyncio.sleep(POLL_S)


# ------------------------------------------------------------------------------- classic protocol

@api(11, "JoinGroup", 0, 7)
async def join_group(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(11, version)
    member_cls = nested(cls, "JoinGroupResponseMember")
    session_ms = int(request.session_timeout.total_seconds() * 1000)
    rebalance = getattr(request, "rebalance_timeout", None)
    rebalance_ms = int(rebalance.total_seconds() * 1000) if rebalance is not None else session_ms
    instance_id = getattr(request, "group_instance_id", None) or ""
    protocols = [(p.name, bytes(p.metadata)) for p in request.protocols]
    group_id = request.group_id
    member_id = request.member_id

    def failed(code: ErrorCode, member: str = "") -> Any:
        return make(cls, throttle_time=0, error_code=code, generation_id=-1, protocol_type=None,
                    protocol_name=None if version >= 7 else "", leader="", member_id=member, members=())
    try:
        def join(shard: Any) -> tuple[Any, list[Any]]:
            other = len(shard.groups[group_id].members) if group_id in shard.groups else 0
            return shard.classic.join(group_id, member_id, instance_id, request.protocol_type, protocols,
                                      session_ms, rebalance_ms, ctx.client_id, ctx.client_host,
                                      require_known_member_id=version >= 4, other_protocol_members=other), []
        result, member_id = await _on_shard(ctx, group_id, join)
        if result is None:
            result = await _poll(ctx, group_id, lambda c: c.pending_join(group_id, member_id),
                                 rebalance_ms / 1000 + 5)
    except MemberIdRequired as exc:
        return failed(ErrorCode.member_id_required, exc.member_id)
    except Exception as exc:
        code, _ = kafka_error(exc, f"group {group_id!r}")
        return failed(code, member_id)
    members = tuple(make(member_cls, member_id=m, group_instance_id=i or None, metadata=meta)
                    for m, i, meta in result.members)
    return make(cls, throttle_time=0, error_code=ErrorCode.none, generation_id=result.generation,
                protocol_type=result.protocol_type, protocol_name=result.protocol, leader=result.leader,
                member_id=result.member_id, members=members)


@api(14, "SyncGroup", 0, 5)
async def sync_group(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(14, version)
    group_id, member_id, generation = request.group_id, request.member_id, request.generation_id
    assignments = {a.member_id: bytes(a.assignment) for a in request.assignments}
    try:
        assignment = await _on_shard(ctx, group_id, lambda shard: (
            shard.classic.sync(group_id, member_id, generation, assignments)))
        if assignment is None:
            classic = _classic(ctx, group_id)
            if classic.groups[group_id].leader == member_id:  # its records are committed: answer every member
                classic.sync_committed(group_id, generation)
            assignment = await _poll(ctx, group_id, lambda c: c.pending_sync(group_id, member_id, generation),
                                     FORWARD_TIMEOUT_S * 3)
        group = _classic(ctx, group_id).groups[group_id]
    except Exception as exc:
        code, _ = kafka_error(exc, f"group {group_id!r}")
        return make(cls, throttle_time=0, error_code=code, protocol_type=None, protocol_name=None, assignment=b"")
    return make(cls, throttle_time=0, error_code=ErrorCode.none, protocol_type=group.protocol_type,
                protocol_name=group.protocol, assignment=assignment)


@api(12, "Heartbeat", 0, 4)
async def heartbeat(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(12, version)
    try:
        _classic(ctx, request.group_id).heartbeat(request.group_id, request.member_id, request.generation_id)
        code = ErrorCode.none
    except Exception as exc:
        code, _ = kafka_error(exc, f"group {request.group_id!r}")
    return make(cls, throttle_time=0, error_code=code)


@api(13, "LeaveGroup", 0, 4)
async def leave_group(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(13, version)
    group_id = request.group_id
    if version >= 3:
        leaving = [(m.member_id, m.group_instance_id or "") for m in request.members]
    else:
        leaving = [(request.member_id, "")]
    try:
        unknown = await _on_shard(ctx, group_id, lambda shard: shard.classic.leave(group_id, leaving))
        code = ErrorCode.none
    except Exception as exc:
        code, _ = kafka_error(exc, f"group {group_id!r}")
        unknown = [m for m, _ in leaving]
    if version < 3 and code == ErrorCode.none and unknown:
        code = ErrorCode.unknown_member_id
    members = ()
    if version >= 3:
        entry = nested(cls, "MemberResponse")
        members = tuple(make(entry, member_id=m, group_instance_id=i or None,
                             error_code=ErrorCode.unknown_member_id if m in unknown else ErrorCode.none)
                        for m, i in leaving)
    return make(cls, throttle_time=0, error_code=code, members=members)


# ----------------------------------------------------------------------------------------- offsets

def _commit(shard: Any, group_id: str, member_id: str, generation: int,
            offsets: list[tuple[str, int, int, str]]) -> tuple[None, list[Any]]:
    """A classic member's commit is fenced by its generation; a KIP-848 member's by its epoch; one from
    outside any group (no member id, generation -1) only while the group has no member."""
    classic = shard.classic
    kip848 = shard.groups.get(group_id)
    if classic.has_members(group_id):
        if not member_id and generation < 0:
            raise UnknownMemberId(f"group {group_id!r} has live members; only they may commit")
        group, _ = classic._member(group_id, member_id, generation)
        if group.state != STABLE and member_id != group.leader and group.state == "PreparingRebalance":
            raise RebalanceInProgress(f"group {group_id!r} is rebalancing; join again, then commit")
        return None, shard.commit(group_id, "", -1, offsets)
    if kip848 is not None and kip848.members:
        return None, shard.commit(group_id, member_id, generation, offsets)
    if member_id:
        raise UnknownMemberId(f"group {group_id!r}: member {member_id} is not in the group")
    return None, shard.commit(group_id, "", -1, offsets)


@api(8, "OffsetCommit", 2, 8)
async def offset_commit(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(8, version)
    topic_cls = nested(cls, "OffsetCommitResponseTopic")
    part_cls = nested(cls, "OffsetCommitResponsePartition")
    generation = getattr(request, "generation_id_or_member_epoch", None)
    if generation is None:
        generation = request.generation_id
    offsets = [(t.name, p.partition_index, p.committed_offset, p.committed_metadata or "")
               for t in request.topics for p in t.partitions]
    try:
        await _on_shard(ctx, request.group_id,
                        lambda shard: _commit(shard, request.group_id, request.member_id, generation, offsets))
        code = ErrorCode.none
    except Exception as exc:
        code, _ = kafka_error(exc, f"group {request.group_id!r}")
    return make(cls, throttle_time=0, topics=tuple(
        make(topic_cls, name=t.name, partitions=tuple(make(part_cls, partition_index=p.partition_index,
                                                           error_code=code) for p in t.partitions))
        for t in request.topics))


def _fetch_group(ctx: Context, group_id: str, topics: Any) -> tuple[ErrorCode, dict[tuple[str, int], Any]]:
    wanted = None if topics is None else [(t.name, p) for t in topics for p in t.partition_indexes]
    try:
        found = ctx.groups.fetch_offsets(group_id, wanted)
    except Exception as exc:
        code, _ = kafka_error(exc, f"group {group_id!r}")
        return code, {}
    return ErrorCode.none, dict(found)


def _offset_topics(cls: type, names: tuple[str, str], found: dict[tuple[str, int], Any], topics: Any,
                   code: ErrorCode) -> tuple[Any, ...]:
    topic_cls, part_cls = nested(cls, names[0]), nested(cls, names[1])
    if topics is None:
        by_topic: dict[str, list[int]] = {}
        for topic, partition in sorted(found):
            by_topic.setdefault(topic, []).append(partition)
        wanted = list(by_topic.items())
    else:
        wanted = [(t.name, list(t.partition_indexes)) for t in topics]
    out = []
    for topic, partitions in wanted:
        parts = []
        for partition in partitions:
            committed = found.get((topic, partition))
            parts.append(make(part_cls, partition_index=partition,
                              committed_offset=committed.offset if committed else -1, committed_leader_epoch=-1,
                              metadata=committed.metadata if committed else "", error_code=code))
        out.append(make(topic_cls, name=topic, partitions=tuple(parts)))
    return tuple(out)


@api(9, "OffsetFetch", 1, 8)
async def offset_fetch(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(9, version)
    if version >= 8:
        group_cls = nested(cls, "OffsetFetchResponseGroup")
        groups = []
        for group in request.groups:
            code, found = _fetch_group(ctx, group.group_id, group.topics)
            groups.append(make(group_cls, group_id=group.group_id, error_code=code, topics=_offset_topics(
                cls, ("OffsetFetchResponseTopics", "OffsetFetchResponsePartitions"), found, group.topics,
                ErrorCode.none)))
        return make(cls, throttle_time=0, groups=tuple(groups))
    code, found = _fetch_group(ctx, request.group_id, request.topics)
    part_code = code if version < 2 else ErrorCode.none  # v1 has no top-level error code
    return make(cls, throttle_time=0, error_code=code, topics=_offset_topics(
        cls, ("OffsetFetchResponseTopic", "OffsetFetchResponsePartition"), found, request.topics, part_code))


# ------------------------------------------------------------------------------------ list, describe

def _local_groups(ctx: Context) -> list[tuple[str, str, str]]:
    """(group id, protocol type, state) of the groups this broker coordinates now."""
    out = {}
    for runtime in ctx.broker.group_runtimes.values():
        if not runtime.replica.is_leader:
            continue
        for group in runtime.shard.groups.values():
            if group.exists or group.offsets:
                out[group.group_id] = (group.group_id, "consumer", KIP848_STATES.get(group.state, "Stable"))
        for classic in runtime.shard.classic.groups.values():
            if classic.members or classic.generation or classic.group_id not in out:
                out[classic.group_id] = (classic.group_id, classic.protocol_type or "consumer", classic.state)
    return [out[g] for g in sorted(out)]


@api(16, "ListGroups", 0, 4)
async def list_groups(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(16, version)
    entry = nested(cls, "ListedGroup")
    wanted = {s.lower() for s in getattr(request, "states_filter", ())}
    groups = tuple(make(entry, group_id=g, protocol_type=t, group_state=s) for g, t, s in _local_groups(ctx)
                   if not wanted or s.lower() in wanted)
    return make(cls, throttle_time=0, error_code=ErrorCode.none, groups=groups)


def _describe(ctx: Context, cls: type, group_id: str) -> Any:
    group_cls, member_cls = nested(cls, "DescribedGroup"), nested(cls, "DescribedGroupMember")

    def described(code: ErrorCode, state: str = "Dead", protocol_type: str = "", protocol: str = "",
                  members: tuple[Any, ...] = ()) -> Any:
        return make(group_cls, error_code=code, group_id=group_id, group_state=state, protocol_type=protocol_type,
                    protocol_data=protocol, members=members, authorized_operations=-2147483648)
    try:
        shard = ctx.groups.runtime_for(group_id).shard
    except GroupError as exc:
        return described(kafka_error(exc)[0])
    classic = shard.classic.groups.get(group_id)
    if classic is not None and (classic.members or classic.generation):
        members = tuple(make(member_cls, member_id=m.member_id, group_instance_id=m.instance_id or None,
                             client_id=m.client_id, client_host=m.client_host,
                             member_metadata=m.metadata_for(classic.protocol), member_assignment=m.assignment)
                        for m in sorted(classic.members.values(), key=lambda m: m.member_id))
        return described(ErrorCode.none, classic.state, classic.protocol_type,
                         classic.protocol if classic.state == STABLE else "", members)
    group = shard.groups.get(group_id)
    if group is None:
        return described(ErrorCode.none)
    members = tuple(make(member_cls, member_id=m.member_id, group_instance_id=m.instance_id or None,
                         client_id=m.client_id, client_host=m.client_host, member_metadata=b"",
                         member_assignment=b"") for m in sorted(group.members.values(), key=lambda m: m.member_id))
    return described(ErrorCode.none, KIP848_STATES.get(group.state, "Stable"), "consumer", group.assignor, members)


@api(15, "DescribeGroups", 0, 5)
async def describe_groups(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(15, version)
    return make(cls, throttle_time=0, groups=tuple(_describe(ctx, cls, g) for g in request.groups))


@api(42, "DeleteGroups", 0, 2)
async def delete_groups(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(42, version)
    entry = nested(cls, "DeletableGroupResult")
    results = []
    for group_id in request.groups_names:
        try:
            await ctx.groups.delete(group_id)
            code = ErrorCode.none
        except Exception as exc:
            code, _ = kafka_error(exc, f"group {group_id!r}")
        results.append(make(entry, group_id=group_id, error_code=code))
    return make(cls, throttle_time=0, results=tuple(results))
