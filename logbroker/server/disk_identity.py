"""Which disk a broker runs on: a random ID written once into an empty data directory.

Raft assumes a voter keeps what it acknowledged. A broker whose disk was replaced (or wiped) starts again with
nothing, replays the metadata log from the others, and opens a replica of every partition placed on it; each holds
nothing, and one that voted before catching up could elect a leader lacking records it had itself acknowledged.
A replica that holds nothing is either that (a partition older than the disk) or a partition new to the cluster,
and only the metadata log's order can tell them apart: the broker registers its disk's ID in the metadata log
when it starts on a disk not yet registered there, so every partition created before that registration is older
than the disk (ReplicaManager.rejoin_if_state_lost), and one created after it is new.

The file is ``disk.id`` in the data directory: 32 lowercase hex digits and a newline, written atomically and
fsynced before the broker opens anything else, so a crash never leaves a half-written ID.

The metadata log itself cannot use that registration (it is written through the metadata log). A broker that
finds a new disk and no metadata log on it writes ``metadata.catch-up`` instead, before ``disk.id`` (a broker killed
between the two would otherwise find an ID, no file and an empty metadata log, and take itself for a voter):
while that file exists its replica of the metadata log takes no part in elections, until it has caught up from a
leader, or until a majority of the brokers say (in their liveness heartbeats) that they hold no metadata either:
a cluster starting for the first time (ControllerClient.end_metadata_catch_up). The file goes once the log it
caught up is durable, and stays across restarts until then.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from logbroker.storage.files import write_file_atomically

DISK_ID_FILE = "disk.id"
METADATA_CATCH_UP_FILE = "metadata.catch-up"
_DISK_ID = re.compile(r"[0-9a-f]{32}")


class DiskIdentityError(OSError):
    """The data directory's disk ID file is unreadable or damaged."""


def is_disk_id(value: object) -> bool:
    return isinstance(value, str) and _DISK_ID.fullmatch(value) is not None


def has_disk_id(data_dir: Path) -> bool:
    return (data_dir / DISK_ID_FILE).exists()


def mark_metadata_catch_up(data_dir: Path) -> None:
    """Write METADATA_CATCH_UP_FILE (durably): this broker's metadata log waits to catch up before it votes."""
    write_file_atomically(data_dir / METADATA_CATCH_UP_FILE,
                          b"this broker's metadata log waits to catch up before it votes\n", durable=True)


def load_or_create_disk_id(data_dir: Path) -> str:
    """This data directory's disk ID, created (durably) if it has none yet."""
    path = data_dir / DISK_ID_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        disk_id = uuid.uuid4().hex
        write_file_atomically(path, f"{disk_id}\n".encode("ascii"), durable=True)
        return disk_id
    except (OSError, UnicodeDecodeError) as exc:
        raise DiskIdentityError(f"cannot read {path}: {exc}") from None
    if not is_disk_id(text):
        raise DiskIdentityError(
            f"{path} is damaged (it should hold 32 hex digits); it tells this broker's disk from a replaced one. "
            f"Delete it only if this data directory is otherwise intact: the broker then registers it as a new "
            f"disk, and its replicas that hold nothing wait to catch up before they vote")
    return text
