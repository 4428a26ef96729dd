"""One log of Raft hard state (term, vote and friends) for every group of a broker, fsynced in groups.

Every Raft group must make its term and vote durable before any message that depends on them leaves.
With a state file per group, a broker creating or failing over thousands of partitions paid a file
creation, a directory fsync and an fdatasync per group, one group at a time. Here every group's saves are
records appended to one file, and concurrent saves share one fdatasync (group commit): whoever finds no
fdatasync running starts one for everything written so far, and the others wait for it. A save returns
only once an fdatasync that began after its record was written has succeeded, so the Ready contract holds.

Record: magic "LBS1" | crc32c u32 over (length | body) | length u32 | body (JSON: {"group": key,
"state": the ReplicaState's fields, or null once the group is forgotten}). The newest record of a group
wins. Load reads records until the first one that fails its check: a save torn by a crash is the last
thing in the file, and no later record can have been synced (its fdatasync would have covered the torn
one too), so dropping everything from there loses only saves that never returned. Every load rewrites
the file from what it read, so nothing is appended after a torn tail, and nothing a killed process left
unsynced in the page cache is trusted as durable.

The file is rewritten with only the newest record of each group (to a temporary file, fsynced, renamed,
directory fsynced) when it grows past a few times that size, and after an fdatasync fails: Linux may have
dropped the pages that failed, and no later fdatasync would write them, so until a rewrite succeeds every
save fails and the groups that depend on it stop (their replicas are reopened once the disk takes writes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import threading
from concurrent.futures import Executor
from dataclasses import replace
from pathlib import Path

from logbroker_client import records as rec

from logbroker.cluster.raft_storage import ReplicaState, ReplicaStateFile
from logbroker.raft.membership import Membership
from logbroker.storage.filenames import TEMP_SUFFIX
from logbroker.storage.files import OS_FILES, FileSystem, write_all

logger = logging.getLogger("logbroker.state_log")

STATE_LOG_FILE = "raft-states.log"
RECORD_MAGIC = b"LBS1"
_CRC = struct.Struct(">I")
_LENGTH = struct.Struct(">I")
_HEADER_BYTES = len(RECORD_MAGIC) + _CRC.size + _LENGTH.size  # 12
MAX_BODY_BYTES = 1 << 16
# Rewrite once the file is this many times the size of its live records (and at least MIN_COMPACT_BYTES).
COMPACT_RATIO = 4
MIN_COMPACT_BYTES = 4 << 20


class StateLogFailedError(OSError):
    """An fdatasync of the state log failed and the log has not been rewritten since: no save is durable."""


class RaftStateLog:
    """The broker's one file of Raft hard state; thread-safe (saves come from the flush thread pool)."""

    def __init__(self, path: Path, fs: FileSystem = OS_FILES, min_compact_bytes: int = MIN_COMPACT_BYTES) -> None:
        self.path = path
        self.fs = fs
        self.min_compact_bytes = min_compact_bytes
        self._cond = threading.Condition()
        self._states: dict[str, ReplicaState] = {}  # each group's newest state written (durable once synced)
        self._record_bytes: dict[str, int] = {}  # the size of each group's newest record, for _live_bytes
        self._fd: int | None = None
        self._end = 0  # bytes written
        self._generation = 0  # bumped by every rewrite, which makes all that was written durable
        self._synced = (0, 0)  # (generation, bytes) known durable
        self._syncing = False
        self._failure: OSError | None = None
        self._live_bytes = 0  # the size of a rewrite: one record per group
        self.shared_sync = SharedStateSync(self)  # saves from the event loop (Replica's state-only Readys)
        self.fdatasyncs = 0  # how many were issued (group commit makes it far fewer than saves)

    # ---------------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, directory: Path, fs: FileSystem = OS_FILES,
             min_compact_bytes: int = MIN_COMPACT_BYTES) -> RaftStateLog:
        """Load (or create) directory's state log, cutting a torn tail."""
        log = cls(directory / STATE_LOG_FILE, fs, min_compact_bytes)
        log._load()
        return log

    def _load(self) -> None:
        fs = self.fs
        if not fs.exists(self.path):
            self._create_empty()
            return
        data = fs.read_bytes(self.path)
        valid_end = self._read_records(data)
        if valid_end < len(data):
            logger.warning("%s: %d byte(s) after byte %d are not a whole valid record (a save torn by a crash, "
                           "which never returned); dropped", self.path, len(data) - valid_end, valid_end)
        # What was read may be only in the page cache: a process killed after a failed fdatasync leaves pages
        # the kernel will never write, which an fdatasync now would not write either. A rewrite makes what
        # this start trusts durable (one file per broker start), and drops a torn tail with it.
        with self._cond:
            self._rewrite_locked()

    def _create_empty(self) -> None:
        fs = self.fs
        fs.mkdir(self.path.parent)
        self._fd = fs.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        fs.fsync(self._fd)
        fs.fsync_dir(self.path.parent)  # the file's existence must survive a crash too

    def _read_records(self, data: bytes) -> int:
        """Take every valid record in order; the end of the last one."""
        position = 0
        while position + _HEADER_BYTES <= len(data):
            if data[position:position + len(RECORD_MAGIC)] != RECORD_MAGIC:
                break
            (crc,) = _CRC.unpack_from(data, position + len(RECORD_MAGIC))
            (length,) = _LENGTH.unpack_from(data, position + len(RECORD_MAGIC) + _CRC.size)
            end = position + _HEADER_BYTES + length
            if length > MAX_BODY_BYTES or end > len(data):
                break
            if rec.crc32c(data[position + len(RECORD_MAGIC) + _CRC.size:end]) != crc:
                break
            try:
                group, state = _decode(data[position + _HEADER_BYTES:end])
            except (ValueError, KeyError, TypeError):
                break
            if state is None:
                self._states.pop(group, None)
            else:
                self._states[group] = state
            position = end
        return position

    # ---------------------------------------------------------------------------------- queries

    def state_of(self, group: str) -> ReplicaState | None:
        with self._cond:
            state = self._states.get(group)
            return replace(state) if state is not None else None

    @property
    def groups(self) -> list[str]:
        with self._cond:
            return sorted(self._states)

    @property
    def size_bytes(self) -> int:
        return self._end

    # ---------------------------------------------------------------------------------- saving

    def save(self, group: str, state: ReplicaState) -> None:
        """Make group's state durable; returns once it is (blocks: call it from a worker thread)."""
        self._append_and_sync(group, replace(state))

    def forget(self, group: str) -> None:
        """Drop a group whose replica is deleted here, durably: a replica created again under the same key
        (moved back) must not find the old log's start and membership."""
        self._append_and_sync(group, None)

    def _append_and_sync(self, group: str, state: ReplicaState | None) -> None:
        self.sync_to(self.append(group, state))

    def append(self, group: str, state: ReplicaState | None) -> tuple[int, int]:
        """Write group's record without waiting for it to be durable; returns the target to pass sync_to().
        A write into the page cache, quick enough for the event loop (SharedStateSync does it there)."""
        record = _encode(group, state)
        if len(record) - _HEADER_BYTES > MAX_BODY_BYTES:
            raise ValueError(f"{self.path}: Raft state of group {group} is {len(record)} bytes, over the limit")
        with self._cond:
            self._recover_locked()
            self._write_locked(record)
            self._note_locked(group, state, len(record))
            return self._generation, self._end

    def sync_to(self, target: tuple[int, int]) -> None:
        """Return once everything up to target (from append()) is durable (blocks: call it from a worker)."""
        with self._cond:
            self._sync_locked(target)

    def is_durable(self, target: tuple[int, int]) -> bool:
        with self._cond:
            return self._durable(target)

    def _note_locked(self, group: str, state: ReplicaState | None, record_bytes: int) -> None:
        # The previous record's size is kept, not computed again: encoding it anew doubled the cost of every save
        # (thousands of them on the event loop in a mass failover).
        self._states.pop(group, None)
        self._live_bytes -= self._record_bytes.pop(group, 0)
        if state is not None:
            self._states[group] = state
            self._record_bytes[group] = record_bytes
            self._live_bytes += record_bytes

    def _write_locked(self, record: bytes) -> None:
        assert self._fd is not None
        try:
            self._append_at_end(record)
        except OSError as exc:
            # Part of the record may be in the file: cut it off, so the next record follows valid bytes.
            try:
                self.fs.ftruncate(self._fd, self._end)
            except OSError:
                self._failure = exc  # the tail is unknown: only a rewrite makes the file trustworthy again
            raise
        self._end += len(record)

    def _append_at_end(self, record: bytes) -> None:
        assert self._fd is not None
        view = memoryview(record)
        position = self._end
        while view:
            written = self.fs.pwrite(self._fd, view, position)
            view = view[written:]
            position += written

    def _sync_locked(self, target: tuple[int, int]) -> None:
        """Wait until the bytes up to target are durable, running the fdatasync when nobody else is."""
        while not self._durable(target):
            if self._failure is not None:
                raise StateLogFailedError(f"{self.path}: an earlier fdatasync failed ({self._failure}); this save "
                                          "is not durable")
            if self._syncing:
                self._cond.wait()
                continue
            if self._end >= max(self.min_compact_bytes, COMPACT_RATIO * self._live_bytes):
                self._rewrite_locked()
                continue
            self._fdatasync_locked()

    def _durable(self, target: tuple[int, int]) -> bool:
        generation, end = self._synced
        return target[0] < generation or end >= target[1]

    def _fdatasync_locked(self) -> None:
        """One fdatasync for everything written so far, with the lock released so others keep appending."""
        fd, generation, end = self._fd, self._generation, self._end
        assert fd is not None
        self._syncing = True
        self._cond.release()
        try:
            self.fs.fdatasync(fd)
            failure = None
        except OSError as exc:
            failure = exc
        finally:
            self._cond.acquire()
            self._syncing = False
            self._cond.notify_all()
        self.fdatasyncs += 1
        if failure is not None:
            if generation == self._generation:
                self._failure = failure
            logger.error("%s: fdatasync failed (%s): the Raft state saves since the last good one may be lost; "
                         "every group's save fails until the file is rewritten", self.path, failure)
            raise failure
        if generation == self._generation and end > self._synced[1]:
            self._synced = (generation, end)

    # ---------------------------------------------------------------------------------- rewriting

    def _recover_locked(self) -> None:
        if self._failure is not None:
            self._rewrite_locked()

    def recover(self) -> None:
        """After a failure: rewrite the file from memory; raises OSError while the disk still fails."""
        with self._cond:
            while self._syncing:
                self._cond.wait()
            self._recover_locked()

    def _rewrite_locked(self) -> None:
        """Replace the file by one record per group. Holds the lock throughout (appenders wait: it is rare),
        and waits for a running fdatasync first, since it closes the descriptor that one uses."""
        while self._syncing:
            self._cond.wait()
        fs = self.fs
        records = {group: _encode(group, state) for group, state in sorted(self._states.items())}
        self._record_bytes = {group: len(record) for group, record in records.items()}
        body = b"".join(records.values())
        temp = self.path.with_name(self.path.name + TEMP_SUFFIX)
        fd = fs.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, body, fs)
            fs.fsync(fd)
            fs.replace(temp, self.path)
            fs.fsync_dir(self.path.parent)
        except OSError as exc:
            fs.close(fd)
            self._failure = self._failure or exc
            raise
        if self._fd is not None:
            fs.close(self._fd)
        self._fd = fd
        self._end = len(body)
        self._live_bytes = len(body)
        self._generation += 1
        self._synced = (self._generation, self._end)
        if self._failure is not None:
            logger.warning("%s: rewritten after the failed fdatasync; Raft state saves work again", self.path)
        self._failure = None
        self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            while self._syncing:
                self._cond.wait()
            if self._fd is not None:
                self.fs.close(self._fd)
                self._fd = None


