"""Admin APIs on the Kafka port: CreateTopics, DeleteTopics, DescribeConfigs, CreatePartitions, AlterConfigs,
IncrementalAlterConfigs.

Topic changes run through the controller (forwarded to its leader from other brokers, see kafka/topics.py), the
same calls as `lb topic alter` and `lb topic add-partitions`, validated the same way.
"""

from __future__ import annotations

import uuid
from typing import Any

from kio.schema.errors import ErrorCode

from logbroker.kafka.context import Context
from logbroker.kafka.errors import kafka_error
from logbroker.kafka.topics import add_partitions, alter_topic_configs, create_topics, delete_topics
from logbroker.kafka.versions import api, make, nested, response_class

TOPIC_RESOURCE = 2
BROKER_RESOURCE = 4
SOURCE_TOPIC = 1  # DYNAMIC_TOPIC_CONFIG
SOURCE_DEFAULT = 5  # DEFAULT_CONFIG
CONFIG_SET = 0  # IncrementalAlterConfigs operations
CONFIG_DELETE = 1
MIN_TIMEOUT_S = 1.0
ALTER_CONFIGS_TIMEOUT_S = 30.0  # AlterConfigs requests carry no timeout of their own


def _timeout_s(request: Any) -> float:
    return max(request.timeout.total_seconds(), MIN_TIMEOUT_S)


