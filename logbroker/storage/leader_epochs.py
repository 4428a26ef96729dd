"""The leader-epoch cache of a partition log: where each epoch begins (Kafka's leader-epoch-checkpoint).

Every batch carries the epoch of the leader that appended it (partitionLeaderEpoch; in logbroker the
Raft term), and epochs never decrease along the log. The cache keeps one (epoch, start offset) entry per
epoch present, so the epoch of an offset, and where an epoch ends (OffsetForLeaderEpoch), are answered
from memory: Raft's log matching asks for terms many times per election and per conflicting append, and
reading batch headers from disk for each was the slow part.

The file ``leader-epoch-checkpoint`` (Kafka's layout: a version line, a count line, then one
``epoch start_offset`` line per entry) is rewritten whenever entries are cut, and soon after an append adds
an epoch (the log's owner calls PartitionLog.save_epochs off the write path, and close() does). It is
written atomically but not fsynced: at open the log checks it against the segments (each entry's batch
must carry its epoch) and scans batch headers from the last entry on, so a stale or lost file costs a
scan, never a wrong answer. Bad files are rebuilt from a scan of the whole log.

The appending thread changes the cache while the event loop reads it, so every change replaces the
(epochs, starts) pair at once rather than editing the lists in place (changes come once per epoch).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from logbroker.storage import filenames
from logbroker.storage.files import OS_FILES, FileSystem, write_file_atomically

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 0
UNDEFINED_EPOCH = -1
UNDEFINED_OFFSET = -1


class LeaderEpochCache:
    def __init__(self, directory: Path, name: str, fs: FileSystem = OS_FILES) -> None:
        self.path = directory / filenames.LEADER_EPOCH_CHECKPOINT_FILE
        self.name = name
        self.fs = fs
        self._table: tuple[list[int], list[int]] = ([], [])  # (epochs, their start offsets), replaced whole

    # ============================================================================ queries
    def entries(self) -> list[tuple[int, int]]:
        epochs, starts = self._table
        return list(zip(epochs, starts, strict=True))

    def latest_epoch(self) -> int:
        epochs = self._table[0]
        return epochs[-1] if epochs else UNDEFINED_EPOCH

    def epoch_at(self, offset: int) -> int | None:
        """The epoch of the batch holding offset (the caller checks the offset is in the log)."""
        epochs, starts = self._table
        index = bisect.bisect_right(starts, offset) - 1
        return epochs[index] if index >= 0 else None

    def end_offset_for(self, epoch: int, log_end: int) -> tuple[int, int]:
        """Kafka's OffsetForLeaderEpoch answer: (the largest epoch <= epoch present here, the first offset
        after it: the next epoch's start, or the log end for the latest); undefined for an epoch older than
        every entry."""
        epochs, starts = self._table
        index = bisect.bisect_right(epochs, epoch) - 1
        if index < 0:
            return UNDEFINED_EPOCH, UNDEFINED_OFFSET
        end = starts[index + 1] if index + 1 < len(starts) else log_end
        return epochs[index], end

    # ============================================================================ changes
    def assign(self, epoch: int, start_offset: int) -> bool:
        """Batches of epoch begin at start_offset (called for every append's epoch changes); True if new."""
        epochs, starts = self._table
        if epochs and epoch <= epochs[-1]:
            assert epoch == epochs[-1], (
                f"{self.name}: epoch {epoch} appended at offset {start_offset} after epoch {epochs[-1]}: "
                "epochs never decrease along a log")
            return False
        assert not starts or start_offset > starts[-1], (self.name, epoch, start_offset)
        self._table = ([*epochs, epoch], [*starts, start_offset])
        return True

    def cut_from(self, end_offset: int) -> bool:
        """The log now ends at end_offset: forget the epochs that began at or after it."""
        epochs, starts = self._table
        keep = bisect.bisect_left(starts, end_offset)
        if keep == len(starts):
            return False
        self._table = (epochs[:keep], starts[:keep])
        return True

    def cut_before(self, start_offset: int) -> bool:
        """The log now starts at start_offset: the epoch holding it begins there, older ones are gone."""
        epochs, starts = self._table
        index = bisect.bisect_right(starts, start_offset) - 1
        if index < 0 or (index == 0 and starts[0] == start_offset):
            return False
        self._table = (epochs[index:], [start_offset, *starts[index + 1:]])
        return True

    def clear(self) -> None:
        self._table = ([], [])

    # ============================================================================ the file
    def save(self) -> None:
        entries = self.entries()
        lines = [str(CHECKPOINT_VERSION), str(len(entries))]
        lines += [f"{epoch} {start}" for epoch, start in entries]
        write_file_atomically(self.path, ("\n".join(lines) + "\n").encode("ascii"), False, self.fs)

    def load(self, log_start: int, log_end: int, epoch_on_disk: Callable[[int], int],
             scan_from: Callable[[int], Iterable[tuple[int, int]]]) -> None:
        """Read the file, keep the entries the log confirms, and scan for what it lacks. epoch_on_disk(offset)
        reads a batch header; scan_from(offset) yields (base offset, epoch) of every batch from offset."""
        entries = self._read_file()
        confirmed = self._confirmed(entries, log_start, log_end, epoch_on_disk) if entries is not None else None
        if confirmed is None:
            confirmed = []
        self.clear()
        for epoch, start in confirmed:
            self.assign(epoch, start)
        starts = self._table[1]
        for base_offset, epoch in scan_from(starts[-1] if starts else log_start):
            if epoch >= 0 and epoch > self.latest_epoch():
                self.assign(epoch, max(base_offset, log_start))
        if self.entries() != entries and (entries is not None or self.entries() or self.fs.exists(self.path)):
            self.save()  # not for a new, empty log: no file and no entries say the same

    def _read_file(self) -> list[tuple[int, int]] | None:
        try:
            lines = self.fs.read_bytes(self.path).decode("ascii").split("\n")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("%s: ignoring unreadable %s (%s); rebuilding it from the log", self.name, self.path.name,
                           exc)
            return None
        try:
            if lines[0] != str(CHECKPOINT_VERSION) or lines[-1] != "" or int(lines[1]) != len(lines) - 3:
                raise ValueError("bad version or count line")
            entries = [(int(epoch), int(start)) for epoch, start in (line.split(" ") for line in lines[2:-1])]
        except (ValueError, IndexError) as exc:
            logger.warning("%s: ignoring malformed %s (%s); rebuilding it from the log", self.name, self.path.name,
                           exc)
            return None
        return entries

    def _confirmed(self, entries: list[tuple[int, int]], log_start: int, log_end: int,
                   epoch_on_disk: Callable[[int], int]) -> list[tuple[int, int]] | None:
        """The file's entries the log agrees with (cut to the log's range); None if the log contradicts one."""
        if log_start >= log_end:
            return []  # an empty log holds no epoch (the file may predate a reset that failed half way)
        kept: list[tuple[int, int]] = []
        for epoch, start in entries:
            if start >= log_end:
                break
            if kept and (epoch <= kept[-1][0] or start <= kept[-1][1]):
                return None
            kept.append((epoch, start))
        while len(kept) > 1 and kept[1][1] <= log_start:
            kept.pop(0)
        if kept and kept[0][1] < log_start:
            kept[0] = (kept[0][0], log_start)
        for index, (epoch, start) in enumerate(kept):
            if epoch_on_disk(start) != epoch or (index > 0 and epoch_on_disk(start - 1) != kept[index - 1][0]):
                logger.warning("%s: %s says epoch %d begins at offset %d, the log disagrees; rebuilding it",
                               self.name, self.path.name, epoch, start)
                return None
        return kept
