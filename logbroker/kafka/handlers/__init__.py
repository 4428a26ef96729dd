"""Kafka API handlers, one module per API group; importing this package registers them all."""

import logbroker.kafka.handlers.admin
import logbroker.kafka.handlers.epochs
import logbroker.kafka.handlers.fetch
import logbroker.kafka.handlers.groups
import logbroker.kafka.handlers.meta
import logbroker.kafka.handlers.produce  # noqa: F401
