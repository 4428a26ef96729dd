"""ApiVersions, Metadata and DescribeCluster: what a client asks before anything else."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from kio.schema.errors import ErrorCode

from logbroker.groups.coordinator import OFFSETS_TOPIC
from logbroker.kafka.context import Context
from logbroker.kafka.errors import kafka_error
from logbroker.kafka.topics import create_topics
from logbroker.kafka.versions import APIS, api, make, nested, response_class
from logbroker.server.topic_view import partition_views

log = logging.getLogger("logbroker.kafka")

AUTO_CREATE_TIMEOUT_S = 10.0


def _api_keys(cls: type) -> tuple[Any, ...]:
    entry = nested(cls, "ApiVersion")
    return tuple(make(entry, api_key=a.key, min_version=a.min_version, max_version=a.max_version)
                 for a in sorted(APIS.values(), key=lambda a: a.key))


def unsupported_api_versions() -> Any:
    """ApiVersions v0 with UNSUPPORTED_VERSION and our ranges: the answer to a too-new ApiVersions."""
    cls = response_class(18, 0)
    return make(cls, error_code=ErrorCode.unsupported_version, api_keys=_api_keys(cls))


@api(18, "ApiVersions", 0, 4)
async def api_versions(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(18, version)
    return make(cls, error_code=ErrorCode.none, api_keys=_api_keys(cls), throttle_time=0)


def _brokers(ctx: Context, cls: type) -> tuple[Any, ...]:
    entry = nested(cls, "MetadataResponseBroker")
    out = []
    for node in sorted(ctx.broker.peers):
        host, port = ctx.kafka_address(node)
        out.append(make(entry, node_id=node, host=host, port=port, rack=None))
    return tuple(out)


def _controller_id(ctx: Context) -> int:
    return ctx.broker.controller_client.controller_id()


def topic_description(ctx: Context, cls: type, name: str) -> Any:
    """One MetadataResponseTopic: every partition's leader, replicas and in-sync replicas."""
    topic_cls = nested(cls, "MetadataResponseTopic")
    part_cls = nested(cls, "MetadataResponsePartition")
    broker = ctx.broker
    try:
        spec = broker.controller_client.topic(name)
    except Exception as exc:
        code, _ = kafka_error(exc, name)
        return make(topic_cls, error_code=code, name=name, topic_id=None, is_internal=False, partitions=(),
                    topic_authorized_operations=-2147483648)
    partitions = []
    for view in partition_views(broker, spec):
        leader = view.leader
        live = [node for node in view.replicas if broker.liveness.is_alive(node)]
        partitions.append(make(
            part_cls, error_code=ErrorCode.none if leader is not None else ErrorCode.leader_not_available,
            partition_index=view.partition, leader_id=leader if leader is not None else -1,
            # The leader epoch (the Raft term) lets clients fence their fetches and, after a leader change, ask
            # OffsetForLeaderEpoch whether their position survived (KIP-320; handlers/epochs.py).
            leader_epoch=_leader_epoch(broker, name, view.partition, view.replica), replica_nodes=tuple(view.replicas),
            isr_nodes=tuple(view.isr), offline_replicas=tuple(n for n in view.replicas if n not in live)))
    return make(topic_cls, error_code=ErrorCode.none, name=name, topic_id=_topic_uuid(spec.topic_id),
                is_internal=name.startswith("__"), partitions=tuple(partitions),
                topic_authorized_operations=-2147483648)


def _leader_epoch(broker: Any, name: str, index: int, replica: Any) -> int:
    """This broker's replica's term (it has heard from the leader of that term, or is it), else the epoch the
    leader reported to the controller; -1 when neither is known."""
    if replica is not None and not replica.closed:
        return int(replica.term)
    reported = broker.cluster.leaders.get((name, index))
    return int(reported[1]) if reported is not None else -1


def _topic_uuid(topic_id: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(hex=topic_id)
    except ValueError:
        return None


@api(3, "Metadata", 0, 12)
async def metadata(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(3, version)
    broker = ctx.broker
    if request.topics is None or (version == 0 and not request.topics):
        names = [t.name for t in broker.controller_client.topics()]
    else:
        names = [t.name for t in request.topics if t.name is not None]
        allow = getattr(request, "allow_auto_topic_creation", True)
        missing = [n for n in names if n not in broker.cluster.topics and n != OFFSETS_TOPIC]
        if missing and allow and ctx.settings.auto_create_topics:
            await _auto_create(ctx, missing)
    return make(cls, throttle_time=0, brokers=_brokers(ctx, cls), cluster_id=ctx.settings.cluster_id,
                controller_id=_controller_id(ctx), topics=tuple(topic_description(ctx, cls, n) for n in names),
                cluster_authorized_operations=-2147483648)


async def _auto_create(ctx: Context, names: list[str]) -> None:
    """Topic auto-creation (the broker setting kafka_auto_create_topics): broker defaults for partitions and
    replication; a failure is left for the Metadata answer to show as UNKNOWN_TOPIC_OR_PARTITION."""
    try:
        results = await asyncio.wait_for(
            create_topics(ctx.broker, [(n, -1, -1, {}) for n in names], False, AUTO_CREATE_TIMEOUT_S),
            AUTO_CREATE_TIMEOUT_S)
    except Exception as exc:
        log.info("auto-creating %s failed: %s", names, exc)
        return
    for name, problem in results.items():
        if problem is not None and problem[0] != ErrorCode.topic_already_exists:
            log.info("auto-creating topic %r failed: %s", name, problem[1])


@api(60, "DescribeCluster", 0, 1)
async def describe_cluster(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(60, version)
    entry = nested(cls, "DescribeClusterBroker")
    brokers = []
    for node in sorted(ctx.broker.peers):
        host, port = ctx.kafka_address(node)
        brokers.append(make(entry, broker_id=node, host=host, port=port, rack=None, is_fenced=False))
    return make(cls, throttle_time=0, error_code=ErrorCode.none, error_message=None, endpoint_type=1,
                cluster_id=ctx.settings.cluster_id, controller_id=_controller_id(ctx), brokers=tuple(brokers),
                cluster_authorized_operations=-2147483648)
