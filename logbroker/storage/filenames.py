"""Every file and directory name the storage engine uses, and how to parse them back."""

from __future__ import annotations

LOG_SUFFIX = ".log"
INDEX_SUFFIX = ".index"
TIME_INDEX_SUFFIX = ".timeindex"
SEGMENT_SUFFIXES = (LOG_SUFFIX, INDEX_SUFFIX, TIME_INDEX_SUFFIX)

# Written by a clean close(); its presence lets open() trust the indexes and skip recovery.
CLEAN_SHUTDOWN_FILE = ".clean_shutdown"
# Holds the offset below which every byte has been fsynced; recovery starts at its segment.
RECOVERY_CHECKPOINT_FILE = "recovery-point.checkpoint"
# Present once compaction has rewritten a segment: offset gaps between batches are then legitimate, even if
# cleanup.policy is later changed back to delete, so recovery must not treat them as corruption.
COMPACTED_MARKER_FILE = ".compacted"
# Which topic (by ID, not name) the partition directory belongs to: Kafka's partition.metadata (KIP-516).
PARTITION_METADATA_FILE = "partition.metadata"
# The partition's Raft state (term, vote, commit offset), kept inside the partition directory so that it is
# created and deleted with the log it describes.
RAFT_STATE_FILE = "raft.state"
# Where each leader epoch begins in the log (Kafka's leader-epoch-checkpoint; leader_epochs.py).
LEADER_EPOCH_CHECKPOINT_FILE = "leader-epoch-checkpoint"
# Written and removed again to learn whether a full disk takes writes again.
WRITE_PROBE_FILE = ".write-probe"
# Suffix of a file being written that is renamed into place once complete; leftovers are garbage.
TEMP_SUFFIX = ".tmp"
# Suffix of a compacted copy of a segment before it replaces the original.
CLEANED_SUFFIX = ".cleaned"

OFFSET_DIGITS = 20


def _segment_file_name(base_offset: int, suffix: str) -> str:
    if base_offset < 0:
        raise ValueError(f"segment base offset must be >= 0, got {base_offset}")
    return f"{base_offset:0{OFFSET_DIGITS}d}{suffix}"


def log_file_name(base_offset: int) -> str:
    return _segment_file_name(base_offset, LOG_SUFFIX)


def index_file_name(base_offset: int) -> str:
    return _segment_file_name(base_offset, INDEX_SUFFIX)


def time_index_file_name(base_offset: int) -> str:
    return _segment_file_name(base_offset, TIME_INDEX_SUFFIX)


def parse_segment_file_name(name: str) -> tuple[int, str] | None:
    """(base offset, suffix) for a segment file name such as 00000000000000000042.log; None otherwise."""
    for suffix in SEGMENT_SUFFIXES:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            if len(stem) == OFFSET_DIGITS and stem.isdigit() and stem.isascii():
                return int(stem), suffix
            return None
    return None


def validate_topic_name(topic: str) -> None:
    """Topic names become directory names, so they must be safe path components."""
    if not topic or topic in (".", "..") or "/" in topic or "\\" in topic or "\x00" in topic:
        raise ValueError(f"invalid topic name {topic!r}: it must be a non-empty name without '/', '\\' or NUL")


def partition_dir_name(topic: str, partition: int) -> str:
    validate_topic_name(topic)
    if partition < 0:
        raise ValueError(f"invalid partition {partition} of topic {topic!r}: partitions are numbered from 0")
    return f"{topic}-{partition}"


def parse_partition_dir_name(name: str) -> tuple[str, int] | None:
    """(topic, partition) from '<topic>-<partition>', split at the last '-' since topic names may contain
    '-'; None when name is not a partition directory (so a data-dir scan can skip it)."""
    topic, sep, number = name.rpartition("-")
    if not sep or not topic or not number.isdigit() or not number.isascii():
        return None
    try:
        validate_topic_name(topic)
    except ValueError:
        return None
    return topic, int(number)
