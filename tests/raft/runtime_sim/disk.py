"""An in-memory disk behind logbroker.storage.files.FileSystem, with the faults a real one has.

Every file has two images: ``data``, what reads see (the page cache), and ``durable``, what survives a power
cut, plus the writes and truncations made since its last fsync, in order. Directories likewise keep their
entries and the creations, renames and deletions not yet made durable by an fsync of the directory.

Faults:
  - power_cut(): each file keeps its durable image plus a random prefix of its unsynced writes, the last of
    them possibly torn (a prefix of its bytes); each directory keeps a random prefix of its unsynced
    changes. Open descriptors die.
  - kill(): the process dies, the page cache does not: nothing is lost (yet), descriptors die.
  - fsync errors: fsync / fdatasync / a directory fsync fail with EIO, with Linux's semantics: the unsynced
    writes are then written back in part or not at all, yet the page cache keeps showing them, and a later
    fsync does not retry them (the "fsyncgate" behaviour).
  - a full disk: a write that would grow a file writes part of its bytes (maybe none), then fails ENOSPC.

Descriptors are ints from 1000 up. Paths are pathlib.Path objects; nothing here touches the real disk.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from logbroker.storage.files import FileSystem

_WRITE, _TRUNCATE = "w", "t"


class _Stat(NamedTuple):
    st_size: int
    st_mtime_ns: int


@dataclass(eq=False)
class _File:
    data: bytearray = field(default_factory=bytearray)
    durable: bytearray = field(default_factory=bytearray)
    pending: list[tuple[str, int, bytes]] = field(default_factory=list)  # (kind, offset or size, bytes)
    mtime_ns: int = 0

    def apply(self, image: bytearray, op: tuple[str, int, bytes], keep: int | None = None) -> None:
        kind, where, chunk = op
        if kind == _TRUNCATE:
            if where < len(image):
                del image[where:]
            else:
                image.extend(bytes(where - len(image)))
            return
        if keep is not None:
            chunk = chunk[:keep]
        if where > len(image):
            image.extend(bytes(where - len(image)))
        image[where:where + len(chunk)] = chunk

    def sync(self) -> None:
        for op in self.pending:
            self.apply(self.durable, op)
        self.pending.clear()

    def write_back_part(self, rng: random.Random) -> None:
        """Some prefix of the unsynced writes reaches the disk (the last maybe torn); the rest never will."""
        count = rng.randint(0, len(self.pending))
        for op in self.pending[:count]:
            self.apply(self.durable, op)
        if count < len(self.pending) and rng.random() < 0.5:
            op = self.pending[count]
            if op[0] == _WRITE and len(op[2]) > 1:
                self.apply(self.durable, op, keep=rng.randint(1, len(op[2]) - 1))
        self.pending.clear()


@dataclass(eq=False)
class _Dir:
    entries: dict[str, _File] = field(default_factory=dict)
    durable: dict[str, _File] = field(default_factory=dict)
    pending: list[tuple[tuple[str, _File | None], ...]] = field(default_factory=list)  # atomic change sets

    def change(self, *changes: tuple[str, _File | None]) -> None:
        for name, target in changes:
            if target is None:
                self.entries.pop(name, None)
            else:
                self.entries[name] = target
        self.pending.append(changes)

    def sync(self) -> None:
        self.durable = dict(self.entries)
        self.pending.clear()

    def write_back_part(self, rng: random.Random) -> None:
        for changes in self.pending[:rng.randint(0, len(self.pending))]:
            for name, target in changes:
                if target is None:
                    self.durable.pop(name, None)
                else:
                    self.durable[name] = target
        self.pending.clear()


@dataclass(eq=False)
class _Descriptor:
    file: _File
    append: bool
    position: int = 0  # where write() writes when not O_APPEND


@dataclass
class DiskStats:
    fsyncs: int = 0
    fsync_errors: int = 0
    enospc: int = 0
    power_cuts: int = 0
    torn_files: int = 0  # files a power cut left with unsynced bytes, in part or whole


class SimDisk(FileSystem):
    """One node's disk. ``clock_ns`` stamps modification times; ``rng`` draws every fault's details."""

    def __init__(self, rng: random.Random, clock_ns: Callable[[], int]) -> None:
        self._rng = rng
        self._clock_ns = clock_ns
        self._dirs: dict[Path, _Dir] = {}
        self._fds: dict[int, _Descriptor] = {}
        self._next_fd = 1000
        self.fsync_error_rate = 0.0  # chance that an fsync fails with EIO
        self.full = False  # writes that grow a file fail with ENOSPC
        self.stats = DiskStats()

    # ------------------------------------------------------------------------------------- faults
    def power_cut(self) -> None:
        """The machine loses power: only what was synced survives, plus a random prefix of the rest."""
        self.stats.power_cuts += 1
        self._fds.clear()
        files: dict[int, _File] = {}
        for directory in self._dirs.values():
            directory.write_back_part(self._rng)
            directory.entries = dict(directory.durable)
            for file in directory.durable.values():
                files[id(file)] = file
        for file in files.values():
            if file.pending:
                before = bytes(file.durable)
                file.write_back_part(self._rng)
                if file.durable != before:
                    self.stats.torn_files += 1
            file.data = bytearray(file.durable)

    def kill(self) -> None:
        """The process dies; the kernel keeps the page cache and will write it back."""
        self._fds.clear()

    def sync_all(self) -> None:
        """Everything written so far reaches the disk (the kernel's writeback after a while)."""
        for directory in self._dirs.values():
            directory.sync()
            for file in directory.entries.values():
                file.sync()

    def _maybe_fail_fsync(self, write_back: Callable[[random.Random], None]) -> None:
        self.stats.fsyncs += 1
        if self.fsync_error_rate and self._rng.random() < self.fsync_error_rate:
            self.stats.fsync_errors += 1
            write_back(self._rng)
            raise OSError(errno.EIO, "Input/output error (simulated fsync failure)")

    # ------------------------------------------------------------------------------------- lookup
    def _dir(self, directory: Path) -> _Dir:
        found = self._dirs.get(directory)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "No such directory (simulated disk)", str(directory))
        return found

    def _lookup(self, path: Path) -> _File | None:
        return self._dir(path.parent).entries.get(path.name)

    def _descriptor(self, fd: int) -> _Descriptor:
        found = self._fds.get(fd)
        if found is None:
            raise OSError(errno.EBADF, "Bad file descriptor (simulated disk)")
        return found

    def _file(self, fd: int) -> _File:
        return self._descriptor(fd).file

    # ------------------------------------------------------------------------------------- descriptors
    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        if path in self._dirs:
            raise IsADirectoryError(errno.EISDIR, "the simulated disk fsyncs directories by fsync_dir only", str(path))
        directory = self._dir(path.parent)
        file = directory.entries.get(path.name)
        if file is None:
            if not flags & os.O_CREAT:
                raise FileNotFoundError(errno.ENOENT, "No such file (simulated disk)", str(path))
            file = _File(mtime_ns=self._clock_ns())
            directory.change((path.name, file))
        elif flags & os.O_TRUNC and file.data:
            self._truncate(file, 0)
        fd = self._next_fd
        self._next_fd += 1
        self._fds[fd] = _Descriptor(file, bool(flags & os.O_APPEND))
        return fd

    def close(self, fd: int) -> None:
        self._descriptor(fd)
        del self._fds[fd]

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        descriptor = self._descriptor(fd)
        file = descriptor.file
        offset = len(file.data) if descriptor.append else descriptor.position
        written = self._write_at(file, bytes(data), offset)
        descriptor.position = offset + written
        return written

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        descriptor = self._descriptor(fd)
        if descriptor.append:  # Linux: pwrite on an O_APPEND descriptor appends, whatever the offset (pwrite(2))
            offset = len(descriptor.file.data)
        return self._write_at(descriptor.file, bytes(data), offset)

    def _write_at(self, file: _File, chunk: bytes, offset: int) -> int:
        if self.full and offset + len(chunk) > len(file.data):
            room = max(0, len(file.data) - offset)
            if room == 0 and self._rng.random() < 0.5:
                self.stats.enospc += 1
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")
            # A short write: what fits in the blocks the file already has, and maybe a little more.
            chunk = chunk[:room + self._rng.randint(0, max(0, len(chunk) - room - 1))]
            if not chunk:
                self.stats.enospc += 1
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        op = (_WRITE, offset, chunk)
        file.apply(file.data, op)
        file.pending.append(op)
        file.mtime_ns = self._clock_ns()
        return len(chunk)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        file = self._file(fd)
        return bytes(file.data[offset:offset + size])

    def ftruncate(self, fd: int, size: int) -> None:
        file = self._file(fd)
        self._truncate(file, size)

    def _truncate(self, file: _File, size: int) -> None:
        op = (_TRUNCATE, size, b"")
        file.apply(file.data, op)
        file.pending.append(op)
        file.mtime_ns = self._clock_ns()

    def fsync(self, fd: int) -> None:
        file = self._file(fd)
        self._maybe_fail_fsync(file.write_back_part)
        file.sync()

    def fdatasync(self, fd: int) -> None:
        self.fsync(fd)

    def fstat(self, fd: int) -> _Stat:  # type: ignore[override]
        file = self._file(fd)
        return _Stat(len(file.data), file.mtime_ns)

    @contextmanager
    def map_fd(self, fd: int, size: int) -> Iterator[bytes]:
        file = self._file(fd)
        if size > len(file.data):
            raise ValueError("mmap length is greater than file size")
        yield bytes(file.data[:size])

    @contextmanager
    def map_file(self, path: Path) -> Iterator[bytes]:
        file = self._lookup(path)
        if file is None:
            raise FileNotFoundError(errno.ENOENT, "No such file (simulated disk)", str(path))
        yield bytes(file.data)

    # ------------------------------------------------------------------------------------- paths
    def exists(self, path: Path) -> bool:
        if path in self._dirs:
            return True
        directory = self._dirs.get(path.parent)
        return directory is not None and path.name in directory.entries

    def getsize(self, path: Path) -> int:
        file = self._lookup(path)
        if file is None:
            raise FileNotFoundError(errno.ENOENT, "No such file (simulated disk)", str(path))
        return len(file.data)

    def read_bytes(self, path: Path) -> bytes:
        file = self._lookup(path)
        if file is None:
            raise FileNotFoundError(errno.ENOENT, "No such file (simulated disk)", str(path))
        return bytes(file.data)

    def listdir(self, directory: Path) -> list[str]:
        names = sorted(self._dir(directory).entries)
        names += sorted(p.name for p in self._dirs if p.parent == directory)
        return names

    def mkdir(self, directory: Path) -> None:
        """Directories are created durable at once (the simulation makes them before it starts)."""
        for path in (*reversed(directory.parents), directory):
            self._dirs.setdefault(path, _Dir())

    def unlink(self, path: Path, missing_ok: bool = False) -> None:
        directory = self._dir(path.parent)
        if path.name not in directory.entries:
            if missing_ok:
                return
            raise FileNotFoundError(errno.ENOENT, "No such file (simulated disk)", str(path))
        directory.change((path.name, None))

    def replace(self, source: Path, target: Path) -> None:
        if source.parent != target.parent:
            raise OSError(errno.EXDEV, "the simulated disk renames within a directory only")
        directory = self._dir(source.parent)
        file = directory.entries.get(source.name)
        if file is None:
            raise FileNotFoundError(errno.ENOENT, "No such file (simulated disk)", str(source))
        directory.change((target.name, file), (source.name, None))

    def rmtree(self, directory: Path) -> None:
        for path in [p for p in self._dirs if p == directory or directory in p.parents]:
            del self._dirs[path]

    def fsync_dir(self, directory: Path) -> None:
        found = self._dir(directory)
        self._maybe_fail_fsync(found.write_back_part)
        found.sync()

    # ------------------------------------------------------------------------------------- inspection
    def file_names(self, directory: Path) -> list[str]:
        return sorted(self._dir(directory).entries)

    def unsynced_bytes(self) -> int:
        return sum(len(op[2]) for d in self._dirs.values() for f in d.entries.values() for op in f.pending)
