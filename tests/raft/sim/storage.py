"""An in-memory LogStorage with an explicit fsync boundary, for tests and the simulator.

Writes (reset, truncate, append, hard state) change the *written* view at once, which is what the node
reads, like a page cache. ``fsync()`` makes everything written so far durable. ``crash()`` throws away
whatever was written after the last fsync, like a power cut: the log and hard state go back to the durable
view. Retention deletes a durable, committed prefix directly.

The hard state is saved through a model of the two-slot state file, after the log's fsync as the broker's
runtime does: crash_during_state_save() leaves the save lost, torn or whole. A log reset's prev term and
membership count as durable with the reset itself, whatever happens to the save: they describe the new log
start, and modelled as lost with the save, a log starting there breaks log matching in the simulator.
cut_durable_tail() is what recovery does to a log whose tail is damaged: a durable suffix is gone.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from logbroker.raft.membership import Membership
from logbroker.raft.types import NO_TERM, Entry, HardState, Ready
from tests.raft.sim.state_file import SaveFate, StateFileModel


@dataclass
class _LogImage:
    first_offset: int = 0
    prev_term: int = NO_TERM
    entries: list[Entry] = field(default_factory=list)
    lasts: list[int] = field(default_factory=list)  # last_offset of each entry, for bisect
    hard_state: HardState = field(default_factory=HardState)
    membership: Membership | None = None

    def copy(self) -> _LogImage:
        return _LogImage(
            self.first_offset,
            self.prev_term,
            list(self.entries),
            list(self.lasts),
            self.hard_state,
            self.membership,
        )

    @property
    def last_offset(self) -> int:
        return self.lasts[-1] if self.lasts else self.first_offset - 1

    def reset(self, start_offset: int, prev_term: int, membership: Membership) -> None:
        self.first_offset, self.prev_term, self.membership = start_offset, prev_term, membership
        self.entries.clear()
        self.lasts.clear()

    def truncate(self, from_offset: int) -> None:
        index = bisect.bisect_left(self.lasts, from_offset)
        assert index == len(self.entries) or self.entries[index].base_offset == from_offset, (
            "cut inside entry"
        )
        del self.entries[index:]
        del self.lasts[index:]

    def append(self, entries: tuple[Entry, ...]) -> None:
        for entry in entries:
            assert entry.base_offset == self.last_offset + 1, (
                f"gap before {entry} (log ends {self.last_offset})"
            )
            self.entries.append(entry)
            self.lasts.append(entry.last_offset)

    def delete_before(self, offset: int) -> None:
        index = bisect.bisect_left(self.lasts, offset)
        assert index == len(self.entries) or self.entries[index].base_offset == offset, (
            "retention inside entry"
        )
        if index == 0:
            return
        self.prev_term = self.entries[index - 1].term
        self.first_offset = offset
        del self.entries[:index]
        del self.lasts[:index]


class MemoryLogStorage:
    def __init__(self, membership: Membership | None = None) -> None:
        self._written = _LogImage(membership=membership)
        self._durable = self._written.copy()
        self._pending: list[tuple[str, object]] = []
        self.state_file = StateFileModel()  # _durable.hard_state is always what it loads

    # ------------------------------------------------------------------ LogStorage protocol
    @property
    def first_offset(self) -> int:
        return self._written.first_offset

    @property
    def last_offset(self) -> int:
        return self._written.last_offset

    def term_at(self, offset: int) -> int | None:
        image = self._written
        if offset == image.first_offset - 1:
            return image.prev_term
        if offset < image.first_offset or offset > image.last_offset:
            return None
        return image.entries[bisect.bisect_left(image.lasts, offset)].term

    def entries(self, from_offset: int, max_bytes: int) -> list[Entry]:
        image = self._written
        index = bisect.bisect_left(image.lasts, from_offset)
        found: list[Entry] = []
        budget = max_bytes
        while index < len(image.entries):
            entry = image.entries[index]
            if found and entry.size_bytes > budget:
                break
            found.append(entry)
            budget -= entry.size_bytes
            index += 1
        return found

    # ------------------------------------------------------------------ writes
    @property
    def hard_state(self) -> HardState:
        return self._written.hard_state

    @property
    def durable_hard_state(self) -> HardState:
        return self._durable.hard_state

    @property
    def base_membership(self) -> Membership | None:
        return self._durable.membership

    def write_ready(self, ready: Ready) -> None:
        """Step 1 of the Ready contract, minus the fsync."""
        if ready.reset_log is not None:
            reset = ready.reset_log
            self._do("reset", (reset.start_offset, reset.prev_term, reset.membership))
        if ready.truncate_from is not None:
            self._do("truncate", ready.truncate_from)
        if ready.entries:
            self._do("append", ready.entries)
        if ready.hard_state is not None:
            self._do("hard_state", ready.hard_state)

    def _do(self, op: str, arg: object) -> None:
        _apply(self._written, op, arg)
        self._pending.append((op, arg))

    def fsync(self) -> None:
        self._sync_log()
        for op, arg in self._pending:
            assert op == "hard_state" and isinstance(arg, HardState)
            self.state_file.save(arg)
            self._durable.hard_state = arg
        self._pending.clear()

    def _sync_log(self) -> None:
        """Make the pending log writes durable; the hard state saves stay pending."""
        for op, arg in self._pending:
            if op != "hard_state":
                _apply(self._durable, op, arg)
        self._pending = [(op, arg) for op, arg in self._pending if op == "hard_state"]

    @property
    def dirty(self) -> bool:
        return bool(self._pending)

    def crash(self) -> None:
        """Lose everything written since the last fsync."""
        self._pending.clear()
        self._written = self._durable.copy()

    def crash_during_state_save(self, fate: SaveFate) -> None:
        """A crash after the log's fsync, in the middle of saving the hard state that goes with it."""
        self._sync_log()
        assert len(self._pending) <= 1, "one hard state per Ready"
        for _, arg in self._pending:
            assert isinstance(arg, HardState)
            self.state_file.interrupted_save(arg, fate)
        self._pending.clear()
        self._durable.hard_state = self.state_file.load()
        self.crash()

    def cut_durable_tail(self, from_offset: int) -> None:
        """Recovery cut a damaged tail: every durable entry from from_offset (an entry start) on is gone.
        The hard state is left alone: the runtime lowers a commit offset past the log end on restart."""
        assert not self._pending, "recovery runs on a stopped node"
        for image in (self._written, self._durable):
            image.truncate(from_offset)

    def delete_before(self, offset: int, membership: Membership) -> None:
        """Retention: drop durable entries below ``offset`` (an entry start); ``membership`` is the one in
        force at the new log start, kept like a segment's metadata."""
        assert not self._pending, "retention runs on a fsynced log"
        for image in (self._written, self._durable):
            image.delete_before(offset)
            image.membership = membership

    def durable_entries(self) -> list[Entry]:
        return list(self._durable.entries)

    def durably_holds(self, entry: Entry) -> bool:
        """Whether the durable log has this entry (same last offset and term)."""
        image = self._durable
        if not image.first_offset <= entry.last_offset <= image.last_offset:
            return False
        return image.entries[bisect.bisect_left(image.lasts, entry.last_offset)].term == entry.term


def _apply(image: _LogImage, op: str, arg: object) -> None:
    if op == "reset":
        assert isinstance(arg, tuple)
        image.reset(arg[0], arg[1], arg[2])
    elif op == "truncate":
        image.truncate(arg)  # type: ignore[arg-type]
    elif op == "append":
        image.append(arg)  # type: ignore[arg-type]
    else:
        image.hard_state = arg  # type: ignore[assignment]
