"""The durable log as the Raft core sees it: a read-only Protocol the runtime implements.

The core never writes storage itself. It asks for writes through Ready (reset, truncate, append) and reads
back what the runtime has applied. Reads must reflect every Ready the runtime has handled (advance()d).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from logbroker.raft.types import Entry


class LogStorage(Protocol):
    @property
    def first_offset(self) -> int:
        """Base offset of the oldest entry kept (or where the next entry goes, if the log is empty)."""
        ...

    @property
    def last_offset(self) -> int:
        """Last offset of the newest entry; first_offset - 1 when the log is empty."""
        ...

    def term_at(self, offset: int) -> int | None:
        """Term of the entry covering ``offset``.

        For offset == first_offset - 1 this is the term of the entry just before the log start (NO_TERM
        for a log that starts at 0). None for any other offset outside [first_offset, last_offset].
        """
        ...

    def entries(self, from_offset: int, max_bytes: int) -> Sequence[Entry]:
        """Entries from the one covering ``from_offset`` onward, at most ``max_bytes`` of them by
        Entry.size_bytes, but always at least one when from_offset <= last_offset."""
        ...
