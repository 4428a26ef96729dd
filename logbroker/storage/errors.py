"""Storage errors. Every message names the topic-partition and says what the operator or caller can do."""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error raised by logbroker.storage."""


class InvalidConfigError(StorageError, ValueError):
    """A log config key has a value outside what is allowed."""


class OffsetOutOfRangeError(StorageError):
    """A read or lookup asked for an offset outside [log_start, log_end]."""

    def __init__(self, offset: int, log_start: int, log_end: int, partition: str = "") -> None:
        self.offset = offset
        self.log_start = log_start
        self.log_end = log_end
        self.partition = partition
        prefix = f"{partition}: " if partition else ""
        super().__init__(
            f"{prefix}offset {offset} is out of range; valid offsets are {log_start}..{log_end} "
            f"(log start..log end, where log end is the next offset to be written); "
            f"seek to an offset in that range"
        )


class InvalidAppendError(StorageError):
    """The bytes handed to append are not a well-formed stream of batches that continue the log."""


class RecordTooLargeError(StorageError):
    """A batch is larger than max.message.bytes."""


class LogDirectoryError(StorageError):
    """The partition directory or one of its files cannot be read or written."""


class StorageFullError(LogDirectoryError):
    """The disk is full (ENOSPC). The log was left exactly as it was before the failed write."""


class LogClosedError(StorageError):
    """The log was closed or deleted; reopen it with PartitionLog.open."""
