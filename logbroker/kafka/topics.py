"""Topic changes for the Kafka front end (create, delete, add partitions, alter configs): on the controller
leader through the broker core, elsewhere forwarded to the controller leader (broker to broker, by the same
helper as the gRPC Admin service: logbroker/server/forwarding.py), then answered once this broker has applied
the change too, so the client's next Metadata sees it."""

from __future__ import annotations

from typing import Any

from kio.schema.errors import ErrorCode
from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.kafka.errors import KAFKA_CODES, kafka_error
from logbroker.server import errors
from logbroker.server.forwarding import forward_to_controller

TopicSpec = tuple[str, int, int, dict[str, str]]  # name, partitions (-1: default), replication (-1), configs
Outcome = dict[str, tuple[ErrorCode, str] | None]  # name -> None when done, else (code, message)


def _outcome(results: Any) -> Outcome:
    return {r.name: _problem(r.error_code, r.error_message) if r.error_code else None for r in results}


def _problem(code: int, message: str) -> tuple[ErrorCode, str]:
    """A gRPC error code from the controller leader, as the Kafka code for the same failure."""
    return KAFKA_CODES.get(pb.ErrorCode.Name(code), ErrorCode.unknown_server_error), message


async def create_topics(broker: Any, specs: list[TopicSpec], validate_only: bool, timeout_s: float) -> Outcome:
    try:
        request = pb.CreateTopicsRequest(topics=[pb.NewTopic(name=n, partitions=max(p, 0),
                                                              replication_factor=max(r, 0), configs=c)
                                                 for n, p, r, c in specs],
                                         validate_only=validate_only, timeout_ms=int(timeout_s * 1000))
        forwarded = await forward_to_controller(broker, "CreateTopics", request, timeout_s)
    except errors.BrokerError as exc:
        return dict.fromkeys((s[0] for s in specs), kafka_error(exc))
    if forwarded is not None:
        answered = _outcome(forwarded.results)
        created = [n for n, problem in answered.items() if problem is None and not validate_only]
        await broker.controller_client.wait_for_metadata(lambda: all(n in broker.cluster.topics for n in created),
                                                         timeout_s)
        return answered
    outcome: Outcome = {}
    for name, partitions, replication, configs in specs:
        try:
            await broker.controller_client.create_topic(name, partitions, replication, configs,
                                                        validate_only=validate_only, timeout_s=timeout_s)
            outcome[name] = None
        except Exception as exc:
            outcome[name] = kafka_error(exc, f"topic {name!r}")
    return outcome


async def delete_topics(broker: Any, names: list[str], timeout_s: float) -> Outcome:
    try:
        forwarded = await forward_to_controller(broker, "DeleteTopics", pb.DeleteTopicsRequest(names=names), timeout_s)
    except errors.BrokerError as exc:
        return dict.fromkeys(names, kafka_error(exc))
    if forwarded is not None:
        answered = _outcome(forwarded.results)
        deleted = [n for n, problem in answered.items() if problem is None]
        await broker.controller_client.wait_for_metadata(lambda: not any(n in broker.cluster.topics for n in deleted),
                                                         timeout_s)
        return answered
    outcome: Outcome = {}
    for name in names:
        try:
            await broker.controller_client.delete_topic(name, timeout_s)
            outcome[name] = None
        except Exception as exc:
            outcome[name] = kafka_error(exc, f"topic {name!r}")
    return outcome


async def add_partitions(broker: Any, name: str, total: int, timeout_s: float) -> tuple[ErrorCode, str] | None:
    """Grow a topic to ``total`` partitions through the controller; None when done (and applied here)."""
    try:
        request = pb.CreatePartitionsRequest(topic=name, total=total, timeout_ms=int(timeout_s * 1000))
        forwarded = await forward_to_controller(broker, "CreatePartitions", request, timeout_s)
        if forwarded is None:
            await broker.topic_admin.add_partitions(name, total, timeout_s)
            return None
    except Exception as exc:
        return kafka_error(exc, f"topic {name!r}")
    if forwarded.error_code:
        return _problem(forwarded.error_code, forwarded.error_message)
    await broker.controller_client.wait_for_metadata(lambda: _partitions(broker, name) >= total, timeout_s)
    return None


async def alter_topic_configs(broker: Any, name: str, changes: dict[str, str], deletes: list[str],
                              validate_only: bool, timeout_s: float) -> tuple[ErrorCode, str] | None:
    """Set and remove a topic's config overrides through the controller; None when done (and applied here)."""
    try:
        request = pb.AlterTopicConfigsRequest(topic=name, configs=changes, delete_configs=deletes,
                                              validate_only=validate_only, timeout_ms=int(timeout_s * 1000))
        forwarded = await forward_to_controller(broker, "AlterTopicConfigs", request, timeout_s)
        if forwarded is None:
            await broker.topic_admin.alter_configs(name, changes, deletes, timeout_s, validate_only=validate_only)
            return None
    except Exception as exc:
        return kafka_error(exc, f"topic {name!r}")
    if forwarded.error_code:
        return _problem(forwarded.error_code, forwarded.error_message)
    if not validate_only:
        wanted = dict(forwarded.configs)
        await broker.controller_client.wait_for_metadata(lambda: _configs(broker, name) == wanted, timeout_s)
    return None


def _partitions(broker: Any, name: str) -> int:
    topic = broker.cluster.topics.get(name)
    return int(topic.partitions) if topic is not None else 0


def _configs(broker: Any, name: str) -> dict[str, str] | None:
    topic = broker.cluster.topics.get(name)
    return dict(topic.configs) if topic is not None else None
