"""logbroker's Python client: the record-batch codec, Producer, Consumer, ShareConsumer, Admin and the `lb` CLI.

The public classes are imported lazily so that `logbroker_client.records` (the codec the broker's
storage engine uses) can be imported without loading gRPC.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Admin": "logbroker_client.admin",
    "AsyncAdmin": "logbroker_client.aio",
    "AsyncConsumer": "logbroker_client.aio",
    "AsyncProducer": "logbroker_client.aio",
    "AsyncShareConsumer": "logbroker_client.aio_share",
    "Consumer": "logbroker_client.consumer",
    "ConsumerRecord": "logbroker_client.types",
    "LogbrokerError": "logbroker_client.errors",
    "OffsetAndMetadata": "logbroker_client.types",
    "Producer": "logbroker_client.producer",
    "RecordMetadata": "logbroker_client.types",
    "ShareConsumer": "logbroker_client.share",
    "ShareRecord": "logbroker_client.share_state",
    "TopicPartition": "logbroker_client.types",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'logbroker_client' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
