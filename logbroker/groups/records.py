"""The records of group state in __consumer_offsets: keys, values, and their place in record batches.

Group state is a keyed table; every change is one record that sets (or, with a null value, deletes) one
key, so replaying a partition's log from its start rebuilds the table, on any replica. Keys and values are
compact JSON arrays and objects (readable with `lb consume __consumer_offsets`):

    ["o", group, topic, partition]  -> {"offset": int, "metadata": str, "ts": int}       committed offset
    ["g", group]                    -> {"epoch": int, "assignment_epoch": int, "assignor": str}
    ["m", group, member_id]         -> member: subscription, epoch, assigned and revoking partitions, ...
    ["t", group, member_id]         -> {"partitions": [[topic, partition], ...]}         target assignment
    ["c", group]                    -> classic group: protocol, generation, leader, members with assignments
    ["s"]                           -> {}                                                snapshot start
    ["z", n]                        -> {"items": [[key, value], ...]}                    snapshot keys, 500 a record

A snapshot start clears the table: the records after it restate every live key, so the log before it can
be deleted (prefix truncation keeps the log bounded; see docs in coordinator.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from logbroker_client import records as rec

Key = tuple[Any, ...]

OFFSET = "o"
GROUP = "g"
MEMBER = "m"
TARGET = "t"
SNAPSHOT = "s"
SNAPSHOT_CHUNK = "z"  # ["z", n] -> {"items": [[key, value], ...]}: many keys of a snapshot in one record
SNAPSHOT_CHUNK_KEYS = 500
CLASSIC = "c"  # Kafka's classic protocol (classic.py)
MAX_RECORDS_PER_BATCH = 500
MAX_BATCH_BYTES = 512 << 10  # well within max.message.bytes and one Raft message


@dataclass(frozen=True)
class StateRecord:
    key: Key
    value: dict[str, Any] | None  # None: the key is deleted
    size_bytes: int = field(default=0, compare=False)  # as stored (read back); 0 when made here


def encode_key(key: Key) -> bytes:
    return json.dumps(list(key), separators=(",", ":")).encode()


def encode_value(value: dict[str, Any] | None) -> bytes | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def to_batches(records: Sequence[StateRecord], timestamp_ms: int) -> list[tuple[bytes, int]]:
    """(batch bytes, record count) pairs ready to propose: at most MAX_RECORDS_PER_BATCH records and about
    MAX_BATCH_BYTES each (a record larger than that goes alone)."""
    out = []
    builder, size_bytes = rec.BatchBuilder(), 0
    for record in records:
        key, value = encode_key(record.key), encode_value(record.value)
        if builder.count and (builder.count >= MAX_RECORDS_PER_BATCH or
                              size_bytes + len(key) + len(value or b"") > MAX_BATCH_BYTES):
            out.append((builder.build(), builder.count))
            builder, size_bytes = rec.BatchBuilder(), 0
        builder.append(timestamp_ms, key, value)
        size_bytes += len(key) + len(value or b"")
    if builder.count:
        out.append((builder.build(), builder.count))
    return out


def from_batch(batch: bytes | memoryview) -> Iterator[StateRecord]:
    """The state records of one stored batch (its CRC is checked; a damaged batch raises CorruptBatchError)."""
    header = rec.validate_batch(batch)
    for record in rec.decode_records(batch, 0, header):
        if record.key is None:
            continue  # not ours: the topic is internal, but be lenient with what replay meets
        key = tuple(json.loads(record.key))
        value = None if record.value is None else dict(json.loads(record.value))
        yield StateRecord(key, value, len(record.key) + len(record.value or b""))
