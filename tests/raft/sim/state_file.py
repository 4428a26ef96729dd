"""ReplicaStateFile's two slots, in memory: what a crash in the middle of a save leaves behind.

The real file (logbroker/cluster/raft_storage.py) keeps the hard state in two slots and writes each save
into the older one, numbered one past the newest. Load takes the newest slot that passes its CRC. A crash
during a save can leave that save lost (nothing reached the disk), torn (part of it did, so the slot fails
its CRC and load falls back to the other slot) or whole (all of it did, though the fsync never returned).

Only a save still in flight can be torn. A completed save could rot later, but falling back from it would
bring back a term and vote the node has already acted on, which no Raft survives; that is not modelled.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from logbroker.raft.types import HardState


class SaveFate(enum.Enum):
    LOST = "lost"
    TORN = "torn"
    WHOLE = "whole"


@dataclass(frozen=True)
class _Slot:
    seq: int
    hard_state: HardState
    intact: bool  # passes its CRC


class StateFileModel:
    def __init__(self) -> None:
        self._slots: list[_Slot | None] = [None, None]  # None: never written
        self._seq = 0

    def save(self, hard_state: HardState) -> None:
        """A save that returned: fsynced, in the older slot."""
        self._write(hard_state, intact=True)

    def interrupted_save(self, hard_state: HardState, fate: SaveFate) -> None:
        """A save the crash caught before its fsync returned."""
        if fate is not SaveFate.LOST:
            self._write(hard_state, intact=fate is SaveFate.WHOLE)

    def _write(self, hard_state: HardState, intact: bool) -> None:
        self._seq += 1
        self._slots[self._seq % 2] = _Slot(self._seq, hard_state, intact)

    def load(self) -> HardState:
        """The newest intact slot, as ReplicaStateFile.load; the next save goes to the other slot."""
        intact = [slot for slot in self._slots if slot is not None and slot.intact]
        if not intact:
            # Save 1 goes to slot 1 and save 2 to slot 0: an unwritten slot 0 means no save ever completed.
            assert self._slots[0] is None, "both state slots damaged: the real file refuses to load"
            self._seq = 0
            return HardState()
        newest = max(intact, key=lambda slot: slot.seq)
        self._seq = newest.seq
        return newest.hard_state
