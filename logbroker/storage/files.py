"""Every file access of the storage engine and the Raft state file, through one injectable object.

``FileSystem`` is the real OS, and ``OS_FILES`` its one instance, the default everywhere. A partition log
(and its segments and indexes), the leader-epoch file and the Raft state file take an ``fs`` argument, so
a simulation can run the production code over an in-memory disk that loses unsynced writes on a crash,
tears them, fails fsyncs or fills up (tests/raft/runtime_sim/disk.py). Nothing else may open, write,
sync, list or delete files of a partition except through it.

Plus small helpers on top: complete writes and reads, directory fsync, atomic replace-by-rename.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from logbroker.storage.filenames import TEMP_SUFFIX, WRITE_PROBE_FILE

# What map_fd / map_file give: an mmap for the real OS, any bytes-like buffer for a simulated disk.
Buffer = bytes | bytearray | memoryview | mmap.mmap


class FileSystem:
    """The real OS. Descriptors are plain ints. Every os function is looked up at call time on purpose, so
    tests can still simulate a full disk or a failing fsync by patching os.write or os.fsync."""

    # ------------------------------------------------------------------------------ descriptors
    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        return os.write(fd, data)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fstat(self, fd: int) -> os.stat_result:
        """Callers read st_size and st_mtime_ns only."""
        return os.fstat(fd)

    @contextmanager
    def map_fd(self, fd: int, size: int) -> Iterator[Buffer]:
        """The first size bytes of an open file, read-only, as a buffer (an mmap)."""
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as buf:
            yield buf

    @contextmanager
    def map_file(self, path: Path) -> Iterator[Buffer]:
        """A whole (non-empty) file, read-only, as a buffer (an mmap)."""
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            yield buf

    # ------------------------------------------------------------------------------ paths
    def exists(self, path: Path) -> bool:
        return path.exists()

    def getsize(self, path: Path) -> int:
        return os.path.getsize(path)

    def read_bytes(self, path: Path) -> bytes:
        return path.read_bytes()

    def listdir(self, directory: Path) -> list[str]:
        return os.listdir(directory)

    def mkdir(self, directory: Path) -> None:
        """Create directory and its parents; nothing if it exists."""
        directory.mkdir(parents=True, exist_ok=True)

    def unlink(self, path: Path, missing_ok: bool = False) -> None:
        path.unlink(missing_ok=missing_ok)

    def replace(self, source: Path, target: Path) -> None:
        os.replace(source, target)

    def rmtree(self, directory: Path) -> None:
        shutil.rmtree(directory)

    def fsync_dir(self, directory: Path) -> None:
        """Make file creations, renames and deletions in the directory durable."""
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


OS_FILES = FileSystem()


def write_all(fd: int, data: bytes | bytearray | memoryview, fs: FileSystem = OS_FILES) -> None:
    """fs.write until everything is written (a full disk shows up as a short write, then ENOSPC)."""
    view = memoryview(data)
    while view:
        written = fs.write(fd, view)
        view = view[written:]


def read_all(fd: int, fs: FileSystem = OS_FILES) -> bytes:
    size = fs.fstat(fd).st_size
    chunks = []
    position = 0
    while position < size:
        chunk = fs.pread(fd, size - position, position)
        if not chunk:
            break
        chunks.append(chunk)
        position += len(chunk)
    return b"".join(chunks)


def fsync_dir(directory: Path, fs: FileSystem = OS_FILES) -> None:
    """Make file creations, renames and deletions in the directory durable."""
    fs.fsync_dir(directory)


def _libc_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not Linux (or no syncfs in this libc)
        return None


_SYNCFS = _libc_syncfs()


class FileSystemSync:
    """One syncfs(2) for many files: opened before they are written, sync() then makes everything written to the
    directory's file system durable, every file's bytes and every creation and rename (creating thousands of
    partitions cost three fsyncs each). The descriptor is opened first because Linux (5.8 and later) reports
    the write-back errors seen since it was opened: one opened after the writes could miss an error met while
    the kernel wrote some back early. Where syncfs is unavailable, sync() returns False and does nothing: the
    caller fsyncs file by file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd = os.open(directory, os.O_RDONLY) if _SYNCFS is not None else -1

    def sync(self) -> bool:
        if self._fd < 0 or _SYNCFS is None:
            return False
        if _SYNCFS(self._fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs of the file system holding {self.directory}: {os.strerror(err)}")
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def fsync_file(path: Path, fs: FileSystem = OS_FILES) -> None:
    """Make a file's bytes durable (its name needs its directory's fsync too)."""
    fd = fs.open(path, os.O_RDONLY)
    try:
        fs.fsync(fd)
    finally:
        fs.close(fd)


def write_file_atomically(path: Path, data: bytes, durable: bool, fs: FileSystem = OS_FILES) -> None:
    """Replace path by a complete new copy: readers see the old or the new content, never a mix."""
    temp = path.with_name(path.name + TEMP_SUFFIX)
    fd = fs.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data, fs)
        if durable:
            fs.fsync(fd)
    finally:
        fs.close(fd)
    fs.replace(temp, path)
    if durable:
        fs.fsync_dir(path.parent)


PROBE_BYTES = 1 << 20


def probe_write(directory: Path, size_bytes: int = PROBE_BYTES, fs: FileSystem = OS_FILES) -> None:
    """Write and fsync size_bytes in directory, then remove them: raises OSError (ENOSPC, EIO, ...) when the
    device cannot take a write of that size now. Used to learn when a full disk has room again."""
    path = directory / WRITE_PROBE_FILE
    fd = fs.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, bytes(size_bytes), fs)
        fs.fsync(fd)
    finally:
        fs.close(fd)
        fs.unlink(path, missing_ok=True)
