"""partition.metadata: the identity of the topic a partition directory belongs to (Kafka's KIP-516).

A topic is known by its name to users, but names are reused: a topic can be deleted and another created
with the same name. The directory name is the topic name, so the directory alone cannot tell the two apart.
This small file can: it holds the topic's ID (a UUID given at creation) and the offset of the controller
command that created it, which orders topics of one name by age. Nothing done to an old topic (a replayed
create or delete) may touch a directory whose file names a different, newer topic.

Format (text, so an operator can read it):

    version: 1
    topic_id: 9f1c2a7e4b5d4c0f8e3a2b1c0d9e8f7a
    created_offset: 42
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from logbroker.storage import filenames
from logbroker.storage.files import fsync_dir, fsync_file, write_file_atomically

FORMAT_VERSION = 1


@dataclass(frozen=True)
class TopicIdentity:
    topic_id: str
    created_offset: int  # offset of the controller command that created the topic: older topics have lower

    def encode(self) -> bytes:
        return (f"version: {FORMAT_VERSION}\ntopic_id: {self.topic_id}\n"
                f"created_offset: {self.created_offset}\n").encode()


class PartitionMetadataError(ValueError):
    """partition.metadata exists but cannot be read; the message names the file."""


def read_identity(directory: Path) -> TopicIdentity | None:
    """The identity recorded in directory, or None when the directory or its file does not exist."""
    path = directory / filenames.PARTITION_METADATA_FILE
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise PartitionMetadataError(f"{path}: cannot read the topic identity: {exc}") from None
    fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    try:
        if int(fields["version"]) != FORMAT_VERSION:
            raise PartitionMetadataError(f"{path}: unknown format version {fields['version']}")
        return TopicIdentity(fields["topic_id"], int(fields["created_offset"]))
    except (KeyError, ValueError) as exc:
        raise PartitionMetadataError(f"{path}: malformed topic identity ({exc}); content {text[:200]!r}") from None


def write_identity(directory: Path, identity: TopicIdentity, durable: bool = True) -> None:
    """Record identity (the directory is created if missing); durably unless durable=False, when the caller
    runs sync_identity before anything in the directory becomes durable."""
    directory.mkdir(parents=True, exist_ok=True)
    write_file_atomically(directory / filenames.PARTITION_METADATA_FILE, identity.encode(), durable=durable)


def sync_identity(directory: Path) -> None:
    """Make a new partition directory's identity durable: the file's bytes and the directory's name in the
    data directory (the partition log's first flush fsyncs the directory's own entries, this file's name
    among them). Until then a crash may lose them all, which is safe while nothing in it is durable."""
    fsync_file(directory / filenames.PARTITION_METADATA_FILE)
    fsync_dir(directory.parent)