def _encode(group: str, state: ReplicaState | None) -> bytes:
    body = json.dumps({"group": group, "state": _fields(state) if state is not None else None},
                      separators=(",", ":")).encode()
    covered = _LENGTH.pack(len(body)) + body
    return RECORD_MAGIC + _CRC.pack(rec.crc32c(covered)) + covered


def _fields(state: ReplicaState) -> dict[str, object]:
    """The state's fields in declaration order, as dataclasses.asdict gives them, built directly: asdict copies
    recursively and cost half of every save on the event loop. ``catching_up`` is written only while true (rare),
    so every other record keeps the bytes it had before the field existed; a missing one reads as false."""
    fields: dict[str, object] = {
        "term": state.term, "vote": state.vote, "commit_offset": state.commit_offset,
        "start_prev_term": state.start_prev_term, "voters": state.voters,
        "learners": state.learners, "log_start_offset": state.log_start_offset}
    if state.catching_up:
        fields["catching_up"] = True
    return fields


def _decode(body: bytes) -> tuple[str, ReplicaState | None]:
    doc = json.loads(body)
    group = doc["group"]
    if not isinstance(group, str):
        raise TypeError("group is not a string")
    fields = doc["state"]
    if fields is None:
        return group, None
    fields["voters"] = tuple(fields["voters"])
    fields["learners"] = tuple(fields["learners"])
    return group, ReplicaState(**fields)


