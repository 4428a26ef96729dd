"""Small file helpers: complete writes and reads, directory fsync, atomic replace-by-rename."""

from __future__ import annotations

import os
from pathlib import Path

from logbroker.storage.filenames import TEMP_SUFFIX, WRITE_PROBE_FILE


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until everything is written (a full disk shows up as a short write, then ENOSPC).

    os.write is looked up at call time on purpose, so tests can simulate a full disk by patching it.
    """
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    position = 0
    while position < size:
        chunk = os.pread(fd, size - position, position)
        if not chunk:
            break
        chunks.append(chunk)
        position += len(chunk)
    return b"".join(chunks)


def fsync_dir(directory: Path) -> None:
    """Make file creations, renames and deletions in the directory durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, data: bytes, durable: bool) -> None:
    """Replace path by a complete new copy: readers see the old or the new content, never a mix."""
    temp = path.with_name(path.name + TEMP_SUFFIX)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    if durable:
        fsync_dir(path.parent)


PROBE_BYTES = 1 << 20


def probe_write(directory: Path, size_bytes: int = PROBE_BYTES) -> None:
    """Write and fsync size_bytes in directory, then remove them: raises OSError (ENOSPC, EIO, ...) when the
    device cannot take a write of that size now. Used to learn when a full disk has room again."""
    path = directory / WRITE_PROBE_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, bytes(size_bytes))
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
