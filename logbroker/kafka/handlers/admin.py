"""Admin APIs on the Kafka port: CreateTopics, DeleteTopics, DescribeConfigs, CreatePartitions.

Topic changes run through the controller (forwarded to its leader from other brokers, see kafka/topics.py).
Adding partitions to an existing topic is not something the broker core does yet, so CreatePartitions is
served only to say so, per topic, with a message.
"""

from __future__ import annotations

import uuid
from typing import Any

from kio.schema.errors import ErrorCode

from logbroker.kafka.context import Context
from logbroker.kafka.errors import kafka_error
from logbroker.kafka.topics import create_topics, delete_topics
from logbroker.kafka.versions import api, make, nested, response_class

TOPIC_RESOURCE = 2
BROKER_RESOURCE = 4
SOURCE_TOPIC = 1  # DYNAMIC_TOPIC_CONFIG
SOURCE_DEFAULT = 5  # DEFAULT_CONFIG
MIN_TIMEOUT_S = 1.0


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
        spec = ctx.broker.topic(resource.resource_name)
        effective = ctx.broker.effective_configs(resource.resource_name)
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
    return make(cls, throttle_time=0, results=tuple(
        make(entry, name=t.name, error_code=ErrorCode.unsupported_version,
             error_message="adding partitions to an existing topic is not supported by logbroker yet; create a "
                           "new topic with more partitions") for t in request.topics))
