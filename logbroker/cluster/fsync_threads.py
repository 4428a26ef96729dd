"""fdatasync off the event loop, in native threads that never take the GIL (the C file says why they pay).

The threads themselves are a storage primitive (logbroker/storage/_fsyncthreads.c: plain C, no event loop);
this wrapper answers on asyncio, so it lives with the Raft runtime that awaits it, and storage stays free of
I/O frameworks (DESIGN.md section 2).

    syncer = FsyncThreads.start(threads=4)   # None where the C extension was not built
    await syncer.fdatasync(fs, fd)           # raises OSError as os.fdatasync would
    syncer.close()

The file's descriptor is duplicated for the job, and the thread closes the copy once synced: the file may be
closed (a replica stopped, a segment deleted) while its fsync runs, and its number reused by another file,
without the fsync landing on that file. fdatasync on the copy flushes the same file.

Only real files can go this way (``supports(fs)``): the runtime simulation's file layer keeps its files in
memory, and its fault injection must see every fsync, so a simulated replica is given an executor-backed
syncer instead (tests/raft/runtime_sim).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Protocol

from logbroker.storage.files import OS_FILES, FileSystem

try:
    from logbroker.storage._fsyncthreads import FsyncThreads as _NativeThreads
except ImportError:  # built without a C compiler: the broker fsyncs in its Python pool
    _NativeThreads = None

logger = logging.getLogger(__name__)


class Syncer(Protocol):
    """What Replica needs to fsync a file without blocking the event loop."""

    def supports(self, fs: FileSystem) -> bool: ...

    def fdatasync(self, fs: FileSystem, fd: int) -> asyncio.Future[None]: ...


class FsyncThreads:
    """One set of native fsync threads, answering on the event loop that first used it."""

    def __init__(self, native: object) -> None:
        self._native = native
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._next_token = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        # fsyncs the threads finished, and how many of those failed (the broker's metrics read both)
        self.completed = 0
        self.failed = 0

    @classmethod
    def start(cls, threads: int) -> FsyncThreads | None:
        if _NativeThreads is None:
            logger.info("the native fsync threads are not built (no C compiler at install); fsyncs run in the "
                        "broker's Python thread pool")
            return None
        return cls(_NativeThreads(threads))

    @staticmethod
    def supports(fs: FileSystem) -> bool:
        return fs is OS_FILES

    def fdatasync(self, fs: FileSystem, fd: int) -> asyncio.Future[None]:
        assert fs is OS_FILES, "only real files' descriptors can be synced by the native threads"
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self._native.fileno(), self._collect)  # type: ignore[attr-defined]
        if loop is not self._loop:  # its answers go to the first loop's reader: a waiter here would never hear
            raise RuntimeError("FsyncThreads answers on the event loop that first used it, not on another")
        future: asyncio.Future[None] = loop.create_future()
        copy = os.dup(fd)
        self._next_token += 1
        try:
            self._native.submit(copy, self._next_token)  # type: ignore[attr-defined]
        except BaseException:
            os.close(copy)
            raise
        self._waiting[self._next_token] = future
        return future

    def _collect(self) -> None:
        for token, code in self._native.completed():  # type: ignore[attr-defined]
            self.completed += 1
            self.failed += bool(code)
            future = self._waiting.pop(token)
            if future.done():
                continue  # its waiter went away (a replica closed); the fsync ran all the same
            if code:
                future.set_exception(OSError(code, f"fdatasync failed: {os.strerror(code)}"))
            else:
                future.set_result(None)

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        """Finish the fsyncs already asked for, answer their waiters, and stop the threads."""
        self._native.close()  # type: ignore[attr-defined]
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._native.fileno())  # type: ignore[attr-defined]
        self._collect()
        for future in self._waiting.values():  # none should be left: close() let every job finish
            if not future.done():
                future.set_exception(OSError(errno.ECANCELED, "the broker's fsync threads stopped"))
        self._waiting.clear()
