"""Runs a GroupCoordinatorShard on one replica of a __consumer_offsets partition.

The shard is pure; this is its I/O. As a state machine attached to the replica it replays every committed
entry (followers and leader alike). As leader it serves requests: an operation reads and changes the shard
at once (replaying the records it makes), the records are proposed to the partition's Raft group, and the
answer waits until they are committed, so nothing is acknowledged that a failover could lose. A request
that arrives meanwhile sees the changes of the ones before it; if leadership is lost before they commit,
their callers get NOT_COORDINATOR and the shard is rebuilt from the committed log.

A new leader serves once it has applied every entry up to its own first entry (the no-op of its term):
before that it answers COORDINATOR_LOAD_IN_PROGRESS.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from logbroker_client import records as rec

from logbroker.groups import records as r
from logbroker.groups.coordinator import GroupCoordinatorShard
from logbroker.groups.errors import CoordinatorLoadInProgress, NotCoordinator
from logbroker.raft.types import Entry, EntryKind

log = logging.getLogger("logbroker.groups")

T = TypeVar("T")
COMMIT_TIMEOUT_S = 15.0
REBUILD_READ_BYTES = 4 << 20


class GroupReplica(Protocol):
    """What the runtime needs of the replica (logbroker.cluster.replica.Replica)."""

    name: str
    high_watermark: int

    @property
    def is_leader(self) -> bool: ...

    def propose(self, payloads: Sequence[tuple[bytes, int]]) -> list[Entry]: ...

    def wait_committed(self, last_offset: int) -> asyncio.Future[None]: ...

    def read_committed(self, offset: int, max_bytes: int) -> bytes: ...

    def log_start(self) -> int: ...

    def last_offset(self) -> int: ...

    def truncate_prefix(self, below_offset: int) -> int: ...


class GroupShardRuntime:
    def __init__(self, replica: GroupReplica, make_shard: Callable[[], GroupCoordinatorShard]) -> None:
        self.replica = replica
        self._make_shard = make_shard
        self.shard = make_shard()
        self.applied_offset = -1  # every entry up to here is in the shard (the leader's own records included)
        self._loaded_at = -1  # a new leader serves once applied_offset reaches this (its no-op)
        self._leader = False
        self.snapshot_offset = -1  # the newest committed snapshot start: the log may be cut below it
        self._snapshot_pending = False
        self._tick_task: asyncio.Task[None] | None = None
        self._rebuild()

    # ========================================================================== state machine
    def apply(self, entries: Sequence[Entry]) -> None:
        for entry in entries:
            if entry.last_offset <= self.applied_offset:
                continue  # the leader replayed its own records when it proposed them
            if entry.kind is EntryKind.DATA:
                self._replay_batch(entry.payload, entry.base_offset)
            self.applied_offset = entry.last_offset

    def on_leader_change(self, is_leader: bool, term: int) -> None:
        was_leader, self._leader = self._leader, is_leader
        if is_leader:
            self._loaded_at = self.replica.last_offset()  # the no-op of the new term is the last entry
            # Heartbeats are not written to the log: every member gets a fresh session (and rebalance
            # deadline) from the new coordinator, or stable members would be expired at its first tick.
            self.shard.fresh_sessions()
            log.info("%s: coordinator for its groups from offset %d", self.replica.name, self._loaded_at)
        elif was_leader and self.applied_offset >= self.replica.high_watermark:
            # It replayed records that may never commit: start again from what is committed.
            self._rebuild()

    def _replay_batch(self, payload: bytes | memoryview, offset: int) -> None:
        for record in r.from_batch(payload):
            if record.key[0] == r.SNAPSHOT:
                self.snapshot_offset = offset
            self.shard.replay(record)

    def _rebuild(self) -> None:
        """A fresh shard from the committed log (bounded by snapshots), for start-up and lost leadership."""
        self.shard = self._make_shard()
        offset = self.replica.log_start()
        end = self.replica.high_watermark
        while offset < end:
            data = self.replica.read_committed(offset, REBUILD_READ_BYTES)
            if not data:
                break
            for pos, header in rec.iter_batch_headers(data):
                batch_end = header.base_offset + header.last_offset_delta + 1
                if batch_end > end:
                    break
                if not header.is_control:
                    self._replay_batch(data[pos:pos + header.size], header.base_offset)
                offset = batch_end
            else:
                continue
            break
        self.applied_offset = offset - 1

    # ================================================================================ serving
    def check_serving(self) -> None:
        if not self._leader or not self.replica.is_leader:
            raise NotCoordinator(f"{self.replica.name}: this broker is not the coordinator of the group's "
                                 "partition now; find the coordinator again")
        if self.applied_offset < self._loaded_at:
            raise CoordinatorLoadInProgress(f"{self.replica.name}: the new coordinator is still loading group "
                                            "state; retry shortly")

    async def run(self, operation: Callable[[GroupCoordinatorShard], tuple[T, list[r.StateRecord]]]) -> T:
        """Run operation on the shard; answer its result once its records are committed."""
        self.check_serving()
        result, records = operation(self.shard)
        if records:
            await self._write(records)
        return result

    async def _write(self, records: Sequence[r.StateRecord]) -> int:
        """Propose records and wait until they are committed; returns the offset of the first."""
        try:
            entries = self.replica.propose(r.to_batches(records, self.shard.clock_ms()))
        except Exception as exc:
            self._rebuild()  # the shard holds changes that will never be written
            raise NotCoordinator(f"{self.replica.name}: leadership moved before the change was written ({exc}); "
                                 "find the coordinator again") from None
        self.applied_offset = entries[-1].last_offset
        try:
            await asyncio.wait_for(self.replica.wait_committed(entries[-1].last_offset), COMMIT_TIMEOUT_S)
        except TimeoutError:
            raise CoordinatorLoadInProgress(f"{self.replica.name}: the change was not committed within "
                                            f"{COMMIT_TIMEOUT_S:.0f}s (a majority of replicas must be up)") from None
        except Exception as exc:
            raise NotCoordinator(f"{self.replica.name}: leadership moved before the change committed ({exc}); "
                                 "find the coordinator again") from None
        return entries[0].base_offset

    # ============================================================================ maintenance
    def schedule_tick(self) -> None:
        """Start a maintenance round unless one is still running (it may be waiting for a commit)."""
        if self._tick_task is None or self._tick_task.done():
            self._tick_task = asyncio.get_running_loop().create_task(self._tick_quietly())

    async def _tick_quietly(self) -> None:
        try:
            await self.tick()
        except Exception as exc:  # leadership is moving; the next round retries
            log.debug("%s: coordinator maintenance skipped: %s", self.replica.name, exc)

    async def tick(self) -> None:
        """Timeouts, snapshots and prefix truncation: called every maintenance round."""
        if self.snapshot_offset > self.replica.log_start():
            self.replica.truncate_prefix(self.snapshot_offset)
        if not self._leader or not self.replica.is_leader or self.applied_offset < self._loaded_at:
            return
        records = self.shard.expire()
        if records:
            await self._write(records)
        if self.shard.wants_snapshot() and not self._snapshot_pending:
            self._snapshot_pending = True
            try:
                start = await self._write(self.shard.take_snapshot())
                self.snapshot_offset = max(self.snapshot_offset, start)  # committed: the log may be cut below
            finally:
                self._snapshot_pending = False
