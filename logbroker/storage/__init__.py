"""The storage engine: a partition is a directory of segments (Kafka's log layout, RecordBatch v2 bytes).

Imports nothing from raft, cluster, groups or server, and nothing from grpc or asyncio.
"""

from logbroker.storage.config import LogConfig
from logbroker.storage.errors import (
    InvalidAppendError,
    InvalidConfigError,
    LogClosedError,
    LogDirectoryError,
    OffsetOutOfRangeError,
    RecordTooLargeError,
    StorageError,
    StorageFullError,
)
from logbroker.storage.log import AppendResult, CompactionResult, PartitionLog

__all__ = [
    "AppendResult",
    "CompactionResult",
    "InvalidAppendError",
    "InvalidConfigError",
    "LogClosedError",
    "LogConfig",
    "LogDirectoryError",
    "OffsetOutOfRangeError",
    "PartitionLog",
    "RecordTooLargeError",
    "StorageError",
    "StorageFullError",
]
