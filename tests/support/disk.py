"""A directory on a size-limited file system, so a broker's disk can really fill and be freed again.

A tmpfs of a fixed size is mounted at the directory (this needs root, or CAP_SYS_ADMIN; the tests that
use it skip with the reason where a mount is refused). ``fill()`` writes a filler file until the device
says ENOSPC; ``free()`` removes it, as an operator freeing space would.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

FILLER_FILE = "filler.bin"
FILL_CHUNK_BYTES = 1 << 20


def mount_problem() -> str | None:
    """None when a tmpfs can be mounted here, else why not (for pytest.skip)."""
    with tempfile.TemporaryDirectory() as probe:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", probe],
                                capture_output=True, text=True)
        if result.returncode != 0:
            return f"cannot mount a size-limited tmpfs ({result.stderr.strip() or result.returncode}); needs root"
        subprocess.run(["umount", probe], check=True)
    return None


class SizeLimitedDir:
    def __init__(self, path: Path, size_bytes: int) -> None:
        self.path = path
        self.size_bytes = size_bytes
        self.mounted = False

    def mount(self) -> SizeLimitedDir:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_bytes}", "tmpfs", str(self.path)],
                       check=True, capture_output=True)
        self.mounted = True
        return self

    def fill(self) -> int:
        """Write until the device is full; returns the bytes written. Whatever else writes there now fails."""
        written = 0
        chunk = b"\0" * FILL_CHUNK_BYTES
        fd = os.open(self.path / FILLER_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            while True:
                try:
                    written += os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    chunk = chunk[: len(chunk) // 2]  # top up the last bytes too
                    if not chunk:
                        return written
        finally:
            os.close(fd)

    def free(self) -> None:
        (self.path / FILLER_FILE).unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted:
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["umount", "-l", str(self.path)], check=True, capture_output=True)
            self.mounted = False


def bytes_of_files(paths: Iterable[Path]) -> int:
    """Total size of the listed files; one deleted between the listing and its stat (retention or a
    snapshot cutting segments while a test watches) counts as gone, which it is."""
    total = 0
    for path in paths:
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            continue
    return total
