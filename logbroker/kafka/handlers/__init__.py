"""Kafka API handlers, one module per API group; importing this package registers them all."""

from logbroker.kafka.handlers import admin, fetch, groups, meta, produce  # noqa: F401
