"""The APIs and versions this listener serves, and the kio message classes of each.

An API is advertised in ApiVersions from ``min_version``; versions below ``served_from`` are advertised but
answered UNSUPPORTED_VERSION (Produce from v0: librdkafka before 2.11.1 turns gzip, snappy and lz4 on only
when Produce v0 is in the broker's range, yet those versions carry the old message format, which logbroker
does not store). Each handler module registers its APIs with ``@api(...)``.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kio.index import load_request_schema, load_response_schema


@dataclass(frozen=True)
class Api:
    key: int
    name: str
    min_version: int
    max_version: int
    served_from: int
    handler: Callable[..., Awaitable[Any]]


APIS: dict[int, Api] = {}


def api(key: int, name: str, min_version: int, max_version: int,
        served_from: int | None = None) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Register a handler: ``async def handle(ctx, request, version) -> response | None``."""
    def register(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        served = min_version if served_from is None else served_from
        for version in range(served, max_version + 1):  # fail at import, not on a client's request
            request_class(key, version)
            response_class(key, version)
        APIS[key] = Api(key, name, min_version, max_version, served, handler)
        return handler
    return register


@functools.cache
def request_class(key: int, version: int) -> Any:
    return load_request_schema(key, version)


@functools.cache
def response_class(key: int, version: int) -> Any:
    return load_response_schema(key, version)


def is_flexible(key: int, version: int) -> bool:
    """Whether the request header of (key, version) is v2; False for what we do not serve."""
    found = APIS.get(key)
    if found is None or not found.served_from <= version <= found.max_version:
        return False
    return bool(request_class(key, version).__flexible__)


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


@functools.cache
def _duration_fields(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls)
                     if str(f.metadata.get("kafka_type", "")).startswith("timedelta"))


def make(cls: type, **values: Any) -> Any:
    """An instance of a kio class from a superset of its fields: the fields this version lacks are dropped,
    so one handler builds every version's message. Durations (throttle time, ...) are given in ms."""
    names = _field_names(cls)
    durations = _duration_fields(cls)
    return cls(**{k: datetime.timedelta(milliseconds=v) if k in durations and isinstance(v, int) else v
                  for k, v in values.items() if k in names})


def nested(cls: type, name: str) -> Any:
    """A nested message class (e.g. the partition entry) of the same version as cls."""
    return getattr(sys.modules[cls.__module__], name)


def has_field(cls: type, name: str) -> bool:
    return name in _field_names(cls)
