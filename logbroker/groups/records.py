"""The records of group state in __consumer_offsets: keys, values, and their place in record batches.

Group state is a keyed table; every change is one record that sets (or, with a null value, deletes) one
key, so replaying a partition's log from its start rebuilds the table, on any replica. Keys and values are
compact JSON arrays and objects (readable with `lb consume __consumer_offsets`):

    ["o", group, topic, partition]  -> {"offset": int, "metadata": str, "ts": int}       committed offset
    ["g", group]                    -> {"epoch": int, "assignment_epoch": int, "assignor": str}
    ["m", group, member_id]         -> member: subscription, epoch, assigned and revoking partitions, ...
    ["t", group, member_id]         -> {"partitions": [[topic, partition], ...]}         target assignment
    ["c", group]                    -> classic group: protocol, generation, leader, members with assignments
    ["s"]                           -> {"records": int}                                  snapshot start

A snapshot start clears the table: the records after it restate every live key, so the log before it can
be deleted (prefix truncation keeps the log bounded; see docs in coordinator.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from logbroker_client import records as rec

Key = tuple[Any, ...]

OFFSET = "o"
GROUP = "g"
MEMBER = "m"
TARGET = "t"
SNAPSHOT = "s"
CLASSIC = "c"  # Kafka's classic protocol (classic.py)
MAX_RECORDS_PER_BATCH = 500  # a snapshot of 10,000 groups goes out in a few dozen batches


@dataclass(frozen=True)
class StateRecord:
    key: Key
    value: dict[str, Any] | None  # None: the key is deleted


def encode_key(key: Key) -> bytes:
    return json.dumps(list(key), separators=(",", ":")).encode()


def encode_value(value: dict[str, Any] | None) -> bytes | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def to_batches(records: Sequence[StateRecord], timestamp_ms: int) -> list[tuple[bytes, int]]:
    """(batch bytes, record count) pairs ready to propose, at most MAX_RECORDS_PER_BATCH records each."""
    out = []
    for start in range(0, len(records), MAX_RECORDS_PER_BATCH):
        builder = rec.BatchBuilder()
        chunk = records[start:start + MAX_RECORDS_PER_BATCH]
        for record in chunk:
            builder.append(timestamp_ms, encode_key(record.key), encode_value(record.value))
        out.append((builder.build(), len(chunk)))
    return out


def from_batch(batch: bytes | memoryview) -> Iterator[StateRecord]:
    """The state records of one stored batch (its CRC is checked; a damaged batch raises CorruptBatchError)."""
    header = rec.validate_batch(batch)
    for record in rec.decode_records(batch, 0, header):
        if record.key is None:
            continue  # not ours: the topic is internal, but be lenient with what replay meets
        key = tuple(json.loads(record.key))
        value = None if record.value is None else dict(json.loads(record.value))
        yield StateRecord(key, value)