@api(19, "CreateTopics", 2, 7)
async def create_topics_api(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(19, version)
    entry = nested(cls, "CreatableTopicResult")
    specs, refused = [], {}
    for topic in request.topics:
        if topic.assignments:
            refused[topic.name] = (ErrorCode.invalid_request, "manual replica assignment is not supported: the "
                                   "controller places replicas; give num_partitions and replication_factor")
            continue
        configs = {c.name: c.value for c in topic.configs if c.value is not None}
        specs.append((topic.name, topic.num_partitions, topic.replication_factor, configs))
    outcome = await create_topics(ctx.broker, specs, request.validate_only, _timeout_s(request)) if specs else {}
    outcome.update(refused)
    results = []
    for topic in request.topics:
        problem = outcome.get(topic.name)
        spec = ctx.broker.cluster.topics.get(topic.name) if problem is None else None
        results.append(make(
            entry, name=topic.name, error_code=problem[0] if problem else ErrorCode.none,
            error_message=problem[1] if problem else None,
            topic_id=uuid.UUID(hex=spec.topic_id) if spec is not None and spec.topic_id else None,
            topic_config_error_code=0, num_partitions=spec.partitions if spec is not None else -1,
            replication_factor=spec.replication_factor if spec is not None else -1, configs=None))
    return make(cls, throttle_time=0, topics=tuple(results))


@api(20, "DeleteTopics", 1, 6)
async def delete_topics_api(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(20, version)
    entry = nested(cls, "DeletableTopicResult")
    names = [t.name for t in request.topics if t.name] if version >= 6 else list(request.topic_names)
    outcome = await delete_topics(ctx.broker, names, _timeout_s(request)) if names else {}
    results = []
    for name in names:
        problem = outcome.get(name)
        results.append(make(entry, name=name, topic_id=None, error_code=problem[0] if problem else ErrorCode.none,
                            error_message=problem[1] if problem else None))
    if version >= 6:  # topics named by id only: not resolvable here
        results += [make(entry, name=None, topic_id=t.topic_id, error_code=ErrorCode.unknown_topic_id,
                         error_message="topics are deleted by name here") for t in request.topics if not t.name]
    return make(cls, throttle_time=0, responses=tuple(results))


def _describe_topic(ctx: Context, cls: type, resource: Any) -> Any:
    result_cls, config_cls = nested(cls, "DescribeConfigsResult"), nested(cls, "DescribeConfigsResourceResult")
    try:
        spec = ctx.broker.controller_client.topic(resource.resource_name)
        effective = ctx.broker.controller_client.effective_configs(resource.resource_name)
    except Exception as exc:
        code, message = kafka_error(exc, resource.resource_name)
        return make(result_cls, error_code=code, error_message=message, resource_type=resource.resource_type,
                    resource_name=resource.resource_name, configs=())
    wanted = resource.configuration_keys
    configs = tuple(make(config_cls, name=name, value=str(value), read_only=False,
                         config_source=SOURCE_TOPIC if name in spec.configs else SOURCE_DEFAULT,
                         is_default=name not in spec.configs, is_sensitive=False, synonyms=(), config_type=0,
                         documentation=None)
                    for name, value in sorted(effective.items()) if wanted is None or name in wanted)
    return make(result_cls, error_code=ErrorCode.none, error_message=None, resource_type=resource.resource_type,
                resource_name=resource.resource_name, configs=configs)


@api(32, "DescribeConfigs", 1, 4)
async def describe_configs(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(32, version)
    result_cls = nested(cls, "DescribeConfigsResult")
    results = []
    for resource in request.resources:
        if resource.resource_type == TOPIC_RESOURCE:
            results.append(_describe_topic(ctx, cls, resource))
        elif resource.resource_type == BROKER_RESOURCE:  # broker settings are not exposed as Kafka configs
            results.append(make(result_cls, error_code=ErrorCode.none, error_message=None,
                                resource_type=resource.resource_type, resource_name=resource.resource_name,
                                configs=()))
        else:
            results.append(make(result_cls, error_code=ErrorCode.invalid_request,
                                error_message=f"resource type {resource.resource_type} is not described here "
                                              "(topics: 2, brokers: 4)", resource_type=resource.resource_type,
                                resource_name=resource.resource_name, configs=()))
    return make(cls, throttle_time=0, results=tuple(results))


@api(37, "CreatePartitions", 0, 3)
async def create_partitions(ctx: Context, request: Any, version: int) -> Any:
    cls = response_class(37, version)
    entry = nested(cls, "CreatePartitionsTopicResult")
    results = []
    for topic in request.topics:
        problem = await _add_partitions(ctx, topic, request.validate_only, _timeout_s(request))
        results.append(make(entry, name=topic.name, error_code=problem[0] if problem else ErrorCode.none,
                            error_message=problem[1] if problem else None))
    return make(cls, throttle_time=0, results=tuple(results))


async def _add_partitions(ctx: Context, topic: Any, validate_only: bool,
                          timeout_s: float) -> tuple[ErrorCode, str] | None:
    if topic.assignments:
        return ErrorCode.invalid_request, ("manual replica assignment is not supported: the controller places the "
                                           "new partitions; give only the count")
    spec = ctx.broker.cluster.topics.get(topic.name)
    if spec is None:
        return ErrorCode.unknown_topic_or_partition, f"topic {topic.name!r} does not exist"
    if topic.count <= spec.partitions:
        return ErrorCode.invalid_partitions, (f"topic {topic.name!r} has {spec.partitions} partition(s) and "
                                              f"partitions are never removed; ask for more than {spec.partitions}")
    if validate_only:
        return None
    return await add_partitions(ctx.broker, topic.name, topic.count, timeout_s)


@api(33, "AlterConfigs", 0, 2)
async def alter_configs(ctx: Context, request: Any, version: int) -> Any:
    """Kafka's older call: the configs given replace the topic's overrides (those left out go back to the
    broker defaults)."""
    cls = response_class(33, version)
    entry = nested(cls, "AlterConfigsResourceResponse")
    results = []
    for resource in request.resources:
        problem = _not_a_topic(resource)
        if problem is None:
            spec = ctx.broker.cluster.topics.get(resource.resource_name)
            changes = {c.name: c.value for c in resource.configs if c.value is not None}
            deletes = [key for key in (spec.configs if spec is not None else {}) if key not in changes]
            problem = await alter_topic_configs(ctx.broker, resource.resource_name, changes, deletes,
                                                request.validate_only, ALTER_CONFIGS_TIMEOUT_S)
        results.append(_config_result(entry, resource, problem))
    return make(cls, throttle_time=0, responses=tuple(results))


@api(44, "IncrementalAlterConfigs", 0, 1)
async def incremental_alter_configs(ctx: Context, request: Any, version: int) -> Any:
    """SET and DELETE a topic's configs; APPEND and SUBTRACT are for list-valued configs, which topics here
    do not have."""
    cls = response_class(44, version)
    entry = nested(cls, "AlterConfigsResourceResponse")
    results = []
    for resource in request.resources:
        problem = _not_a_topic(resource)
        ops = {c.config_operation for c in resource.configs}
        if problem is None and not ops <= {CONFIG_SET, CONFIG_DELETE}:
            problem = ErrorCode.invalid_request, ("APPEND and SUBTRACT apply to list-valued configs; a topic's "
                                                  "configs here are single values: use SET or DELETE")
        if problem is None:
            changes = {c.name: c.value or "" for c in resource.configs if c.config_operation == CONFIG_SET}
            deletes = [c.name for c in resource.configs if c.config_operation == CONFIG_DELETE]
            problem = await alter_topic_configs(ctx.broker, resource.resource_name, changes, deletes,
                                                request.validate_only, ALTER_CONFIGS_TIMEOUT_S)
        results.append(_config_result(entry, resource, problem))
    return make(cls, throttle_time=0, responses=tuple(results))


def _not_a_topic(resource: Any) -> tuple[ErrorCode, str] | None:
    if resource.resource_type == TOPIC_RESOURCE:
        return None
    return ErrorCode.invalid_request, (f"resource type {resource.resource_type} cannot be changed here: only "
                                       "topic configs (type 2); broker settings live in the broker's own file")


def _config_result(entry: type, resource: Any, problem: tuple[ErrorCode, str] | None) -> Any:
    return make(entry, error_code=problem[0] if problem else ErrorCode.none,
                error_message=problem[1] if problem else None, resource_type=resource.resource_type,
                resource_name=resource.resource_name)