class SharedStateSync:
    """Group commit for saves made from the event loop, with no worker thread held per save.

    A save from the thread pool holds a worker until its fdatasync is done, so concurrent saves share an
    fdatasync only as widely as the pool is large: with 8 workers, a failover of thousands of groups (each a
    vote or a new term to save) made one fdatasync per 8 saves and elected about 70 leaders a second. Here the
    event loop writes each record at once (RaftStateLog.append) and waits on a future; one job at a time in the
    pool runs the fdatasync for everything written so far and then releases every save it covered, so a
    thousand saves made while one fdatasync runs share the next one."""

    def __init__(self, log: RaftStateLog) -> None:
        self._log = log
        # (target, future, executor) per save not yet known durable, in the order written.
        self._waiting: list[tuple[tuple[int, int], asyncio.Future[None], Executor]] = []
        self._job: asyncio.Future[None] | None = None

    async def save(self, group: str, state: ReplicaState, executor: Executor) -> None:
        """Make group's state durable; returns once an fdatasync that began after its write has succeeded."""
        target = self._log.append(group, replace(state))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((target, future, executor))
        if self._job is None:
            self._start()
        await future

    def _start(self) -> None:
        target, _, executor = self._waiting[-1]  # the newest: syncing to it covers every earlier one
        try:
            job = asyncio.get_running_loop().run_in_executor(executor, self._log.sync_to, target)
        except RuntimeError as exc:  # the pool is shut down: the broker is closing
            self._fail_up_to(target, exc)
            return
        self._job = job
        job.add_done_callback(lambda done: self._synced(done, target))

    def _synced(self, job: asyncio.Future[None], synced_to: tuple[int, int]) -> None:
        self._job = None
        failure: BaseException | None = asyncio.CancelledError() if job.cancelled() else job.exception()
        still = []
        for waiter in self._waiting:
            target, future, _ = waiter
            if future.done():
                continue  # its replica stopped waiting (closed)
            if failure is None and self._log.is_durable(target):
                future.set_result(None)
            elif failure is not None and target <= synced_to:
                self._fail(future, failure)  # the fdatasync meant to cover it failed, or never ran (shutdown)
            else:
                still.append(waiter)  # written after the fdatasync began: the next one covers it
        self._waiting = still
        if still:
            self._start()

    def _fail_up_to(self, synced_to: tuple[int, int], failure: BaseException) -> None:
        for target, future, _ in self._waiting:
            if not future.done() and target <= synced_to:
                self._fail(future, failure)
        self._waiting = [w for w in self._waiting if not w[1].done()]

    @staticmethod
    def _fail(future: asyncio.Future[None], failure: BaseException) -> None:
        if isinstance(failure, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(failure)


class GroupStateFile:
    """One group's view of the broker's state log, with the interface Replica uses (load, save, close,
    last_saved), so the runtime does not know whether its state shares a file.

    A group whose state still sits in its own file of an older version (legacy_path) is moved into the
    log at the first load: saved there durably, then the old file is removed."""

    def __init__(self, log: RaftStateLog, group: str, legacy_path: Path | None = None) -> None:
        self._log = log
        self.group = group
        self.legacy_path = legacy_path
        self.last_saved: ReplicaState | None = None

    def load(self, default_membership: Membership) -> ReplicaState:
        self._log.recover()  # a replica reopened after a failed fdatasync needs a trustworthy file
        state = self._log.state_of(self.group)
        if state is None and self.legacy_path is not None and self._log.fs.exists(self.legacy_path):
            state = self._move_legacy(default_membership)
        if state is None:
            state = ReplicaState(voters=tuple(sorted(default_membership.voters)),
                                 learners=tuple(sorted(default_membership.learners)))
            # Nothing saved: the fresh state needs no write (it is what a missing record means).
        self.last_saved = replace(state)
        return state

    def _move_legacy(self, default_membership: Membership) -> ReplicaState:
        assert self.legacy_path is not None
        old = ReplicaStateFile(self.legacy_path, self._log.fs)
        try:
            state = old.load(default_membership)
        finally:
            old.close()
        self._log.save(self.group, state)
        self._log.fs.unlink(self.legacy_path, missing_ok=True)
        logger.info("%s: Raft state moved into the broker's state log %s", self.legacy_path, self._log.path)
        return state

    def save(self, state: ReplicaState) -> None:
        self._log.save(self.group, state)
        self.last_saved = replace(state)

    async def save_soon(self, state: ReplicaState, executor: Executor) -> None:
        """save() from the event loop, sharing its fdatasync with every other group's (SharedStateSync)."""
        await self._log.shared_sync.save(self.group, state, executor)
        self.last_saved = replace(state)

    def close(self) -> None:
        """Nothing to release: the log is the broker's, closed with it."""
